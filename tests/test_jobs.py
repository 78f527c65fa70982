"""Jobs end to end through main.py / their run() functions, on tiny models."""
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import sample as sample_config
from diffq import plan as plan_lib
from diffq.io import npz
from diffq.jobs import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sample_cfg(params, **kw):
  c = sample_config.get_config("quick")
  c.update({**dict(params=params, num_samples=24, batch_size=8, spacing="ddim4", evaluate=False), **kw})
  return c


def plan_of(c):
  return plan_lib.make_plan(c.diffusion_steps, c.spacing)


def test_sample_job_writes_adm_npz_grid_and_metrics(tiny_export, tmp_path):
  out = sample.run(sample_cfg(tiny_export, num_samples=20), str(tmp_path))  # last batch is padded
  with np.load(tmp_path / "samples.npz", allow_pickle=False) as f:
    assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (20, 32, 32, 1)
    np.testing.assert_array_equal(f["arr_1"], np.arange(20) % 10)
  assert (tmp_path / "grid.png").exists() and out["num_samples"] == 20
  assert "seconds" in open(tmp_path / "metrics.json").read()


def test_sampling_on_8_devices_equals_1_device(tiny_export):
  model_cfg, params = sample.load_dit(tiny_export)
  from diffq import parallel
  v = {"params": params}
  c1, c8 = sample_cfg(tiny_export, num_devices=1), sample_cfg(tiny_export, num_devices=8)
  one, labels = sample.generate(c1, plan_of(c1), model_cfg, v, parallel.make_mesh(1))
  eight, _ = sample.generate(c8, plan_of(c8), model_cfg, v, parallel.make_mesh(8))
  assert one.std() > 0
  # uint8 after the same float computation; allow a one-level rounding flip from reduction order
  assert np.abs(one.astype(int) - eight.astype(int)).max() <= 1


def test_loading_a_non_dit_export_is_a_clear_error(tmp_path):
  npz.export_npz(str(tmp_path / "x.npz"), {"a": np.zeros(2)})
  with pytest.raises(ValueError, match="not a DiT parameter export"):
    sample.load_dit(str(tmp_path / "x.npz"))


def _main(*args):
  return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_unknown_config_key_is_a_clear_error(tmp_path):
  out = _main("--config=configs/sample.py", f"--workdir={tmp_path}", "--config.num_sampels=3")
  assert out.returncode != 0 and "num_sampels" in out.stderr
  out = _main("--config=configs/sample.py:quik", f"--workdir={tmp_path}")
  assert out.returncode != 0 and "Unknown config argument 'quik'" in out.stderr


def test_main_runs_the_sample_job(tiny_export, tmp_path):
  out = _main("--config=configs/sample.py:quick", f"--workdir={tmp_path}", f"--config.params={tiny_export}",
              "--config.num_samples=10", "--config.batch_size=8", "--config.spacing=ddim2", "--config.evaluate=False")
  assert out.returncode == 0, out.stderr[-2000:]
  assert (tmp_path / "samples.npz").exists() and (tmp_path / "metrics.json").exists()


def test_export_dit_round_trip_gives_identical_samples(tiny_export, tmp_path):
  from configs import export_dit
  from diffq.jobs import export_dit as export_job
  c = export_dit.get_config()
  c.source, c.dest = tiny_export, str(tmp_path / "copy.npz")
  export_job.run(c, str(tmp_path / "w"))
  from diffq import parallel
  mesh = parallel.make_mesh(1)
  ca, cb = sample_cfg(tiny_export, num_samples=8), sample_cfg(c.dest, num_samples=8)
  a = sample.generate(ca, plan_of(ca), *_cfg_vars(tiny_export), mesh)[0]
  b = sample.generate(cb, plan_of(cb), *_cfg_vars(c.dest), mesh)[0]
  np.testing.assert_array_equal(a, b)


def _cfg_vars(path):
  model_cfg, params = sample.load_dit(path)
  return model_cfg, {"params": params}


def test_non_finite_samples_and_metrics_are_never_written(tiny_export, tmp_path):
  from diffq import parallel
  from diffq.jobs import common
  model_cfg, params = sample.load_dit(tiny_export)
  params = dict(params, final_layer={**params["final_layer"],
                                     "linear": {**params["final_layer"]["linear"],
                                                "bias": np.full_like(params["final_layer"]["linear"]["bias"],
                                                                     np.nan)}})
  with pytest.raises(FloatingPointError, match=r"NaN/inf for 8 of samples 0..7"):
    c = sample_cfg(tiny_export, num_samples=8)
    sample.sample_and_score(c, plan_of(c), model_cfg, {"params": params},
                            str(tmp_path), parallel.make_mesh(1))
  with pytest.raises(FloatingPointError, match=r"\['fid'\] are NaN/inf"):
    common.write_metrics(str(tmp_path), dict(fid=float("nan"), seconds=1.0))
  assert not os.listdir(tmp_path)
