"""Quantization job: calibrate (+ OMQ) -> distill (LoRA + TRD) -> export integer codes -> sample -> evaluate.

Every setting is validated before any work starts. Every stage leaves its result in the workdir and is reused
on a re-run only if it was computed under the same settings (`diffq/jobs/stages.py`; otherwise the job stops and
names the differing settings): `calibrated_quant.npz` (its manifest holds the settings), the distillation's
orbax checkpoints (`distill/settings.json`; resumed mid-run, seconds and metrics accumulated across sessions),
`quantized.npz` (packed integer codes + scales; its manifest holds the settings and the accounting). Samples are
drawn from the re-imported integer export, i.e. from exactly what is shipped, and redrawn on every run.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffq import calibrate, distill, parallel, plan as plan_lib
from diffq.eval import flops
from diffq.io import npz, quantized
from diffq.jobs import common, loop, sample, stages
from diffq.models import dit
from diffq.seam import rules, spec as spec_lib

DISTILL_FIX = ("lower the distillation learning rates (--config.distill.a_quant_lr, --config.distill.w_quant_lr; "
               "a larger --config.distill.lora_lr_divisor lowers LoRA's)")


RECORD = "settings.json"  # the distillation stage's settings record, in its directory


def stage_files(workdir: str) -> dict[str, list[str]]:
  """The files of each stage, in pipeline order."""
  join = lambda name: os.path.join(workdir, name)
  return dict(calibration=[join("calibrated_quant.npz"), join("calibrated_quant.json")],
              distillation=[join("distill")], export=[join("quantized.npz"), join("quantized.json")])


def _read_stage(read, stage: str, path: str):
  """read(path), with an error that names the files to delete when the stage's file is damaged."""
  try:
    return read(path)
  except (OSError, ValueError) as e:
    raise ValueError(f"The {stage} in {path} cannot be read ({e}). Delete it (and its .json) to recompute it.") \
        from None


def stored_settings(workdir: str, stage: str) -> dict | None:
  """The settings record of a cached stage (None if it has none)."""
  if stage == "distillation":
    return stages.read_record(os.path.join(stage_files(workdir)[stage][0], RECORD))
  return _read_stage(npz.load_manifest, stage, stage_files(workdir)[stage][0])["metadata"].get("settings")


def check_cached_stages(workdir: str, expected: dict[str, dict | None]) -> None:
  """Every cached stage must have been made under the settings it would be made with now (`expected`; None = the
  job has no such stage). The first that was not is refused with the differing settings and the files to delete:
  its own and every later stage's."""
  files = stage_files(workdir)
  order = list(files)
  for i, stage in enumerate(order):
    if expected.get(stage) is None or not any(os.path.exists(f) for f in files[stage]):
      continue
    later = [f for s in order[i:] for f in files[s] if os.path.exists(f)]
    stages.check_reuse(stage, stored_settings(workdir, stage), expected[stage], later)


def check_single_process(job: str, hint: str = "") -> None:
  """Calibration and distillation run in one process (all its devices); refused on several."""
  if jax.process_count() > 1:
    raise ValueError(f"The {job} job's calibration runs in one process (all of its devices); this run has "
                     f"{jax.process_count()}. Run it on one host{hint}.")


def calib_dtype(config) -> str:
  """The calibration trajectory's and statistics pass's compute dtype (calib.compute_dtype; float32 if absent)."""
  return config.calib.get("compute_dtype", "float32")


def calibration_set(config, model_cfg, variables, plan, mesh, table=()) -> calibrate.CalibrationSet:
  """The DDIM trajectory (every step full, at its patch size) of `calib.num_images` class-balanced images, drawn by the model
  `variables` runs under `table` (the FP model: `{"params": params}`, table ()) with the evaluation sampler."""
  s = config.sample
  n = config.calib.num_images
  labels = jax.device_put(jnp.arange(n, dtype=jnp.int32) % model_cfg.num_classes, parallel.batch_sharded(mesh))
  fn = dit.model_fn(dit.DiT(config=model_cfg, specs=tuple(table), dtype=calib_dtype(config)))
  shape = (model_cfg.input_size, model_cfg.input_size, model_cfg.in_channels)
  full = plan_lib.StepPlan(plan.schedule, plan.steps, tuple(plan_lib.at_patch("full", k.patch_size)
                                                           for k in plan.step_kinds))
  traj = jax.jit(lambda v, lab: calibrate.fp_trajectory(fn, v, jax.random.key(config.calib.seed), lab, full, shape,
                                                         s.cfg_scale, model_cfg.num_classes, s.eta, s.clip_x0,
                                                         cfg_channels=s.get("cfg_channels", 0)))
  return calibrate.CalibrationSet(traj(jax.device_put(variables, parallel.replicated(mesh)), labels),
                                  labels, full, s.cfg_scale, model_cfg.num_classes)


def calibrated_quant(config, model_cfg, params, table, plan, mesh, workdir, settings) -> tuple[dict, dict]:
  """(`quant` collection, info) from workdir/calibrated_quant.npz, calibrating under `settings` if it is missing."""
  path = stage_files(workdir)["calibration"][0]
  if os.path.exists(path):  # made under `settings` (check_cached_stages)
    quant, manifest = _read_stage(npz.import_npz, "calibration", path)
    logging.info("Reusing the calibration in %s.", path)
    return quant, manifest["metadata"]
  t0 = time.time()
  cal = calibration_set(config, model_cfg, {"params": params}, plan, mesh)
  quant, report = calibrate.calibrate(model_cfg, {"params": params}, cal, table,
                                      omq_fractions=tuple(config.quant.omq_fractions),
                                      omq_images_per_step=config.calib.omq_images_per_step,
                                      act_sample_size=config.calib.act_sample_size,
                                      vq_settings=rules.vq_fit_settings(config.quant.vq),
                                      dtype=calib_dtype(config))
  omq = {p: r for p, r in report.items() if "omq_k" in r}
  vq_layers = {p: r for p, r in report.items() if "vq_loss" in r}
  info = dict(kind="calibrated_quant", seconds=time.time() - t0, settings=stages.canonical(settings),
              omq_k={p: r["omq_k"] for p, r in omq.items()},
              omq_mean_fraction=float(np.mean([r["omq_k"] / r["out_channels"] for r in omq.values()]))
              if omq else 0.0)
  if vq_layers:  # relative output error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) per layer, at the k-means start and fitted
    info.update(vq_error={p: r["vq_loss"] for p, r in vq_layers.items()},
                vq_start_error={p: r["vq_start_loss"] for p, r in vq_layers.items()},
                vq_mean_error=float(np.mean([r["vq_loss"] for r in vq_layers.values()])),
                vq_seconds=float(sum(r["vq_seconds"] for r in vq_layers.values())))
  logging.info("Calibrated in %.0f s; OMQ k per layer: %s; VQ error per layer: %s", info["seconds"],
               info["omq_k"], info.get("vq_error"))
  npz.export_npz(path, jax.device_get(quant), metadata=info)
  return quant, info


def distill_config(config) -> distill.DistillConfig:
  """The loop's static settings: config.distill without the outer loop's keys."""
  return distill.DistillConfig.from_config(config.distill, ignore=loop.LOOP_KEYS)


def distilled_quant(config, distiller, params, quant, mesh, workdir, settings) -> tuple[dict, dict]:
  """Runs (or resumes) the distillation loop from the calibrated `quant`; returns (quant, metrics:
  distill_seconds over all sessions and the last step's train_* metrics). A new stage records `settings`."""
  d, plan = distiller, distiller.plan
  ddir = stage_files(workdir)["distillation"][0]
  record = os.path.join(ddir, RECORD)
  if not os.path.exists(record):
    common.write_json(record, stages.canonical(settings))
  state, frozen = d.init_state(quant)
  rep = parallel.replicated(mesh)
  state, frozen, params = jax.device_put((state, frozen, params), rep)
  writer = common.metric_writer(ddir)
  mngr = loop.checkpoint_manager(ddir, config.distill)
  state, meta = loop.restore_latest(mngr, state)
  cache = {}

  def batch_at(step):
    j = step // len(plan.steps)
    if j not in cache:
      cache.clear()
      cache[j] = parallel.shard_batch(d.trajectory_inputs(j), mesh)
    return (frozen, params, *cache[j])

  logging.info("Distilling %d steps (%d trajectories x %d steps, %d images, TRD weight %g, grad %s).",
               d.num_steps, d.cfg.trajectories, len(plan.steps), d.cfg.images, d.cfg.trd_weight, d.cfg.trd_grad)
  state, final, seconds, _ = loop.run(d.jit_step(mesh, state), state, batch_at, mngr=mngr, writer=writer,
                                      num_steps=d.num_steps, log_every=config.distill.log_every, meta=meta,
                                      fix=DISTILL_FIX)
  writer.flush()
  return jax.device_get(d.merged_quant(state, frozen)), dict(distill_seconds=seconds, **final)


def exported(config, model_cfg, params, quantize_fn, table, workdir, settings) -> tuple[str, dict]:
  """(path, metrics) of workdir/quantized.npz, written under `settings` from `quantize_fn() -> (quant
  collection, stage metrics)` if it is missing. The manifest keeps the accounting and the earlier stages'
  metrics (seconds, train_*), so a reused export reports them too."""
  path = stage_files(workdir)["export"][0]
  if os.path.exists(path):  # made under `settings` (check_cached_stages)
    logging.info("Reusing the export %s.", path)  # import_quantized verifies its arrays before sampling
    return path, _read_stage(npz.load_manifest, "export", path)["metadata"]["job_metrics"]
  quant, metrics = quantize_fn()
  metadata = dict(method=config.method, w_bits=config.quant.w_bits, a_bits=config.quant.a_bits,
                  settings=stages.canonical(settings))
  stats = quantized.export_quantized(path, model_cfg, params, quant, table, metadata, extra_stats=metrics)
  return path, stats


def check_settings(config, mesh) -> plan_lib.StepPlan:
  """Every setting of the job, validated before any work starts; returns the step plan."""
  check_single_process("quantize", ", then sample its export on the pod (configs/sample.py "
                                   "--config.params=<workdir>/quantized.npz)")
  plan = sample.check_settings(config.sample, mesh, "--config.sample.")
  if config.sample.cache_pattern:
    raise ValueError("The quantize job calibrates and samples every step in full; set --config.sample."
                     "cache_pattern='' (cache a quantized export with configs/dit_icc.py).")
  c = config.calib
  if c.num_images < 1 or not 1 <= c.omq_images_per_step <= c.num_images or c.act_sample_size < 0:
    raise ValueError(f"calib needs num_images >= 1, 1 <= omq_images_per_step <= num_images and act_sample_size "
                     f">= 0; got {c.num_images}, {c.omq_images_per_step}, {c.act_sample_size}.")
  parallel.check_batch_divisible(c.num_images, mesh)
  dit.check_compute_dtype(calib_dtype(config), "--config.calib.compute_dtype")
  dit.check_compute_dtype(config.distill.get("compute_dtype", "float32"), "--config.distill.compute_dtype")
  if config.distill.trajectories < 0:
    raise ValueError(f"distill.trajectories must be >= 0 (0 = no distillation); got {config.distill.trajectories}.")
  if any(k.cfg == "weak_guide" for k in plan.step_kinds):
    raise ValueError("The quantize job calibrates one network batch per step; weak guidance (t_weak_guide > "
                     "t_weak) runs two of different patch sizes. Set --config.sample.t_weak_guide=-1.")
  if config.distill.trajectories and len(plan.segments) > 1:
    raise ValueError("Distillation trains along one-patch-size plans only; quantize a FlexiDiT with weak steps "
                     "as PTQ (--config.distill.trajectories=0) or without them (--config.sample.t_weak=0).")
  if config.distill.trajectories:
    loop.check_settings(config.distill, "--config.distill.")
    distill_config(config)  # raises on a bad trd_grad, images, window
    parallel.check_batch_divisible(config.distill.images, mesh)
  return plan


def run(config, workdir: str) -> dict:
  mesh = parallel.make_mesh(config.num_devices or None)
  plan = check_settings(config, mesh)
  table = rules.quant_table(config.quant, len(plan.steps))
  model_cfg, params = sample.load_dit(config.params)
  decoder = sample.prepare_outputs(config.sample, model_cfg)
  spec_lib.check_table(table, dit.layer_paths(model_cfg))  # a mistyped keep_8bit pattern would match nothing
  sample.check_execution(config.sample, model_cfg, quantized.deployed_table(table))
  s = config.sample
  distiller = None
  if config.distill.trajectories:
    distiller = distill.Distiller(model_cfg, plan, table, distill_config(config), cfg_scale=s.cfg_scale, eta=s.eta,
                                  clip_x0=s.clip_x0, cfg_channels=s.get("cfg_channels", 0))
  # What each stage's result depends on (stage caches are reused only under equal settings). The quantizers'
  # gradient rule matters from distillation on; the OMQ search settings only where OMQ runs.
  without = lambda d, drop: {k: v for k, v in d.items() if k not in drop}
  omq_keys = () if config.quant.omq else ("omq_fractions", "omq_images_per_step")
  calib_settings = dict(
      params_sha256=stages.tree_sha256(params), model=model_cfg.record(),
      # the input part's and rotation's settings are recorded through the specs, an unrotated spec without the
      # key, a scalar-weight job without the VQ keys (wave-1 records stay valid)
      quant=without(config.quant.to_dict(), ("grad", "act", "act_granularity", "modiff", "rotate") + omq_keys +
                    (("weight", "vq") if config.quant.weight == "scalar" else ())),
      specs=[[pat, {k: without(v, ("grad",)) if isinstance(v, dict) else v for k, v in d.items()
                    if k != "rotate" or v}] for pat, d in spec_lib.table_to_list(table)],
      calib=without(config.calib.to_dict(),
                    omq_keys + (("compute_dtype",) if calib_dtype(config) == "float32" else ())),
      sampler=dict(diffusion_steps=s.diffusion_steps, spacing=s.spacing, cfg_scale=s.cfg_scale, eta=s.eta,
                   clip_x0=s.clip_x0, **sample.weak_settings(s),
                   **({"cfg_channels": s.cfg_channels} if s.get("cfg_channels", 0) else {})))
  pv_keys = () if config.quant.weight == "vq" else distill.PV_KEYS  # wave-1 records have none
  distill_settings = dict(calib_settings, grad=config.quant.grad,
                          distill={k: v for k, v in config.distill.to_dict().items()
                                   if k not in loop.LOOP_KEYS + pv_keys
                                   and not (k in distill.UNRECORDED_DEFAULTS and v == distill.UNRECORDED_DEFAULTS[k])})
  export_settings = dict(distill_settings if distiller is not None else calib_settings, method=config.method)
  check_cached_stages(workdir, dict(calibration=calib_settings, export=export_settings,
                                    distillation=distill_settings if distiller is not None else None))

  def quantize():
    quant, info = calibrated_quant(config, model_cfg, params, table, plan, mesh, workdir, calib_settings)
    metrics = dict(calib_seconds=info["seconds"], omq_mean_fraction=info["omq_mean_fraction"], distill_seconds=0.0,
                   **{k: info[k] for k in ("vq_mean_error", "vq_seconds") if k in info})
    q = quant
    if distiller is not None:
      q, distilled = distilled_quant(config, distiller, params, quant, mesh, workdir, distill_settings)
      metrics.update(distilled)
    metrics["quant_seconds"] = metrics["calib_seconds"] + metrics["distill_seconds"]
    return q, metrics

  path, job_metrics = exported(config, model_cfg, params, quantize, table, workdir, export_settings)
  result = dict(w_bits=config.quant.w_bits, a_bits=config.quant.a_bits, **job_metrics)
  model_cfg, variables, int_table = quantized.import_quantized(path)
  result.update(sample.sample_and_score(config.sample, plan, model_cfg, variables, workdir, mesh, int_table,
                                        decoder))
  bitops = flops.bitops_per_image(model_cfg, plan, config.sample.cfg_scale, int_table, variables.get("quant"),
                                  by_part=True)
  result["gbitops_per_image"] = sum(bitops.values()) / 1e9
  result.update({f"gbitops_{part}_per_image": v / 1e9 for part, v in bitops.items()})
  common.write_metrics(workdir, result)
  return result
