"""Quantization job: calibrate fake-quant layers on the FP trajectory, then sample and score the quantized DiT."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffq import calibrate, parallel, sampler
from diffq.jobs import common, sample
from diffq.models import dit, layers
from diffq.quant import policy


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


def bits_per_weight(params, table) -> float:
  """Average stored bits per weight of all matmul kernels and embeddings (float tables count 32 bits)."""
  total_bits = total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = [k.key for k in path]
    if names[-1] not in ("kernel", "embedding"):
      continue
    layer = "/".join(names[:-1])
    pol = layers.resolve_policy(layer, table) if names[-1] == "kernel" else layers.FLOAT
    total += leaf.size
    total_bits += leaf.size * (pol.w_bits if pol.kind == "fakequant" else 32)
  return total_bits / total


def run(config, workdir: str) -> dict:
  model_cfg, params = sample.load_dit(config.params)
  mesh = parallel.make_mesh(config.num_devices or None)
  table = policy.policy_table(config.quant, len(sampler.make_plan(config.sample.diffusion_steps,
                                                                  config.sample.spacing).steps))
  t0 = time.time()
  cal = calibration_set(config, model_cfg, params, mesh)
  quant, report = calibrate.calibrate(model_cfg, params, cal, table, tuple(config.quant.omq_fractions),
                                      config.calib.omq_images_per_step)
  quant_seconds = time.time() - t0
  logging.info("Calibrated in %.0f s; OMQ choices: %s", quant_seconds,
               {k: v["omq_k"] for k, v in report.items()})
  result = sample.sample_and_score(config.sample, model_cfg, {"params": params, "quant": quant}, workdir, mesh,
                                   table)
  result.update(w_bits=config.quant.w_bits, a_bits=config.quant.a_bits, quant_seconds=quant_seconds,
                bits_per_weight=bits_per_weight(params, table),
                omq_mean_fraction=float(np.mean([v["omq_k"] / v["out_channels"] for v in report.values()]))
                if report else 0.0)
  common.write_metrics(workdir, result)
  return result
