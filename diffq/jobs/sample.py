"""Sampling job: N class-balanced samples -> samples.npz (ADM: arr_0 uint8 NHWC, arr_1 labels), grid, metrics."""
from __future__ import annotations

import os
import time

import jax
import numpy as np
from absl import logging

from diffq import data, parallel, sampler, viz
from diffq.eval import flops
from diffq.io import npz
from diffq.jobs import common
from diffq.models import dit


def load_dit(path: str) -> tuple[dit.DiTConfig, dict]:
  """(DiTConfig, params) from a diffq export (manifest kind=dit_params) or a training workdir (latest EMA)."""
  if os.path.isdir(path):
    return _load_training_run(path)
  params, manifest = npz.import_npz(path)
  meta = manifest["metadata"]
  if meta.get("kind") != "dit_params" or "model" not in meta:
    raise ValueError(f"{path} is not a DiT parameter export (manifest metadata kind={meta.get('kind')!r}); "
                     "export one with diffq.io.npz.export_npz(..., metadata=dict(kind='dit_params', model=...)).")
  return dit.DiTConfig(**meta["model"]), params


def _load_training_run(workdir: str) -> tuple[dit.DiTConfig, dict]:
  import json
  import orbax.checkpoint as ocp
  from diffq.jobs import loop
  cfg_path = os.path.join(workdir, "config.json")
  if not os.path.exists(cfg_path) or not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise FileNotFoundError(f"{workdir} is not a diffq training workdir (needs config.json and checkpoints/).")
  with open(cfg_path) as f:
    model_cfg = dit.DiTConfig(**json.load(f)["model"])
  mngr = loop.open_readonly(workdir)
  if mngr.latest_step() is None:
    raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints yet.")
  state = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore())
  logging.info("Loaded EMA params of %s at step %d.", workdir, mngr.latest_step())
  return model_cfg, jax.device_get(state["ema"])


def make_sample_fn(model_cfg: dit.DiTConfig, plan: sampler.StepPlan, config, mesh, policies=()):
  """Jitted fn(variables, key, labels, ids) -> x_0; `variables` holds params (and quant for policies)."""
  model = dit.DiT(config=model_cfg, policies=tuple(policies))
  model_fn = lambda v, x, t, y, step: model.apply(v, x, t, y, step=step)
  shape = (model_cfg.input_size, model_cfg.input_size, model_cfg.in_channels)

  def fn(variables, key, labels, ids):
    return sampler.sample(model_fn, variables, key, labels, ids, plan=plan, shape=shape, method=config.method,
                          eta=config.eta, cfg_scale=config.cfg_scale, null_class=model_cfg.num_classes,
                          clip_x0=config.clip_x0)

  rep, bat = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(fn, in_shardings=(rep, rep, bat, bat), out_shardings=bat)


def generate(config, model_cfg, variables, mesh, policies=()) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 samples (N, H, W, C), labels (N,)); sample i has label i % num_classes and its own noise key.

  `variables` is {"params": ...} for the FP model, plus "quant" for a model under `policies`."""
  if config.num_samples <= 0:
    raise ValueError(f"num_samples must be positive; got {config.num_samples}.")
  parallel.check_batch_divisible(config.batch_size, mesh)
  plan = sampler.make_plan(config.diffusion_steps, config.spacing)
  fn = make_sample_fn(model_cfg, plan, config, mesh, policies)
  variables = jax.device_put(variables, parallel.replicated(mesh))
  key = jax.random.key(config.seed)
  ids = np.arange(config.num_samples)
  labels = (ids % model_cfg.num_classes).astype(np.int32)
  out = []
  progress = common.Progress(config.num_samples, unit="images", every_seconds=20)
  for start in range(0, config.num_samples, config.batch_size):
    b_ids = ids[start:start + config.batch_size]
    n = len(b_ids)
    pad = config.batch_size - n  # keep one compiled shape; padded rows are dropped
    b_ids_p = np.concatenate([b_ids, np.full(pad, b_ids[-1])]).astype(np.int32)
    b_lab, b_idp = parallel.shard_batch((labels[b_ids_p], b_ids_p), mesh)
    x = fn(variables, key, b_lab, b_idp)
    out.append(data.to_uint8(jax.device_get(x))[:n])
    progress(start + n)
  return np.concatenate(out), labels


def save_samples(path: str, images_u8: np.ndarray, labels: np.ndarray) -> None:
  def write(tmp):
    with open(tmp, "wb") as f:
      np.savez(f, arr_0=images_u8, arr_1=labels)
  npz._atomic_write(path, write)


def sample_and_score(config, model_cfg, variables, workdir: str, mesh, policies=()) -> dict:
  """Draws config.num_samples, writes samples.npz + grid.png, and returns sampling (+ evaluation) metrics."""
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  images, labels = generate(config, model_cfg, variables, mesh, policies)
  seconds = time.time() - t0
  save_samples(os.path.join(workdir, "samples.npz"), images, labels)
  viz.save_png(os.path.join(workdir, "grid.png"),
               viz.class_grid(images, labels, model_cfg.num_classes, config.grid_per_class))
  plan_steps = len(sampler.make_plan(config.diffusion_steps, config.spacing).steps)
  result = dict(num_samples=len(images), seconds=seconds, images_per_second=len(images) / seconds,
                spacing=config.spacing, method=config.method, cfg_scale=config.cfg_scale, seed=config.seed,
                gmacs_per_image=flops.macs_per_image(model_cfg, plan_steps, config.cfg_scale) / 1e9,
                params=sum(int(np.size(x)) for x in jax.tree.leaves(variables["params"])))
  if config.evaluate:
    from diffq.jobs import evaluate
    result.update(evaluate.score(config.eval, images, labels))
  logging.info("Wrote %d samples to %s (%.1f images/s).", len(images), workdir, result["images_per_second"])
  return result


def run(config, workdir: str) -> dict:
  model_cfg, params = load_dit(config.params)
  result = sample_and_score(config, model_cfg, {"params": params}, workdir,
                            parallel.make_mesh(config.num_devices or None))
  common.write_metrics(workdir, result)
  return result
