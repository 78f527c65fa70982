"""Sampling job: N class-balanced samples -> samples.npz (ADM: arr_0 uint8 NHWC, arr_1 labels), grid, metrics."""
from __future__ import annotations

import os
import time

import jax
import numpy as np
from absl import logging

from diffq import data, parallel, plan as plan_lib, sampler, viz
from diffq.eval import flops
from diffq.io import diffusers_vae, npz, quantized
from diffq.jobs import common
from diffq.models import dit, flexi, vae
from diffq.seam import caches, matmuls, spec as spec_lib


def _setting(config, key: str, default):
  """config.key, or `default` for sampler settings that callers' configs (ConfigDicts, namespaces) may predate."""
  try:
    return getattr(config, key)
  except (AttributeError, KeyError):
    return default


def load_dit(path: str) -> tuple[dit.DiTConfig, dict]:
  """(DiTConfig, params) from a diffq export (manifest kind=dit_params) or a training workdir (latest EMA); the
  arrays are checked against the config's parameter shapes."""
  if os.path.isdir(path):
    return load_training_run(path)[:2]
  params, manifest = npz.import_npz(path)
  meta = manifest["metadata"]
  if meta.get("kind") != "dit_params" or "model" not in meta:
    hint = (" It is a quantized export: the sample job takes it as --config.params; quantizing needs the FP "
            "export it came from." if meta.get("kind") == quantized.KIND else "")
    raise ValueError(f"{path} is not a DiT parameter export (manifest metadata kind={meta.get('kind')!r}); "
                     "export one with diffq.io.npz.export_npz(..., metadata=dict(kind='dit_params', model=...))."
                     + hint)
  model_cfg = _model_config(meta["model"], path)
  npz.check_shapes(params, dit.variable_shapes(model_cfg)["params"], f"{path} (model {meta['model']})")
  return model_cfg, params


VAE_KIND = "vae_params"


def load_vae(path: str) -> tuple[vae.VAEConfig, dict]:
  """(VAEConfig, params) from a diffq VAE export (manifest kind=vae_params; configs/export_dit.py of a diffusers
  AutoencoderKL directory) or from that directory itself."""
  if os.path.isdir(path):
    return diffusers_vae.load_diffusers_vae(path)
  params, manifest = npz.import_npz(path)
  meta = manifest["metadata"]
  if meta.get("kind") != VAE_KIND or "model" not in meta:
    raise ValueError(f"{path} is not a VAE export (manifest metadata kind={meta.get('kind')!r}); make one with "
                     "configs/export_dit.py --config.source=<diffusers AutoencoderKL directory>.")
  try:
    cfg = vae.VAEConfig(**meta["model"])
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: its model config {meta['model']} is not a valid VAEConfig ({e}).") from None
  npz.check_shapes(params, vae.variable_shapes(cfg), f"{path} (VAE {meta['model']})")
  return cfg, params


def prepare_outputs(config, model_cfg: dit.DiTConfig) -> tuple[vae.VAEConfig, dict] | None:
  """Checks the output settings against the model before any work (grid classes, guided channels; a latent model
  needs a VAE of its latent channels) and returns the VAE that turns its samples into images (config.vae), or
  None for a pixel-space model."""
  grid_classes(config, model_cfg)
  if not 0 <= _setting(config, "cfg_channels", 0) <= model_cfg.in_channels:
    raise ValueError(f"cfg_channels={config.cfg_channels} must lie in 0..{model_cfg.in_channels} (the model's eps "
                     "channels; 0 = all).")
  path = _setting(config, "vae", "")
  if not path:
    if model_cfg.in_channels not in (1, 3):
      raise ValueError(f"The model samples {model_cfg.in_channels}-channel latents: set --config.vae (a VAE "
                       "export, e.g. SD-VAE from configs/export_dit.py) so samples become images.")
    return None
  if not os.path.exists(path):
    raise FileNotFoundError(f"No VAE at {path} (--config.vae): export one with configs/export_dit.py "
                            "--config.source=<diffusers AutoencoderKL directory, e.g. sd-vae-ft-ema>.")
  vae_cfg, params = load_vae(path)
  if vae_cfg.latent_channels != model_cfg.in_channels:
    raise ValueError(f"The VAE at {path} has {vae_cfg.latent_channels} latent channels, the model samples "
                     f"{model_cfg.in_channels}.")
  return vae_cfg, params


def make_decode_fn(vae_cfg: vae.VAEConfig, mesh):
  """Jitted fn(vae params, latents as the DiT samples them (scaled)) -> images in [-1, 1], batch-sharded."""
  rep, bat = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(lambda p, z: vae.decode(vae_cfg, p, z / vae_cfg.scaling_factor), in_shardings=(rep, bat),
                 out_shardings=bat)


def load_model(path: str) -> tuple[dit.DiTConfig, dict, tuple]:
  """(DiTConfig, variables, spec table) of an FP export / training workdir (table ()) or of a quantized export
  (`quantize` job's quantized.npz: its deployed table): anything the sampler can run."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"No model at {path}: set --config.params to a diffq export (.npz with its .json "
                            "manifest), a quantized export or a training workdir.")
  if not os.path.isdir(path) and npz.load_manifest(path)["metadata"].get("kind") == quantized.KIND:
    return quantized.import_quantized(path)
  model_cfg, params = load_dit(path)
  return model_cfg, {"params": params}, ()


def check_plan_matches_export(config, path: str) -> None:
  """A quantized export keeps one activation quantizer per step of the plan it was calibrated on: sampling it
  with another timestep plan would apply them to the wrong steps, so the plan must be the same."""
  made = npz.load_manifest(path)["metadata"].get("settings", {}).get("sampler")
  if made is None:
    raise ValueError(f"{path} does not record the sampler it was calibrated for (written by an older diffq); "
                     "re-export it with the quantize job.")
  wanted = dict(diffusion_steps=config.diffusion_steps, spacing=config.spacing, **weak_settings(config))
  wrong = [f"{k}: export {made.get(k, 0)!r}, config {v!r}" for k, v in wanted.items() if made.get(k, 0) != v]
  wrong += [f"{k}: export {made[k]!r}, config 0" for k in WEAK_KEYS if k in made and k not in wanted]
  if wrong:
    raise ValueError(f"{path} was calibrated for another timestep plan ({'; '.join(wrong)}); its per-step "
                     "activation quantizers fit only that plan. Sample it with the plan it was made for, or "
                     "quantize again under the new one.")


WEAK_KEYS = ("t_weak", "t_weak_guide", "weak_patch")


def weak_settings(config) -> dict:
  """The FlexiDiT plan settings of a sample config that change its plan ({} without weak steps, so the records
  of plans without them stay as they were)."""
  if not config.get("t_weak", 0) and config.get("t_weak_guide", -1) <= 0:
    return {}
  return {k: config[k] for k in WEAK_KEYS}


def _model_config(fields: dict, path: str) -> dit.DiTConfig:
  try:
    return dit.DiTConfig(**fields)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: its model config {fields} is not a valid DiTConfig ({e}).") from None


def load_training_run(workdir: str) -> tuple[dit.DiTConfig, dict, int]:
  """(DiTConfig, EMA params, step) of the newest restorable checkpoint of a training workdir."""
  import json
  from diffq.jobs import loop
  cfg_path = os.path.join(workdir, "config.json")
  if not os.path.exists(cfg_path) or not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise FileNotFoundError(f"{workdir} is not a diffq training workdir (needs config.json and checkpoints/).")
  with open(cfg_path) as f:
    model_cfg = _model_config(json.load(f)["model"], cfg_path)
  mngr = loop.open_readonly(workdir)
  if mngr.latest_step() is None:
    raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints yet.")
  state, _ = loop.restore_latest(mngr, set_aside=False)
  logging.info("Loaded EMA params of %s at step %d.", workdir, int(state["step"]))
  params = parallel.tree_to_host(flexi.tie(state["ema"], model_cfg))  # a FlexiDiT run trains the untied params
  npz.check_shapes(params, dit.variable_shapes(model_cfg)["params"], f"{workdir} (model {model_cfg})")
  return model_cfg, params, int(state["step"])


def make_sample_fn(model_cfg: dit.DiTConfig, plan: plan_lib.StepPlan, config, mesh, specs=()):
  """Jitted fn(variables, key, labels, ids) -> x_0; `variables` holds params (and quant for `specs`' parts). The
  model's state (if its parts keep any) is allocated per batch and rides in the sampler's carry."""
  model = dit.DiT(config=model_cfg, specs=tuple(specs), dtype=_setting(config, "compute_dtype", "float32"))
  shape = (model_cfg.input_size, model_cfg.input_size, model_cfg.in_channels)

  def fn(variables, key, labels, ids):
    rows = labels.shape[0] * (2 if config.cfg_scale != 1.0 else 1)
    return sampler.sample(dit.model_fn(model), variables, key, labels, ids, plan=plan, shape=shape,
                          method=config.method, eta=config.eta, cfg_scale=config.cfg_scale,
                          null_class=model_cfg.num_classes, clip_x0=config.clip_x0,
                          state=dit.init_states(model, variables, rows, plan),
                          cfg_channels=_setting(config, "cfg_channels", 0))

  rep, bat = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(fn, in_shardings=(rep, rep, bat, bat), out_shardings=bat)


def make_plan(config) -> plan_lib.StepPlan:
  """The step plan of a sample config: its timesteps, cache pattern and FlexiDiT weak steps."""
  weak = dict(weak_patch=config.get("weak_patch", 0), t_weak=config.get("t_weak", 0),
              t_weak_guide=None if config.get("t_weak_guide", -1) < 0 else config.t_weak_guide)
  return plan_lib.make_plan(config.diffusion_steps, config.spacing, pattern=config.cache_pattern, **weak)


def check_settings(config, mesh, prefix: str = "--config.") -> plan_lib.StepPlan:
  """Validates every sampling (and scoring) setting before any work starts; returns the step plan. `prefix` is
  where these settings live on the command line (the quantize job nests them under sample.)."""
  for key in ("num_samples", "batch_size", "diffusion_steps"):
    if not isinstance(config[key], int) or config[key] <= 0:
      raise ValueError(f"{key} must be a positive integer; got {config[key]!r}. Set {prefix}{key}=N.")
  if config.grid_per_class < 0:
    raise ValueError(f"grid_per_class must be >= 0; got {config.grid_per_class}. Set {prefix}grid_per_class.")
  if config.method not in sampler.METHODS:
    raise ValueError(f"Unknown sampling method {config.method!r}; set {prefix}method to one of {sampler.METHODS}.")
  if not config.eta >= 0.0 or (config.method == "ddpm" and config.eta):
    raise ValueError(f"eta must be >= 0 (and is only used by ddim); got eta={config.eta} with {config.method}. "
                     f"Set {prefix}eta.")
  if not config.cfg_scale >= 0.0:
    raise ValueError(f"cfg_scale must be >= 0 (0 = unconditional, 1 = no guidance); got {config.cfg_scale}. "
                     f"Set {prefix}cfg_scale.")
  dit.check_compute_dtype(_setting(config, "compute_dtype", "float32"), f"{prefix}compute_dtype")
  if _setting(config, "execution", "float") not in EXECUTIONS:
    raise ValueError(f"Unknown execution {config.execution!r}; set {prefix}execution to one of {EXECUTIONS}.")
  parallel.check_batch_divisible(config.batch_size, mesh)
  try:
    plan = make_plan(config)
  except ValueError as e:
    raise ValueError(f"{e} (settings {prefix}t_weak, {prefix}t_weak_guide, {prefix}weak_patch, "
                     f"{prefix}cache_pattern)") from None
  if config.evaluate:
    from diffq.jobs import evaluate
    evaluate.check_settings(config.eval, f"{prefix}eval.data_dir")
  return plan


EXECUTIONS = ("float", "integer")  # config.execution: the matmul part quantized layers run with


def _integer_specs(model_cfg: dit.DiTConfig, specs) -> tuple[tuple, dict[str, str], int]:
  """(table with integer matmuls where the parts allow it, {path: why not}, number of integer layers); raises
  when there is none."""
  table, kept = spec_lib.with_integer_matmuls(specs, dit.layer_paths(model_cfg))
  n = sum(isinstance(s.matmul, matmuls.Integer) for _, s in table)
  if not n:
    example = f" (e.g. {next(iter(kept.items()))[0]}: {next(iter(kept.values()))})" if kept else ""
    raise ValueError("execution='integer' found no layer that can run as an integer matmul" + example + ". It "
                     "runs the per-channel codes of a quantized export whose inputs are quantized by static or "
                     "dynamic quantizers (the quantize job with act=static or act=dynamic); otherwise set "
                     "execution='float'.")
  return table, kept, n


def check_execution(config, model_cfg: dit.DiTConfig, specs) -> None:
  """Raises before any work if config.execution cannot run under `specs` (the table the job will sample)."""
  if _setting(config, "execution", "float") == "integer":
    _integer_specs(model_cfg, specs)


def execution_specs(config, model_cfg: dit.DiTConfig, specs) -> tuple[tuple, dict]:
  """(the spec table the sampler runs under config.execution, its record for metrics.json): 'float' keeps
  `specs`; 'integer' runs every layer whose parts allow it as an int8 matmul with int32 sums
  (`spec.with_integer_matmuls`: deployed per-channel codes with static or dynamic inputs), the other quantized
  layers (logged with the reason) keep the float matmul."""
  mode = _setting(config, "execution", "float")
  if mode == "float":
    return tuple(specs), dict(execution=mode)
  table, kept, n = _integer_specs(model_cfg, specs)
  for p, why in kept.items():
    logging.info("Layer %s keeps the float matmul: %s.", p, why)
  logging.info("Integer execution: %d layers run int8 matmuls, %d quantized layers keep float ones.", n, len(kept))
  return table, dict(execution=mode, integer_layers=n, float_quantized_layers=len(kept))


def check_plan_caches(plan: plan_lib.StepPlan, model_cfg: dit.DiTConfig, specs) -> None:
  """A plan with cached steps needs layers with a cache part: otherwise its cached steps would silently run in
  full."""
  cached = sorted({k.name for k in plan.step_kinds if k.cache == "read"})
  if cached and not any(not isinstance(spec_lib.resolve(p, specs).cache, caches.NoCache)
                        for p in dit.layer_paths(model_cfg)):
    raise ValueError(f"The plan has cached steps ({cached}, cache_pattern) but no layer of the model has a cache "
                     "part, so they would run in full: sample with configs/dit_icc.py, or set cache_pattern=''.")


def check_plan_patch_sizes(plan: plan_lib.StepPlan, model_cfg: dit.DiTConfig) -> None:
  """Every patch size the plan's steps (and weak guidance branches) ask for is one the model runs at."""
  for size in sorted({p for k in plan.step_kinds for p in (k.patch_size, k.guide_patch_size)}):
    model_cfg.patch(size)


def generate(config, plan: plan_lib.StepPlan, model_cfg, variables, mesh, specs=(),
             decoder=None) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 samples (N, H, W, C), labels (N,)) drawn under `plan`; sample i has label i % num_classes and its
  own noise key. `variables` is {"params": ...} for the FP model, plus "quant" for a model under `specs`.
  `decoder` (VAEConfig, params): the samples are latents, decoded to images on the devices, batch by batch."""
  if config.num_samples <= 0:
    raise ValueError(f"num_samples must be positive; got {config.num_samples}.")
  check_plan_caches(plan, model_cfg, specs)
  check_plan_patch_sizes(plan, model_cfg)
  parallel.check_batch_divisible(config.batch_size, mesh)
  fn = make_sample_fn(model_cfg, plan, config, mesh, specs)
  variables = jax.device_put(variables, parallel.replicated(mesh))
  if decoder is not None:
    decode, vae_params = make_decode_fn(decoder[0], mesh), jax.device_put(decoder[1], parallel.replicated(mesh))
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
    if decoder is not None:
      x = decode(vae_params, x)
    x = parallel.to_host(x)[:n]  # every process gets the whole batch: all its shards, merged
    if not np.isfinite(x).all():
      raise FloatingPointError(
          f"The sampler returned NaN/inf for {int((~np.isfinite(x)).any(axis=(1, 2, 3)).sum())} of samples "
          f"{start}..{start + n - 1}: the model's outputs are not finite (a diverged or damaged export?). Nothing "
          "was written; check the model (quantize job: lower the distillation learning rates).")
    out.append(data.to_uint8(x))
    progress(start + n)
  return np.concatenate(out), labels


def grid_classes(config, model_cfg: dit.DiTConfig) -> list[int]:
  """The classes grid.png shows (config.grid_classes, "a,b,c"; "" = every class)."""
  spec = _setting(config, "grid_classes", "")
  classes = [int(k) for k in str(spec).split(",")] if spec else list(range(model_cfg.num_classes))
  bad = [k for k in classes if not 0 <= k < model_cfg.num_classes]
  if bad:
    raise ValueError(f"grid_classes {bad} are not classes of the model (0..{model_cfg.num_classes - 1}).")
  return classes


def save_samples(path: str, images_u8: np.ndarray, labels: np.ndarray) -> None:
  def write(tmp):
    with open(tmp, "wb") as f:
      np.savez(f, arr_0=images_u8, arr_1=labels)
  npz.atomic_write(path, write)


def state_bytes_per_image(model_cfg, variables, specs, cfg_scale: float) -> int:
  """Bytes of the sampler state (ICC caches, MoDiff reconstructions) one image carries (2 rows under CFG)."""
  model = dit.DiT(config=model_cfg, specs=tuple(specs))
  rows = 2 if cfg_scale != 1.0 else 1
  state = jax.eval_shape(lambda v: dit.init_state(model, v, rows), variables)
  return int(sum(np.prod(s.shape) * s.dtype.itemsize for s in jax.tree.leaves(state)))


def sample_and_score(config, plan: plan_lib.StepPlan, model_cfg, variables, workdir: str, mesh,
                     specs=(), decoder=None) -> dict:
  """Draws config.num_samples under `plan` (matmuls as config.execution says), writes samples.npz + grid.png, and
  returns sampling (+ evaluation) metrics (`state_bytes_per_image`: the sampler state one image carries)."""
  specs, record = execution_specs(config, model_cfg, specs)
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  images, labels = generate(config, plan, model_cfg, variables, mesh, specs, decoder)
  seconds = time.time() - t0
  if jax.process_index() == 0:  # one samples.npz of every process's samples
    save_samples(os.path.join(workdir, "samples.npz"), images, labels)
    viz.save_png(os.path.join(workdir, "grid.png"),
                 viz.class_grid(images, labels, grid_classes(config, model_cfg), config.grid_per_class))
  result = dict(num_samples=len(images), seconds=seconds, images_per_second=len(images) / seconds,
                spacing=config.spacing, method=config.method, cfg_scale=config.cfg_scale, seed=config.seed,
                gmacs_per_image=flops.macs_per_image(model_cfg, plan, config.cfg_scale, specs) / 1e9,
                params=sum(int(np.prod(x.shape)) for x in  # the model's weights, whatever the export stores
                           jax.tree.leaves(dit.variable_shapes(model_cfg)["params"])),
                state_bytes_per_image=state_bytes_per_image(model_cfg, variables, specs, config.cfg_scale),
                devices=int(mesh.devices.size), processes=jax.process_count(), **record)
  if config.evaluate:
    from diffq.jobs import evaluate
    result.update(evaluate.score(config.eval, images, labels))
  logging.info("Wrote %d samples to %s (%.1f images/s).", len(images), workdir, result["images_per_second"])
  return result


def run(config, workdir: str) -> dict:
  mesh = parallel.make_mesh(config.num_devices or None)
  plan = check_settings(config, mesh)
  model_cfg, variables, table = load_model(config.params)
  decoder = prepare_outputs(config, model_cfg)
  if table:
    check_plan_matches_export(config, config.params)
  result = sample_and_score(config, plan, model_cfg, variables, workdir, mesh, table, decoder)
  common.write_metrics(workdir, result)
  return result
