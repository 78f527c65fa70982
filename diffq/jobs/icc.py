"""ICC job: add increment-calibrated caches to a model's block linears, sample under a full/cached plan, score.

The model is the FP export or a quantize job's export (its weight and input parts stay as exported; ICC factors
the matmul weight the layer actually runs). Channel statistics for CA/CD-SVD come from one statistics pass over
the model's own full-step trajectory. metrics.json adds `gmacs_per_image` (every step by its kind, low-rank
terms included), `macs_vs_full` (its ratio to the same plan with every step full and no caches), the ICC
settings, `icc_params` (factor entries), `cache_bytes_per_image` (the sampler state, guidance rows included)
and `calib_seconds`.
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np
from absl import logging

from diffq import calibrate, parallel, plan as plan_lib
from diffq.eval import flops
from diffq.io import npz
from diffq.jobs import common, quantize, sample
from diffq.models import dit
from diffq.seam import rules, spec as spec_lib


def check_settings(config, mesh):
  """Validates the job's settings before any work; returns the plan."""
  quantize.check_single_process("icc")
  plan = sample.check_settings(config.sample, mesh, "--config.sample.")
  if not any(k.cache == "read" for k in plan.step_kinds):
    raise ValueError(f"The plan has no cached step (sample.cache_pattern={config.sample.cache_pattern!r}); use "
                     "'period:p' with p >= 2 or a pattern with C steps (the FP model samples with configs/sample.py).")
  if any(not isinstance(r, int) or r < 0 for r in config.icc.ranks.values()):
    raise ValueError(f"icc.ranks must be integers >= 0 (0 = naive reuse); got {dict(config.icc.ranks)}.")
  # raises on an unknown layer type, SVD, state dtype or MLP mode
  rules.icc_rules(config.icc.ranks, config.icc.svd, config.icc.state_dtype, config.icc.mlp)
  if config.calib.num_images < 1:
    raise ValueError(f"calib.num_images must be >= 1; got {config.calib.num_images}.")
  parallel.check_batch_divisible(config.calib.num_images, mesh)
  dit.check_compute_dtype(quantize.calib_dtype(config), "--config.calib.compute_dtype")
  return plan


def add_caches(model_cfg, variables, base_table, ranks: dict, svd: str, calibration_set=None,
               state_dtype: str = "float32", mlp: str = "layers", dtype: str = "float32") -> tuple:
  """(spec table, variables) of the model `variables` runs under `base_table`, with ICC cache parts at `ranks`
  ({layer type: rank}) and their factors; `calibration_set()` is called for the statistics pass only if the
  SVD needs channel statistics (`dtype`: that pass's compute dtype)."""
  table = spec_lib.with_parts(base_table, dit.layer_paths(model_cfg), rules.icc_rules(ranks, svd, state_dtype, mlp),
                              "cache")
  cal = calibration_set() if any(s.cache.stats for _, s in table) else None
  quant, _ = calibrate.calibrate(model_cfg, variables, cal, table, base_table=base_table, parts=("cache",),
                                 dtype=dtype)
  return table, {**variables, "quant": jax.device_get(quant)}


def run(config, workdir: str) -> dict:
  mesh = parallel.make_mesh(config.num_devices or None)
  plan = check_settings(config, mesh)
  model_cfg, variables, base_table = sample.load_model(config.params)
  decoder = sample.prepare_outputs(config.sample, model_cfg)
  if base_table:
    sample.check_plan_matches_export(config.sample, config.params)
  sample.check_execution(config.sample, model_cfg, base_table)
  t0 = time.time()
  table, variables = add_caches(
      model_cfg, variables, base_table, dict(config.icc.ranks), config.icc.svd,
      lambda: quantize.calibration_set(config, model_cfg, variables, plan, mesh, base_table), config.icc.state_dtype,
      config.icc.mlp, quantize.calib_dtype(config))
  calib_seconds = time.time() - t0
  icc_params = sum(int(np.size(v)) for k, v in npz.flatten(variables["quant"]).items()
                   if k.endswith(("icc_a", "icc_b")))
  logging.info("ICC factors ready in %.1f s (%d entries); sampling with pattern %s.", calib_seconds, icc_params,
               "".join("C" if k.cache == "read" else "F" for k in plan.step_kinds))
  result = dict(icc_svd=config.icc.svd, icc_mlp=config.icc.mlp, icc_state_dtype=config.icc.state_dtype,
                cache_pattern=config.sample.cache_pattern,
                **{f"icc_rank_{k}": v for k, v in config.icc.ranks.items()}, icc_params=icc_params,
                cached_steps=sum(k.cache == "read" for k in plan.step_kinds), calib_seconds=calib_seconds,
                cache_bytes_per_image=sample.state_bytes_per_image(model_cfg, variables, table,
                                                                   config.sample.cfg_scale),
                model=os.path.basename(config.params))
  result.update(sample.sample_and_score(config.sample, plan, model_cfg, variables, workdir, mesh, table, decoder))
  full = plan_lib.StepPlan(plan.schedule, plan.steps, ("full",) * len(plan.steps))
  result["macs_vs_full"] = result["gmacs_per_image"] * 1e9 / flops.macs_per_image(model_cfg, full,
                                                                                  config.sample.cfg_scale)
  common.write_metrics(workdir, result)
  return result
