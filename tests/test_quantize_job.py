"""The quantization job end to end (calibrate -> distill -> export -> re-import -> sample) on a tiny DiT."""
import os
import shutil

import numpy as np
import pytest

from configs import dit_w2a4
from diffq import parallel, plan as plan_lib
from diffq.io import npz, quantized
from diffq.jobs import quantize, sample


def job_cfg(params, method="mpqdm", **distill):
  c = dit_w2a4.get_config(f"quick,method={method}")
  c.params, c.num_devices = params, 1
  c.sample.update(num_samples=10, batch_size=10, spacing="ddim4", evaluate=False)
  c.distill.update(dict(trajectories=2, checkpoint_every=1, keep_checkpoints=10, log_every=1), **distill)
  return c


def test_quick_job_writes_export_samples_and_accounting(tiny_export, tmp_path):
  out = quantize.run(job_cfg(tiny_export), str(tmp_path))
  for name in ("calibrated_quant.npz", "quantized.npz", "samples.npz", "grid.png", "metrics.json"):
    assert (tmp_path / name).exists(), name
  assert out["w_bits"] == 2 and out["a_bits"] == 4 and out["quant_seconds"] > 0
  assert out["train_loss"] > 0 and np.isfinite(out["train_loss"])
  assert 2.0 < out["bits_per_weight"] < 8.0  # W2 body; W8 boundary layers and the float label table raise it
  assert out["model_bytes"] < os.path.getsize(tiny_export)


def test_killed_distillation_resumes_to_the_same_result(tiny_export, tmp_path):
  straight = quantize.run(job_cfg(tiny_export), str(tmp_path / "a"))
  ckpts = tmp_path / "a" / "distill" / "checkpoints"
  assert sorted(int(p) for p in os.listdir(ckpts) if p.isdigit())[-1] == 8
  for step in (5, 6, 7, 8):  # "kill" after step 4: drop the later checkpoints and the job's outputs
    shutil.rmtree(ckpts / str(step))
  for name in ("quantized.npz", "quantized.json", "metrics.json", "samples.npz"):
    os.remove(tmp_path / "a" / name)
  resumed = quantize.run(job_cfg(tiny_export), str(tmp_path / "a"))
  assert resumed["train_loss"] == straight["train_loss"]
  a = npz.import_npz(str(tmp_path / "a" / "quantized.npz"))[0]
  b = quantize.run(job_cfg(tiny_export), str(tmp_path / "b"))  # an independent straight run
  assert b["train_loss"] == straight["train_loss"]
  c = npz.import_npz(str(tmp_path / "b" / "quantized.npz"))[0]
  flat_a, flat_c = npz.flatten(a), npz.flatten(c)
  assert all(np.array_equal(flat_a[k], flat_c[k]) for k in flat_a)


def test_uniform_ptq_has_no_distillation_and_samples_like_its_export(tiny_export, tmp_path):
  out = quantize.run(job_cfg(tiny_export, method="uniform", trajectories=0), str(tmp_path))
  assert out["distill_seconds"] == 0.0 and not (tmp_path / "distill").exists()
  with np.load(tmp_path / "samples.npz") as f:
    shipped = f["arr_0"]
  model_cfg, variables, table = quantized.import_quantized(str(tmp_path / "quantized.npz"))
  s = job_cfg(tiny_export).sample
  again, _ = sample.generate(s, plan_lib.make_plan(s.diffusion_steps, s.spacing), model_cfg, variables,
                             parallel.make_mesh(1), table)
  np.testing.assert_array_equal(again, shipped)
  from configs import sample as sample_config  # the sample job takes the quantized export as its params
  c = sample_config.get_config("quick")
  c.update(params=str(tmp_path / "quantized.npz"), num_samples=10, batch_size=10, spacing="ddim4", evaluate=False,
           num_devices=1)
  sample.run(c, str(tmp_path / "sampled"))
  with np.load(tmp_path / "sampled" / "samples.npz") as f:
    np.testing.assert_array_equal(f["arr_0"], shipped)
  c.spacing = "ddim2"  # per-step activation quantizers fit only the plan they were calibrated on
  with pytest.raises(ValueError, match=r"another timestep plan \(spacing: export 'ddim4', config 'ddim2'\)"):
    sample.run(c, str(tmp_path / "other_plan"))


def test_integer_execution_of_a_w8a8_export_draws_the_float_samples_up_to_rounding(tiny_export, tmp_path):
  c = dit_w2a4.get_config("quick,method=uniform,w=8,a=8,act=static")
  c.params, c.num_devices = tiny_export, 1
  c.sample.update(num_samples=10, batch_size=10, spacing="ddim4", evaluate=False)
  quantize.run(c, str(tmp_path))
  from configs import sample as sample_config
  s = sample_config.get_config("quick")
  s.update(params=str(tmp_path / "quantized.npz"), num_samples=10, batch_size=10, spacing="ddim4", evaluate=False,
           num_devices=1)
  runs = {}
  for mode in ("float", "integer"):
    s.execution = mode
    runs[mode] = sample.run(s, str(tmp_path / mode))
    with np.load(tmp_path / mode / "samples.npz") as f:
      runs[mode]["images"] = f["arr_0"].astype(np.int32)
  n_layers = len(quantized.quantized_layer_paths(quantized.import_quantized(str(tmp_path / "quantized.npz"))[1]["quant"]))
  assert runs["integer"]["integer_layers"] == n_layers and runs["integer"]["float_quantized_layers"] == 0
  diff = np.abs(runs["integer"]["images"] - runs["float"]["images"])
  assert runs["float"]["execution"] == "float" and diff.mean() < 0.05 and diff.max() <= 2
  s.params = tiny_export  # an FP export has no codes to run as integers
  with pytest.raises(ValueError, match="no layer that can run as an integer matmul"):
    sample.run(s, str(tmp_path / "fp"))


def test_bfloat16_calibration_and_distillation_stay_near_float32(tiny_export, tmp_path):
  """calib.compute_dtype / distill.compute_dtype bfloat16: the calibrated activation ranges and the distillation
  loss stay within a few percent of float32's on the same job."""
  runs = {}
  for dtype in ("float32", "bfloat16"):
    c = job_cfg(tiny_export, method="efficientdm", trajectories=2)
    c.quant.act, c.quant.rotate = "static", False
    c.calib.compute_dtype = c.distill.compute_dtype = dtype
    runs[dtype] = quantize.run(c, str(tmp_path / dtype))
    runs[dtype]["calib"] = npz.flatten(npz.import_npz(str(tmp_path / dtype / "calibrated_quant.npz"))[0])
  a_scales = [k for k in runs["float32"]["calib"] if k.endswith("a_scale")]
  rel = [np.max(np.abs(runs["bfloat16"]["calib"][k] / runs["float32"]["calib"][k] - 1)) for k in a_scales]
  assert a_scales and np.median(rel) < 0.02 and max(rel) < 0.1
  assert np.isfinite(runs["bfloat16"]["train_loss"])
  assert runs["bfloat16"]["train_loss"] == pytest.approx(runs["float32"]["train_loss"], rel=0.1)
  assert runs["bfloat16"]["train_loss"] != runs["float32"]["train_loss"]  # the loop did run in bfloat16


def test_unknown_method_is_refused():
  with pytest.raises(ValueError, match="Unknown method"):
    dit_w2a4.get_config("method=mpq")


def test_a_keep_8bit_pattern_that_matches_nothing_is_refused(tiny_export, tmp_path):
  c = job_cfg(tiny_export)
  c.quant.keep_8bit = "x_embeder,final_layer/*"
  with pytest.raises(ValueError, match="'x_embeder' matches no layer"):
    quantize.run(c, str(tmp_path))


@pytest.mark.parametrize("method", sorted(m for m in dit_w2a4.METHODS if not m.startswith("vq")))
@pytest.mark.parametrize("w,a", [(2, 4), (3, 4), (4, 4), (4, 8), (8, 8)])
def test_every_grid_config_builds_a_spec_table_or_a_clear_error(method, w, a):
  from diffq.seam import rules
  c = dit_w2a4.get_config(f"w={w},a={a},method={method}")
  if w == 8 and c.quant.omq:
    with pytest.raises(ValueError, match="bits must be 2..7"):
      rules.quant_table(c.quant, 20)
    return
  body = dict(rules.quant_table(c.quant, 20))["*"]
  assert (body.weight.bits, body.input.bits, body.weight.mixed, body.lora_rank > 0, body.train) == (
      w, a, c.quant.omq, method != "uniform", method != "uniform")
  assert (c.distill.trd_weight > 0) == (method in ("trd", "mpqdm"))


@pytest.mark.parametrize("w,a", [(2, 4), (3, 8), (4, 8)])
def test_vq_configs_give_the_body_m_codebooks_and_keep_the_boundary_scalar(w, a):
  from configs import dit_vq
  from diffq.seam import rules, weights
  table = dict(rules.quant_table(dit_vq.get_config(f"w={w},a={a}").quant, 20))
  body = table["*"]
  assert isinstance(body.weight, weights.VQ) and body.weight.num_codebooks == w and body.input.bits == a
  assert not body.train and body.lora_rank == 0 and isinstance(table["x_embedder*"].weight, weights.Scalar)


def test_a_diverging_run_stops_naming_the_step_and_writes_no_metrics(tiny_export, tmp_path):
  c = job_cfg(tiny_export, a_quant_lr=1e12, w_quant_lr=1e12, lora_lr_divisor=1e-12)
  with pytest.raises(FloatingPointError, match=r"Training diverged: .*NaN/inf at step \d+.*a_quant_lr"):
    quantize.run(c, str(tmp_path))
  assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "quantized.npz").exists()


def test_a_finished_workdir_refuses_other_settings_and_names_them(tiny_export, tmp_path):
  quantize.run(job_cfg(tiny_export), str(tmp_path))
  c = job_cfg(tiny_export)
  c.quant.w_bits = 3
  with pytest.raises(ValueError, match=r"calibration .* other settings: .*quant.w_bits: 2 -> 3"):
    quantize.run(c, str(tmp_path))
  c = job_cfg(tiny_export, trajectories=3)  # same calibration, longer distillation
  with pytest.raises(ValueError, match=r"distillation .* other settings: distill.trajectories: 2 -> 3.* delete "
                     r".*distill .*quantized.npz .*quantized.json to recompute"):
    quantize.run(c, str(tmp_path))
  c = job_cfg(tiny_export)
  c.sample.num_samples = 20  # sampling-only settings do not touch the cached stages
  assert quantize.run(c, str(tmp_path))["num_samples"] == 20


def test_a_rerun_reuses_the_export_and_reports_the_same_job_metrics(tiny_export, tmp_path):
  first = quantize.run(job_cfg(tiny_export), str(tmp_path))
  stamp = os.path.getmtime(tmp_path / "quantized.npz")
  again = quantize.run(job_cfg(tiny_export), str(tmp_path))
  assert os.path.getmtime(tmp_path / "quantized.npz") == stamp  # reused, not rewritten
  assert {k: again[k] for k in first if k not in ("seconds", "images_per_second")} == \
      {k: first[k] for k in first if k not in ("seconds", "images_per_second")}


def test_resumed_distillation_accumulates_seconds_and_keeps_train_metrics(tiny_export, tmp_path):
  straight = quantize.run(job_cfg(tiny_export), str(tmp_path))
  for name in ("quantized.npz", "quantized.json", "metrics.json"):
    os.remove(tmp_path / name)
  resumed = quantize.run(job_cfg(tiny_export), str(tmp_path))  # every step checkpointed: nothing left to run
  assert resumed["distill_seconds"] == straight["distill_seconds"] > 0
  assert {k: v for k, v in resumed.items() if k.startswith("train_")} == \
      {k: v for k, v in straight.items() if k.startswith("train_")} != {}


@pytest.mark.parametrize("key,value,match", [
    ("sample.batch_size", 0, "batch_size must be a positive integer"),
    ("sample.spacing", "foo", "Unknown spacing 'foo'"),
    ("sample.method", "dpm", "Unknown sampling method"),
    ("distill.trd_grad", "window", "trd_grad"),
    ("calib.num_images", 3, "not divisible"),
])
def test_bad_settings_are_refused_before_any_work(tiny_export, tmp_path, key, value, match):
  c = job_cfg(tiny_export)
  c.num_devices = 2
  c.sample.batch_size = 10
  section, name = key.split(".")
  c[section][name] = value
  with pytest.raises(ValueError, match=match):
    quantize.run(c, str(tmp_path))
  assert not os.listdir(tmp_path)  # nothing computed, nothing written


def test_a_damaged_calibration_names_the_files_to_delete(tiny_export, tmp_path):
  quantize.run(job_cfg(tiny_export, method="uniform", trajectories=0), str(tmp_path))
  with open(tmp_path / "calibrated_quant.npz", "r+b") as f:
    f.truncate(100)
  assert quantize.run(job_cfg(tiny_export, method="uniform", trajectories=0), str(tmp_path))  # export reused
  for name in ("quantized.npz", "quantized.json"):
    os.remove(tmp_path / name)
  with pytest.raises(ValueError, match=r"calibration in .*calibrated_quant.npz cannot be read .*Delete it"):
    quantize.run(job_cfg(tiny_export, method="uniform", trajectories=0), str(tmp_path))


def test_vq_layouts_give_layer_types_their_own_codebooks():
  from configs import dit_vq
  from diffq.seam import rules, spec as spec_lib
  c = dit_vq.get_config("w=2")
  c.quant.vq.layouts = "adaLN_modulation=1x8g8,mlp/fc2=3x6g4"
  table = rules.quant_table(c.quant, 20)
  got = {p: (s.weight.num_codebooks, s.weight.codebook_bits, s.weight.group_size) for p, s in
         ((p, spec_lib.resolve(p, table)) for p in ("blocks_3/adaLN_modulation", "blocks_0/mlp/fc2", "blocks_1/attn/qkv"))}
  assert got == {"blocks_3/adaLN_modulation": (1, 8, 8), "blocks_0/mlp/fc2": (3, 6, 4), "blocks_1/attn/qkv": (2, 8, 8)}
  c.quant.vq.layouts = "mlp/fc2=3x8"
  with pytest.raises(ValueError, match="Bad VQ layout 'mlp/fc2=3x8'"):
    rules.quant_table(c.quant, 20)


def test_vq_pv_job_runs_end_to_end_and_samples_its_export(tiny_export, tmp_path):
  """configs/dit_vq.py:pv on a tiny DiT: VQ calibration -> PV-tuning -> export -> re-import -> sample; the stages
  are reused on a re-run and the samples are the re-imported export's."""
  from configs import dit_vq
  c = dit_vq.get_config("quick,pv,w=2,a=8")
  c.params, c.num_devices = tiny_export, 1
  c.quant.vq.update(codebook_bits=4, max_epochs=2, steps_per_epoch=5, kmeans_iters=5)
  c.sample.update(num_samples=10, batch_size=10, spacing="ddim4", evaluate=False)
  c.distill.update(trajectories=1, checkpoint_every=1, log_every=1)
  out = quantize.run(c, str(tmp_path))
  assert out["vq_seconds"] > 0 and 0 < out["vq_mean_error"] < 1 and np.isfinite(out["train_loss"])
  assert out["bits_per_weight_total"] > out["bits_per_weight"] > 2  # the W8 boundary adds its float scales
  _, variables, table = quantized.import_quantized(str(tmp_path / "quantized.npz"))
  assert "vq_target" not in variables["quant"]["blocks_0"]["mlp"]["fc1"]  # the deployed form drops the STE target
  with np.load(tmp_path / "samples.npz") as f:
    shipped = f["arr_0"]
  again, _ = sample.generate(c.sample, plan_lib.make_plan(c.sample.diffusion_steps, c.sample.spacing),
                             quantized.import_quantized(str(tmp_path / "quantized.npz"))[0], variables,
                             parallel.make_mesh(1), table)
  np.testing.assert_array_equal(again, shipped)
  assert quantize.run(c, str(tmp_path))["train_loss"] == out["train_loss"]  # stages reused
