"""The multi-host path on loopback: 2 processes x 2 CPU devices each (jax.distributed over 127.0.0.1), launched
with main.py's --coordinator_address/--num_processes/--process_id as a pod's hosts would run it, against the
same job in one process on 4 devices."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

from configs import sample as sample_config, train_dit_fm
from diffq.io import npz
from diffq.jobs import sample, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_two_processes(config: str, workdir, overrides: list[str]) -> None:
  """main.py on 2 local processes of 2 CPU devices each; raises with both logs if either fails."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu")
  port = free_port()
  procs = [subprocess.Popen([sys.executable, "main.py", f"--config={config}", f"--workdir={workdir}", *overrides,
                             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  if any(p.returncode for p in procs):
    raise AssertionError("\n\n".join(f"process {i} (exit {p.returncode}):\n{log[-4000:]}"
                                     for i, (p, log) in enumerate(zip(procs, logs))))


def test_two_process_sampling_writes_one_npz_equal_to_one_process(tiny_export, tmp_path):
  flags = [f"--config.params={tiny_export}", "--config.num_samples=12", "--config.batch_size=8",
           "--config.spacing=ddim4", "--config.evaluate=False", "--config.grid_per_class=1"]
  run_two_processes("configs/sample.py", tmp_path / "pod", flags)
  c = sample_config.get_config()
  c.update(params=tiny_export, num_samples=12, batch_size=8, spacing="ddim4", evaluate=False, grid_per_class=1,
           num_devices=4)
  sample.run(c, str(tmp_path / "one"))
  with np.load(tmp_path / "pod" / "samples.npz") as pod, np.load(tmp_path / "one" / "samples.npz") as one:
    assert pod["arr_0"].shape == (12, 32, 32, 1)  # both processes' shards, the padded last batch dropped
    np.testing.assert_array_equal(pod["arr_0"], one["arr_0"])
    np.testing.assert_array_equal(pod["arr_1"], one["arr_1"])
  metrics = json.loads((tmp_path / "pod" / "metrics.json").read_text())
  assert (metrics["num_samples"], metrics["processes"], metrics["devices"]) == (12, 2, 4)
  assert not [f for f in os.listdir(tmp_path / "pod") if f.startswith(".tmp")]


def test_two_process_training_checkpoints_and_resumes_like_one_process(tmp_path):
  """Orbax multi-host checkpoints: 2 processes train 3 steps and checkpoint, a new pair resumes to 6; equal to
  one uninterrupted process (up to the all-reduce's summation order)."""
  flags = ["--config.num_steps=3", "--config.export_ema=True"]
  run_two_processes("configs/train_dit_fm.py:tiny", tmp_path / "pod", flags)
  assert os.path.isdir(tmp_path / "pod" / "checkpoints" / "3")
  run_two_processes("configs/train_dit_fm.py:tiny", tmp_path / "pod", ["--config.num_steps=6",
                                                                        "--config.export_ema=True"])
  c = train_dit_fm.get_config("tiny")
  c.update(num_steps=6, export_ema=True, num_devices=4)
  train.run(c, str(tmp_path / "one"))
  pod, _ = npz.import_npz(str(tmp_path / "pod" / "ema_params.npz"))
  one, _ = npz.import_npz(str(tmp_path / "one" / "ema_params.npz"))
  flat_pod, flat_one = npz.flatten(pod), npz.flatten(one)
  assert flat_pod.keys() == flat_one.keys()
  for k in flat_one:
    np.testing.assert_allclose(flat_pod[k], flat_one[k], rtol=1e-5, atol=1e-6, err_msg=k)
  metrics = json.loads((tmp_path / "pod" / "metrics.json").read_text())
  assert (metrics["steps"], metrics["processes"], metrics["devices"]) == (6, 2, 4)
