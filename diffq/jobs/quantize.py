"""Quantization job: calibrate (+ OMQ) -> distill (LoRA + TRD) -> export integer codes -> sample -> evaluate.

Every stage leaves its result in the workdir and is skipped when re-run: `calibrated_quant.npz`, the
distillation's orbax checkpoints (resumed mid-run), `quantized.npz` (packed integer codes + scales). The
samples are drawn from the re-imported integer export, i.e. from exactly what is shipped.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffq import calibrate, distill, parallel, sampler
from diffq.io import npz
from diffq.jobs import common, loop, sample
from diffq.models import dit, layers
from diffq.quant import export, policy


def calibration_set(config, model_cfg, params, mesh) -> calibrate.CalibrationSet:
  """FP DDIM trajectory of `calib.num_images` class-balanced images under the evaluation sampler settings."""
  s = config.sample
  plan = sampler.make_plan(s.diffusion_steps, s.spacing)
  n = config.calib.num_images
  parallel.check_batch_divisible(n, mesh)
  labels = jax.device_put(jnp.arange(n, dtype=jnp.int32) % model_cfg.num_classes, parallel.batch_sharded(mesh))
  model = dit.DiT(config=model_cfg)
  fn = lambda p, x, t, y, step: model.apply({"params": p}, x, t, y, step=step)
  shape = (model_cfg.input_size, model_cfg.input_size, model_cfg.in_channels)
  traj = jax.jit(lambda p, lab: calibrate.fp_trajectory(fn, p, jax.random.key(config.calib.seed), lab, plan, shape,
                                                         s.cfg_scale, model_cfg.num_classes, s.eta, s.clip_x0))
  return calibrate.CalibrationSet(traj(jax.device_put(params, parallel.replicated(mesh)), labels), labels, plan,
                                  s.cfg_scale, model_cfg.num_classes)


def calibrated_quant(config, model_cfg, params, table, mesh, workdir) -> tuple[dict, dict]:
  """(`quant` collection, info) from workdir/calibrated_quant.npz, calibrating first if it is missing."""
  path = os.path.join(workdir, "calibrated_quant.npz")
  if os.path.exists(path):
    quant, manifest = npz.import_npz(path)
    logging.info("Reusing the calibration in %s.", path)
    return quant, manifest["metadata"]
  t0 = time.time()
  cal = calibration_set(config, model_cfg, params, mesh)
  quant, report = calibrate.calibrate(model_cfg, params, cal, table, tuple(config.quant.omq_fractions),
                                      config.calib.omq_images_per_step, config.calib.act_sample_size)
  info = dict(kind="calibrated_quant", seconds=time.time() - t0,
              omq_k={p: r["omq_k"] for p, r in report.items()},
              omq_mean_fraction=float(np.mean([r["omq_k"] / r["out_channels"] for r in report.values()]))
              if report else 0.0)
  logging.info("Calibrated in %.0f s; OMQ k per layer: %s", info["seconds"], info["omq_k"])
  npz.export_npz(path, jax.device_get(quant), metadata=info)
  return quant, info


def distill_config(config) -> distill.DistillConfig:
  d = config.distill
  return distill.DistillConfig(trajectories=d.trajectories, images=d.images, seed=d.seed,
                               lora_lr_divisor=d.lora_lr_divisor, w_quant_lr=d.w_quant_lr, a_quant_lr=d.a_quant_lr,
                               weight_decay=d.weight_decay, trd_weight=d.trd_weight, trd_window=d.trd_window,
                               trd_grad=d.trd_grad)


def distilled_quant(config, model_cfg, params, quant, table, mesh, workdir) -> tuple[dict, dict]:
  """Runs (or resumes) the distillation loop from the calibrated `quant`; returns (quant, metrics)."""
  s = config.sample
  plan = sampler.make_plan(s.diffusion_steps, s.spacing)
  d = distill.Distiller(model_cfg, plan, table, distill_config(config), cfg_scale=s.cfg_scale, eta=s.eta,
                        clip_x0=s.clip_x0)
  parallel.check_batch_divisible(d.cfg.images, mesh)
  state, frozen = d.init_state(quant)
  rep = parallel.replicated(mesh)
  state, frozen, params = jax.device_put((state, frozen, params), rep)
  ddir = os.path.join(workdir, "distill")
  writer = common.metric_writer(ddir)
  mngr = loop.checkpoint_manager(ddir, config.distill)
  state = loop.restore_latest(mngr, state)
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
                                      num_steps=d.num_steps, log_every=config.distill.log_every)
  writer.flush()
  return jax.device_get(d.merged_quant(state, frozen)), dict(distill_seconds=seconds, **final)


def run(config, workdir: str) -> dict:
  model_cfg, params = sample.load_dit(config.params)
  mesh = parallel.make_mesh(config.num_devices or None)
  num_steps = len(sampler.make_plan(config.sample.diffusion_steps, config.sample.spacing).steps)
  table = policy.policy_table(config.quant, num_steps)
  layer_paths = sorted({k.rsplit("/", 1)[0] for k in npz.flatten(calibrate.quant_template(model_cfg, table))})
  layers.check_policy_table(table, layer_paths)  # a mistyped keep_8bit pattern would silently match nothing
  result = dict(w_bits=config.quant.w_bits, a_bits=config.quant.a_bits)
  quant, info = calibrated_quant(config, model_cfg, params, table, mesh, workdir)
  result.update(calib_seconds=info["seconds"], omq_mean_fraction=info["omq_mean_fraction"], distill_seconds=0.0)
  if config.distill.trajectories:
    quant, metrics = distilled_quant(config, model_cfg, params, quant, table, mesh, workdir)
    result.update(metrics)
  result["quant_seconds"] = result["calib_seconds"] + result["distill_seconds"]
  path = os.path.join(workdir, "quantized.npz")
  stats = export.export_quantized(path, model_cfg, params, quant, table,
                                  metadata=dict(method=config.method, w_bits=config.quant.w_bits,
                                                a_bits=config.quant.a_bits))
  result.update(stats)
  model_cfg, variables, int_table = export.import_quantized(path)
  result.update(sample.sample_and_score(config.sample, model_cfg, variables, workdir, mesh, int_table),
                params=sum(int(np.size(x)) for x in jax.tree.leaves(params)))  # weights of the model, not the file
  common.write_metrics(workdir, result)
  return result
