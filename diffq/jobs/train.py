"""Training job: data-parallel jit over a Mesh, EMA, orbax CheckpointManager with resume, clu writers."""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import optax
from absl import logging

from diffq import configlib, data, parallel
from diffq.diffusion import gaussian
from diffq.io import npz
from diffq.models import dit
from diffq.jobs import common, loop


def make_optimizer(config) -> optax.GradientTransformation:
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, config.lr, max(config.warmup_steps, 1)), optax.constant_schedule(config.lr)],
      [max(config.warmup_steps, 1)])
  return optax.chain(optax.clip_by_global_norm(config.grad_clip) if config.grad_clip else optax.identity(),
                     optax.adamw(schedule, weight_decay=config.weight_decay))


def init_state(config, model_cfg: dit.DiTConfig) -> dict:
  params = dit.init_params(model_cfg, jax.random.key(config.seed))
  return dict(step=jnp.zeros((), jnp.int32), params=params, ema=jax.tree.map(jnp.copy, params),
              opt_state=make_optimizer(config).init(params))


def train_step(state, x0, y, *, config, model_cfg, schedule):
  """One AdamW step on the DiT hybrid loss; the per-step RNG is fold_in(seed, step), so it is stateless."""
  model = dit.DiT(config=model_cfg)
  rng = jax.random.fold_in(jax.random.key(config.seed + 1), state["step"])
  r_t, r_noise, r_drop = jax.random.split(rng, 3)
  t = jax.random.randint(r_t, (x0.shape[0],), 0, schedule.num_steps)
  noise = jax.random.normal(r_noise, x0.shape)

  def loss_fn(params):
    fn = lambda xt, tt: model.apply({"params": params}, xt, tt, y, train=True, rngs={"label_dropout": r_drop})
    terms = gaussian.training_losses(schedule, fn, x0, t, noise)
    return jnp.mean(terms["loss"]), {k: jnp.mean(v) for k, v in terms.items()}

  grads, metrics = jax.grad(loss_fn, has_aux=True)(state["params"])
  updates, opt_state = make_optimizer(config).update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  ema = optax.incremental_update(params, state["ema"], 1.0 - config.ema_decay)
  metrics["grad_norm"] = optax.tree.norm(grads)
  return dict(step=state["step"] + 1, params=params, ema=ema, opt_state=opt_state), metrics


def compile_train_step(config, model_cfg, mesh, state):
  """Jitted step: state replicated, batch split over 'data'; XLA inserts the gradient all-reduce."""
  schedule = gaussian.Schedule.from_betas(gaussian.linear_betas(config.diffusion_steps))
  fn = functools.partial(train_step, config=config, model_cfg=model_cfg, schedule=schedule)
  return parallel.jit_train_step(fn, mesh, state)


def run(config, workdir: str) -> dict:
  model_cfg = configlib.dit_config(config.model)
  if (model_cfg.input_size, model_cfg.in_channels, model_cfg.num_classes) != (32, 1, data.NUM_CLASSES):
    raise ValueError("train_dit_fm trains on Fashion-MNIST: model.input_size must be 32, in_channels 1 and "
                     f"num_classes 10; got {model_cfg.input_size}, {model_cfg.in_channels}, "
                     f"{model_cfg.num_classes}.")
  mesh = parallel.make_mesh(config.num_devices or None)
  parallel.check_batch_divisible(config.batch_size, mesh)
  loop.check_settings(config)
  images, labels = data.load("train", config.data.dir)
  writer = common.metric_writer(workdir)

  state = jax.device_put(init_state(config, model_cfg), parallel.replicated(mesh))
  mngr = loop.checkpoint_manager(workdir, config)
  state, meta = loop.restore_latest(mngr, state)
  common.write_json(os.path.join(workdir, "config.json"), config.to_dict())  # read by sample.load_dit
  step_fn = compile_train_step(config, model_cfg, mesh, state)
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  logging.info("DiT %s: %.2fM params, %d devices, batch %d, steps %d..%d.", model_cfg, n_params / 1e6,
               mesh.devices.size, config.batch_size, int(state["step"]), config.num_steps)

  def batch_at(step):
    idx = data.epoch_batches(len(images), config.batch_size, config.seed, step)
    return parallel.shard_batch((images[idx], labels[idx]), mesh)

  state, final, seconds, _ = loop.run(step_fn, state, batch_at, mngr=mngr, writer=writer,
                                              num_steps=config.num_steps, log_every=config.log_every,
                                              meta=meta, fix="lower --config.lr or set --config.grad_clip")
  result = dict(steps=int(state["step"]), params=int(n_params), seconds=seconds,
                images_per_second=int(state["step"]) * config.batch_size / max(seconds, 1e-9), **final)
  if config.export_ema:
    npz.export_npz(os.path.join(workdir, "ema_params.npz"), jax.device_get(state["ema"]),
                   metadata=dict(kind="dit_params", model=dict(config.model), steps=int(state["step"])))
  common.write_metrics(workdir, result)
  writer.flush()
  return result
