"""Evaluator-classifier job: train the Fashion-MNIST CNN (data-parallel jit over a Mesh, flip + shift
augmentation, AdamW with warm-up + cosine), report test accuracy, export params + batch_stats (kind=classifier)."""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import optax
from absl import logging

from diffq import data, parallel
from diffq.eval import evaluator
from diffq.io import npz
from diffq.jobs import common, loop
from diffq.models import classifier


def make_model(config) -> classifier.Classifier:
  return classifier.Classifier(**config.model.to_dict())


def make_optimizer(config, num_steps: int) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(0.0, config.lr, config.warmup_steps, num_steps)
  return optax.adamw(schedule, weight_decay=config.weight_decay)


def init_state(config, model, num_steps: int) -> dict:
  variables = model.init(jax.random.key(config.seed), jnp.zeros((1, 32, 32, 1)))
  return dict(step=jnp.zeros((), jnp.int32), params=variables["params"], batch_stats=variables["batch_stats"],
              opt_state=make_optimizer(config, num_steps).init(variables["params"]))


def augment(x, rng, flip: bool, max_shift: int):
  """(N, H, W, C) in [-1, 1]: random horizontal flip, then a random translation by up to `max_shift` pixels
  in each direction (pad with background -1, crop back to H x W)."""
  r_flip, r_shift = jax.random.split(rng)
  n, h, w, c = x.shape
  if flip:
    x = jnp.where(jax.random.bernoulli(r_flip, 0.5, (n, 1, 1, 1)), x[:, :, ::-1], x)
  if max_shift:
    padded = jnp.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)), constant_values=-1.0)
    offsets = jax.random.randint(r_shift, (n, 2), 0, 2 * max_shift + 1)
    x = jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c)))(padded, offsets)
  return x


def train_step(state, x, y, *, config, model, num_steps):
  """One AdamW step on softmax cross-entropy; augmentation RNG is fold_in(seed, step), so it is stateless."""
  x = augment(x, jax.random.fold_in(jax.random.key(config.seed + 1), state["step"]), **config.augment)

  def loss_fn(params):
    out, updates = model.apply({"params": params, "batch_stats": state["batch_stats"]}, x, train=True,
                               mutable=["batch_stats"])
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out["logits"], y))
    accuracy = jnp.mean(jnp.argmax(out["logits"], axis=-1) == y)
    return loss, (updates["batch_stats"], dict(loss=loss, accuracy=accuracy))

  grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(state["params"])
  updates, opt_state = make_optimizer(config, num_steps).update(grads, state["opt_state"], state["params"])
  return dict(step=state["step"] + 1, params=optax.apply_updates(state["params"], updates),
              batch_stats=batch_stats, opt_state=opt_state), metrics


def compile_train_step(config, model, num_steps, mesh, state):
  """Jitted step: state replicated, batch split over 'data' (BatchNorm statistics are over the global batch)."""
  fn = functools.partial(train_step, config=config, model=model, num_steps=num_steps)
  return parallel.jit_train_step(fn, mesh, state)


def run(config, workdir: str) -> dict:
  mesh = parallel.make_mesh(config.num_devices or None)
  parallel.check_batch_divisible(config.batch_size, mesh)
  loop.check_settings(config)
  images, labels = data.load("train", config.data.dir)
  test_images, test_labels = data.load("test", config.data.dir)
  steps_per_epoch = len(images) // config.batch_size
  num_steps = int(round(config.num_epochs * steps_per_epoch))
  if not 0 <= config.warmup_steps < num_steps:
    raise ValueError(f"warmup_steps={config.warmup_steps} must be in [0, {num_steps}), the number of training steps "
                     f"(num_epochs={config.num_epochs} of {steps_per_epoch} steps); lower warmup_steps or train "
                     "longer.")
  model = make_model(config)
  writer = common.metric_writer(workdir)

  state = jax.device_put(init_state(config, model, num_steps), parallel.replicated(mesh))
  mngr = loop.checkpoint_manager(workdir, config)
  state, meta = loop.restore_latest(mngr, state)
  common.write_json(os.path.join(workdir, "config.json"), config.to_dict())
  step_fn = compile_train_step(config, model, num_steps, mesh, state)
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  logging.info("Classifier %s: %d params, %d devices, batch %d, steps %d..%d (%.2f epochs).", model, n_params,
               mesh.devices.size, config.batch_size, int(state["step"]), num_steps, num_steps / steps_per_epoch)

  def batch_at(step):
    idx = data.epoch_batches(len(images), config.batch_size, config.seed, step)
    return parallel.shard_batch((images[idx], labels[idx]), mesh)

  state, final, train_seconds, _ = loop.run(step_fn, state, batch_at, mngr=mngr, writer=writer,
                                            num_steps=num_steps, log_every=config.log_every,
                                            meta=meta, fix="lower --config.lr")
  variables = jax.device_get(dict(params=state["params"], batch_stats=state["batch_stats"]))
  test_accuracy = evaluator.Evaluator(model, variables).class_accuracy(data.to_uint8(test_images), test_labels)
  logging.info("Test accuracy %.4f after %d steps (%.0f s of training).", test_accuracy, num_steps, train_seconds)
  writer.write_scalars(num_steps, dict(test_accuracy=test_accuracy))
  result = dict(test_accuracy=test_accuracy, steps=int(state["step"]), epochs=num_steps / steps_per_epoch,
                params=int(n_params), seconds=train_seconds, **final)
  npz.export_npz(os.path.join(workdir, "classifier.npz"), variables,
                 metadata=dict(kind=evaluator.KIND, model=config.model.to_dict(), steps=int(state["step"]),
                               test_accuracy=test_accuracy, data="fashion_mnist 32x32x1 in [-1, 1]"))
  common.write_metrics(workdir, result)
  writer.flush()
  return result
