"""Training job: data-parallel jit over a Mesh, EMA, orbax CheckpointManager with resume, clu writers.

FlexiDiT fine-tuning (model.patch_sizes, `init` a plain DiT export): each step runs at one patch size drawn on
the host from (seed, step) (a static argument: one compilation per size, big_vision's FlexiViT trainer), on DiT's
loss, plus with `flexi.distill` > 0 on steps at a further size the eps MSE to the frozen initial model at the
model's own size (the paper's distillation) and with `flexi.anchor` > 0 the same on steps at the model's own size
(keeping the powerful mode near the initial one). Training updates the underlying boundary kernels
(diffq/models/flexi.py `untie`); the exported params are tied. `flexi.freeze_base` is the paper's LoRA variant
(with model.flexi_lora_rank): only the further sizes' leaves train, the model's own forward stays bit for bit.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from diffq import configlib, data, imagenet, parallel, plan as plan_lib
from diffq.diffusion import gaussian
from diffq.io import npz
from diffq.models import dit, flexi
from diffq.jobs import common, loop


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW at config.lr after a linear warm-up; with `flexi.weak_lr` > 0 the leaves of the further patch sizes
  alone (`weak_leaves`) at that lr; with `flexi.freeze_base` every other leaf is frozen (its gradient zeroed
  before clipping, its update exactly zero)."""
  def adamw(lr):
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(config.warmup_steps, 1)), optax.constant_schedule(lr)],
        [max(config.warmup_steps, 1)])
    return optax.adamw(schedule, weight_decay=config.weight_decay)

  clip = optax.clip_by_global_norm(config.grad_clip) if config.grad_clip else optax.identity()
  f = config.get("flexi", {})
  weak_lr, freeze = f.get("weak_lr", 0.0), f.get("freeze_base", False)
  if not weak_lr and not freeze:
    return optax.chain(clip, adamw(config.lr))
  frozen = lambda params: jax.tree.map(lambda w: freeze and not w, weak_leaves(params))
  label = lambda params: jax.tree.map(lambda w: "weak" if w else "frozen" if freeze else "shared",
                                      weak_leaves(params))
  transforms = {"weak": adamw(weak_lr or config.lr), "shared": adamw(config.lr), "frozen": optax.set_to_zero()}
  zero = [optax.masked(optax.set_to_zero(), frozen)] if freeze else []
  return optax.chain(*zero, clip, optax.multi_transform(transforms, label))


def weak_leaves(params) -> dict:
  """True for the leaves of the further patch sizes (a name in their path ends in _p<size>: boundary layers,
  patch-size embeddings, affines, LoRAs), False for the rest (the base)."""
  return flax.traverse_util.path_aware_map(lambda path, _: any(re.fullmatch(r".+_p\d+", k) for k in path), params)


def initial_params(config, model_cfg: dit.DiTConfig) -> dict:
  """DiT's initialisation, or with `config.init` a plain DiT export at model.patch_size: its params, the further
  patch sizes' boundary layers solved from it (flexi.from_plain) so its own size's forward is unchanged."""
  params = dit.init_params(model_cfg, jax.random.key(config.seed))
  if not config.get("init"):
    return params
  from diffq.jobs import sample
  plain_cfg, plain = sample.load_dit(config.init)
  if dataclasses.replace(model_cfg, patch_sizes=(), flexi_tied=True, flexi_lora_rank=0) != plain_cfg:
    raise ValueError(f"config.init {config.init} is a {plain_cfg}; the model to train differs beyond its "
                     f"patch_sizes ({model_cfg}). Set --config.model to the export's architecture.")
  return flexi.from_plain(plain, model_cfg, params, config.get("flexi", {}).get("null_init", 0.0))


def init_state(config, model_cfg: dit.DiTConfig) -> dict:
  params = flexi.untie(initial_params(config, model_cfg), model_cfg)
  return dict(step=jnp.zeros((), jnp.int32), params=params, ema=jax.tree.map(jnp.copy, params),
              opt_state=make_optimizer(config).init(params))


def patch_size_at(config, model_cfg: dit.DiTConfig, step: int) -> int:
  """The patch size of training step `step`: drawn from (seed, step) with probabilities `flexi.probs` over
  model_cfg.patch_sizes_all ('' = uniform); the model's own for a plain DiT."""
  sizes = model_cfg.patch_sizes_all
  if len(sizes) == 1:
    return sizes[0]
  probs = flexi_probs(config, model_cfg)
  return int(np.random.default_rng([config.seed, step]).choice(sizes, p=probs))


def flexi_probs(config, model_cfg: dit.DiTConfig) -> np.ndarray:
  """The per-step patch-size probabilities (`flexi.probs`), checked against the other flexi settings."""
  sizes = model_cfg.patch_sizes_all
  f = config.get("flexi", {})
  text = f.get("probs", "")
  probs = np.full(len(sizes), 1.0 / len(sizes)) if not text else np.array([float(v) for v in text.split(",")])
  if len(probs) != len(sizes) or (probs < 0).any() or not np.isclose(probs.sum(), 1.0):
    raise ValueError(f"flexi.probs {text!r} must be {len(sizes)} comma-separated probabilities summing to 1, one "
                     f"per patch size {sizes} (the model's own first).")
  if f.get("freeze_base", False):
    if len(sizes) == 1 or model_cfg.flexi_tied:
      raise ValueError("flexi.freeze_base trains only the further patch sizes' own leaves: set model.patch_sizes "
                       "and model.flexi_tied=False (tied boundary layers would change the model's own).")
    if probs[0] or f.get("anchor", 0.0):
      raise ValueError(f"flexi.freeze_base: steps at the model's own patch size {sizes[0]} train nothing; set its "
                       "flexi.probs entry to 0 (e.g. '0,1') and flexi.anchor=0.")
  return probs / probs.sum()


def train_step(state, x0, y, teacher=None, *, config, model_cfg, schedule, patch_size: int = 0):
  """One AdamW step on the DiT hybrid loss at `patch_size` (+ `flexi.distill`, at the model's own size
  `flexi.anchor`, x the eps MSE to `teacher`'s prediction at the model's own size); the per-step RNG is
  fold_in(seed, step), so it is stateless."""
  model = dit.DiT(config=model_cfg, dtype=config.get("compute_dtype", "float32"))  # the teacher runs in it too
  p = model_cfg.patch(patch_size)
  ctx = plan_lib.StepContext(kind=plan_lib.KINDS[plan_lib.at_patch("full", 0 if p == model_cfg.patch_size else p)])
  rng = jax.random.fold_in(jax.random.key(config.seed + 1), state["step"])
  r_t, r_noise, r_drop = jax.random.split(rng, 3)
  t = jax.random.randint(r_t, (x0.shape[0],), 0, schedule.num_steps)
  noise = jax.random.normal(r_noise, x0.shape)
  c = x0.shape[-1]

  def loss_fn(trained):
    params = flexi.tie(trained, model_cfg)
    outs = {}

    def fn(xt, tt):
      outs["eps"] = model.apply({"params": params}, xt, tt, y, train=True, ctx=ctx,
                                rngs={"label_dropout": r_drop})
      return outs["eps"]

    terms = gaussian.training_losses(schedule, fn, x0, t, noise)
    loss = jnp.mean(terms["loss"])
    metrics = {k: jnp.mean(v) for k, v in terms.items()}
    if teacher is not None:  # the same x_t and dropped labels at the model's own size, frozen
      ref = model.apply({"params": teacher}, gaussian.q_sample(schedule, x0, t, noise), t, y, train=True,
                        rngs={"label_dropout": r_drop})
      metrics["distill"] = jnp.mean((outs["eps"][..., :c] - jax.lax.stop_gradient(ref[..., :c])) ** 2)
      weight = config.flexi.distill if p != model_cfg.patch_size else config.flexi.anchor
      loss = loss + weight * metrics["distill"]
    return loss, metrics

  grads, metrics = jax.grad(loss_fn, has_aux=True)(state["params"])
  updates, opt_state = make_optimizer(config).update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  decay = config.ema_decay
  if config.get("ema_warmup", False):  # (1 + n) / (10 + n) caps the decay: no share of the init survives
    decay = jnp.minimum(decay, (1.0 + state["step"]) / (10.0 + state["step"]))
  ema = optax.incremental_update(params, state["ema"], 1.0 - decay)
  if config.get("flexi", {}).get("freeze_base", False):  # the frozen leaves' average stays them, bit for bit
    ema = jax.tree.map(lambda w, e, p: e if w else p, weak_leaves(params), ema, params)
  metrics["grad_norm"] = optax.tree.norm(grads)
  return dict(step=state["step"] + 1, params=params, ema=ema, opt_state=opt_state), metrics


def compile_train_step(config, model_cfg, mesh, state, patch_size: int = 0, teacher=None):
  """Jitted step(state, x0, y) at `patch_size`: state replicated, batch split over 'data'; XLA inserts the
  gradient all-reduce. `teacher` (replicated params): distil towards it (see train_step)."""
  schedule = gaussian.Schedule.from_betas(gaussian.linear_betas(config.diffusion_steps))
  fn = functools.partial(train_step, config=config, model_cfg=model_cfg, schedule=schedule, patch_size=patch_size)
  if teacher is None:
    return parallel.jit_train_step(fn, mesh, state)
  step = parallel.jit_train_step(lambda st, x, y, te: fn(st, x, y, te), mesh, state, num_batch_args=2,
                                 num_const_args=1)
  return lambda st, x, y: step(st, x, y, teacher)


def compile_train_steps(config, model_cfg, mesh, state) -> dict:
  """{patch size: compiled step} for every size the model trains at; steps at a further size distil from the
  initial params when flexi.distill > 0, steps at the model's own size when flexi.anchor > 0."""
  f = config.get("flexi", {})
  weight = lambda p: f.get("distill", 0.0) if p != model_cfg.patch_size else f.get("anchor", 0.0)
  sizes = model_cfg.patch_sizes_all
  if any(weight(p) for p in sizes) and not config.get("init"):
    raise ValueError("flexi.distill / flexi.anchor distil from the initial model: set config.init to the plain "
                     "DiT export.")
  teacher = None
  if any(weight(p) for p in sizes):
    teacher = jax.device_put(initial_params(config, model_cfg), parallel.replicated(mesh))
  return {p: compile_train_step(config, model_cfg, mesh, state, p, teacher if weight(p) else None) for p in sizes}


DATA_KINDS = ("fashion_mnist", "latents")  # config.data.kind


def check_data(config, model_cfg: dit.DiTConfig) -> str:
  """The training data's kind (config.data.kind), checked against the model before any work."""
  kind = config.data.get("kind", "fashion_mnist")
  if kind not in DATA_KINDS:
    raise ValueError(f"Unknown data.kind {kind!r}; choose one of {DATA_KINDS}.")
  if kind == "fashion_mnist" and (model_cfg.input_size, model_cfg.in_channels, model_cfg.num_classes) != (
      32, 1, data.NUM_CLASSES):
    raise ValueError("Fashion-MNIST training needs model.input_size 32, in_channels 1 and num_classes 10; got "
                     f"{model_cfg.input_size}, {model_cfg.in_channels}, {model_cfg.num_classes}.")
  return kind


def training_data(config, model_cfg: dit.DiTConfig, kind: str) -> tuple[np.ndarray, np.ndarray]:
  """(model inputs (N, H, W, C): Fashion-MNIST images in [-1, 1] float32, or encoded latents float16; labels)."""
  if kind == "fashion_mnist":
    return data.load("train", config.data.dir)
  x, y = imagenet.load_latents(config.data.dir, config.data.get("split", "train"))
  want = (model_cfg.input_size, model_cfg.input_size, model_cfg.in_channels)
  if x.shape[1:] != want or y.max() >= model_cfg.num_classes:
    raise ValueError(f"The latents in {config.data.dir} are {x.shape[1:]} with labels up to {y.max()}; the model "
                     f"takes {want} inputs and {model_cfg.num_classes} classes.")
  return x, y


def run(config, workdir: str) -> dict:
  model_cfg = configlib.dit_config(config.model)
  kind = check_data(config, model_cfg)
  mesh = parallel.make_mesh(config.num_devices or None)
  parallel.check_batch_divisible(config.batch_size, mesh)
  loop.check_settings(config)
  dit.check_compute_dtype(config.get("compute_dtype", "float32"), "--config.compute_dtype")
  flexi_probs(config, model_cfg)
  images, labels = training_data(config, model_cfg, kind)
  writer = common.metric_writer(workdir)

  state = jax.device_put(init_state(config, model_cfg), parallel.replicated(mesh))
  mngr = loop.checkpoint_manager(workdir, config)
  state, meta = loop.restore_latest(mngr, state)
  common.write_json(os.path.join(workdir, "config.json"), config.to_dict())  # read by sample.load_dit
  steps = compile_train_steps(config, model_cfg, mesh, state)
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  logging.info("DiT %s: %.2fM params, %d devices, batch %d, steps %d..%d.", model_cfg, n_params / 1e6,
               mesh.devices.size, config.batch_size, int(state["step"]), config.num_steps)

  def batch_at(step):
    idx = data.epoch_batches(len(images), config.batch_size, config.seed, step)
    return (*parallel.shard_batch((images[idx].astype(np.float32), labels[idx]), mesh),
            patch_size_at(config, model_cfg, step))

  def step_fn(state, x, y, p):
    state, metrics = steps[p](state, x, y)
    return state, {**metrics, "patch_size": p}

  state, final, seconds, _ = loop.run(step_fn, state, batch_at, mngr=mngr, writer=writer,
                                              num_steps=config.num_steps, log_every=config.log_every,
                                              meta=meta, fix="lower --config.lr or set --config.grad_clip")
  result = dict(steps=int(state["step"]), params=int(n_params), seconds=seconds, devices=int(mesh.devices.size),
                processes=jax.process_count(),
                images_per_second=int(state["step"]) * config.batch_size / max(seconds, 1e-9), **final)
  if config.export_ema:
    ema = parallel.tree_to_host(flexi.tie(state["ema"], model_cfg))  # every process: a gather is collective
    if jax.process_index() == 0:
      npz.export_npz(os.path.join(workdir, "ema_params.npz"), ema,
                     metadata=dict(kind="dit_params", model=dict(config.model), steps=int(state["step"])))
  common.write_metrics(workdir, result)
  writer.flush()
  return result
