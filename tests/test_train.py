import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import train_dit_fm
from diffq import configlib, data, parallel
from diffq.io import npz
from diffq.jobs import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  c = train_dit_fm.get_config("tiny")
  c.update(overrides)
  return c


def _steps(num_devices, n=2, **overrides):
  c = tiny_config(**overrides)
  model_cfg = configlib.dit_config(c.model)
  mesh = parallel.make_mesh(num_devices)
  state = jax.device_put(train.init_state(c, model_cfg), parallel.replicated(mesh))
  step = train.compile_train_step(c, model_cfg, mesh, state)
  rng = np.random.default_rng(0)
  for _ in range(n):
    x = rng.uniform(-1, 1, (16, 32, 32, 1)).astype(np.float32)
    y = rng.integers(0, 10, 16).astype(np.int32)
    state, metrics = step(state, *parallel.shard_batch((x, y), mesh))
  return jax.device_get(state), jax.device_get(metrics)


def test_sharded_train_step_equals_single_device():
  assert jax.device_count() == 8
  s1, m1 = _steps(1)
  s8, m8 = _steps(8)
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), s1["params"], s8["params"])
  assert int(s8["step"]) == 2


def test_ema_warmup_weights_the_init_by_the_schedule():
  """With `ema_warmup` the average after step n (0-based) is d_n * ema + (1 - d_n) * params with
  d_n = min(ema_decay, (1 + n) / (10 + n)): after two steps the init keeps the share 0.1 * 2/11, not 0.999^2."""
  c = tiny_config()
  init = jax.device_get(train.init_state(c, configlib.dit_config(c.model)))["params"]
  one, _ = _steps(1, n=1)
  two, _ = _steps(1, ema_warmup=True)
  d0, d1 = 1 / 10, 2 / 11
  ref = jax.tree.map(lambda i, a, b: d1 * (d0 * i + (1 - d0) * a) + (1 - d1) * b, init, one["params"], two["params"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), two["ema"], ref)


def test_batch_not_divisible_by_devices_is_a_clear_error():
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    parallel.check_batch_divisible(12, parallel.make_mesh(8))


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
  full = train.run(tiny_config(num_steps=6, num_devices=1), str(tmp_path / "full"))
  train.run(tiny_config(num_steps=3, num_devices=1), str(tmp_path / "split"))
  resumed = train.run(tiny_config(num_steps=6, num_devices=1), str(tmp_path / "split"))
  assert full["steps"] == resumed["steps"] == 6
  a, _ = npz.import_npz(str(tmp_path / "full" / "ema_params.npz"))
  b, _ = npz.import_npz(str(tmp_path / "split" / "ema_params.npz"))
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_killed_training_resumes_from_its_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "main.py", "--config=configs/train_dit_fm.py:tiny", f"--workdir={workdir}",
         "--config.num_steps=100000", "--config.checkpoint_every=2", "--config.num_devices=1"]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt = workdir / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and not any(p.name.isdigit() and int(p.name) >= 4 for p in
                                           (ckpt.iterdir() if ckpt.exists() else [])):
    time.sleep(0.5)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
  assert steps and steps[-1] >= 4, steps
  assert not (workdir / "metrics.json").exists()  # a killed job leaves no result that looks complete
  out = subprocess.run(cmd[:-3] + [f"--config.num_steps={steps[-1] + 2}", "--config.num_devices=1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert f"Resumed from checkpoint at step {steps[-1]}" in out.stderr
  assert '"steps": %d' % (steps[-1] + 2) in (workdir / "metrics.json").read_text()


def test_missing_data_names_the_install_command(tmp_path):
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
    data.load("train", str(tmp_path))


def test_corrupt_idx_is_refused(tmp_path):
  for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
    (tmp_path / name).write_bytes(b"\x00\x00\x08\x03\x00\x00\x00\x05\x00\x00\x00\x1c\x00\x00\x00\x1c" + b"\x00" * 9)
  with pytest.raises(ValueError, match="truncated"):
    data.load("test", str(tmp_path))


def test_fashion_mnist_preprocessing():
  x, y = data.load("test")
  assert x.shape == (10000, 32, 32, 1) and y.shape == (10000,) and set(np.unique(y)) == set(range(10))
  assert x.min() == -1.0 and x.max() == 1.0
  np.testing.assert_array_equal(x[:, :2], -1.0)  # padding is background
  raw, _ = data.load_raw("test")
  np.testing.assert_array_equal(data.to_uint8(x)[:, 2:30, 2:30, 0], raw)
