"""The step-planned sampler: one jitted `lax.scan` over a static plan of denoising steps.

A `StepPlan` lists, per step, the index into the (respaced) schedule and a step kind. Kinds are static:
each kind is a branch of a `lax.switch` inside the scan body, and per-kind state (caches, reconstructions)
rides in the scan carry. This module defines the 'full' kind; later methods add theirs.

Randomness is keyed by sample index (x_T and every step's noise come from fold_in(key, sample_id)), so a
sample does not depend on the batch it is drawn in or on the number of devices.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffq.diffusion import gaussian, respace

STEP_KINDS = ("full",)
METHODS = ("ddim", "ddpm")


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """Static plan: `steps[i]` indexes `schedule` (a respaced schedule), run from noisy to clean."""
  schedule: gaussian.Schedule
  steps: tuple[int, ...]
  kinds: tuple[str, ...]

  def __post_init__(self):
    if len(self.steps) != len(self.kinds) or not self.steps:
      raise ValueError("A step plan needs one kind per step and at least one step.")
    unknown = set(self.kinds) - set(STEP_KINDS)
    if unknown:
      raise ValueError(f"Unknown step kinds {sorted(unknown)}; known: {STEP_KINDS}.")

  @property
  def model_timesteps(self) -> np.ndarray:
    """Original (model-facing) timestep index of each step."""
    return self.schedule.timestep_map[np.array(self.steps)]


def make_plan(num_train_steps: int = 1000, spacing: str = "ddim20") -> StepPlan:
  """Plan of all-'full' steps over `space_timesteps(num_train_steps, spacing)`, last (noisiest) first."""
  base = gaussian.Schedule.from_betas(gaussian.linear_betas(num_train_steps))
  sched = respace.respace(base, respace.space_timesteps(num_train_steps, spacing))
  steps = tuple(range(sched.num_steps - 1, -1, -1))
  return StepPlan(schedule=sched, steps=steps, kinds=("full",) * len(steps))


def cfg_batch(x, t, y, null_class: int):
  """The classifier-free-guidance network batch: [x; x], [t; t], [y; null] (conditional half first)."""
  return jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([y, jnp.full_like(y, null_class)])


def cfg_combine(out, channels: int, cfg_scale: float):
  """Network output on a `cfg_batch` (2N, ..., 2C) -> guided (N, ..., 2C): eps = eps_null + s (eps_cond -
  eps_null) on the first `channels` channels; the learned-sigma channels come from the conditional half."""
  cond, uncond = jnp.split(out, 2)
  eps = uncond[..., :channels] + cfg_scale * (cond[..., :channels] - uncond[..., :channels])
  return jnp.concatenate([eps, cond[..., channels:]], axis=-1)


def guided(model_fn: Callable, params, x, t, y, step, cfg_scale: float, null_class: int):
  """Classifier-free guidance on eps channels (see `cfg_combine`). (DiT's forward_with_cfg guides only the
  first 3 of 4 latent channels; diffq guides all C.)"""
  if cfg_scale == 1.0:
    return model_fn(params, x, t, y, step)
  return cfg_combine(model_fn(params, *cfg_batch(x, t, y, null_class), step), x.shape[-1], cfg_scale)


def denoise_step(s: gaussian.Schedule, method: str, eta: float, out, x, t, noise, clip_x0: bool = False):
  """x_t -> x_{t-1} for one spaced step `t` (scalar index), from model output `out` (N, H, W, 2C).

  clip_x0: clip the predicted x_0 to [-1, 1] (ADM's clip_denoised, right for pixel-space data; DiT's latent
  sampler leaves it off)."""
  tt = jnp.full((x.shape[0],), t)
  p = gaussian.p_mean_variance(s, out, x, tt, clip_x0=clip_x0)
  nonzero = (jnp.asarray(t) > 0).astype(x.dtype)
  if method == "ddpm":
    return p["mean"] + nonzero * jnp.exp(0.5 * p["log_variance"]) * noise
  acp = jnp.asarray(s.alphas_cumprod, jnp.float32)[t]
  acp_prev = jnp.asarray(s.alphas_cumprod_prev, jnp.float32)[t]
  eps = gaussian.predict_eps_from_x0(s, x, tt, p["pred_x0"])
  sigma = eta * jnp.sqrt((1 - acp_prev) / (1 - acp)) * jnp.sqrt(1 - acp / acp_prev)
  mean = p["pred_x0"] * jnp.sqrt(acp_prev) + jnp.sqrt(1 - acp_prev - sigma ** 2) * eps
  return mean + nonzero * sigma * noise


def sample(model_fn: Callable, params, key: jax.Array, labels: jax.Array, sample_ids: jax.Array, *,
           plan: StepPlan, shape: tuple[int, ...], method: str = "ddim", eta: float = 0.0,
           cfg_scale: float = 1.0, null_class: int = 0, clip_x0: bool = False, return_trajectory: bool = False):
  """Draws x_0 for `labels` (N,). model_fn(params, x, t_model, y, step) -> (N, *shape[:-1], 2C), where `step` is
  the position in the plan (0 = first, noisiest). Returns x_0 (N, *shape), and with `return_trajectory` also
  the model inputs x_t of every step (S, N, *shape) (the data-free calibration set).

  Wrap in jax.jit with plan/shape/method/eta/cfg_scale/null_class static (see `make_sampler`).
  """
  if method not in METHODS:
    raise ValueError(f"Unknown sampling method {method!r}; choose one of {METHODS}.")
  keys = jax.vmap(jax.random.fold_in, (None, 0))(key, sample_ids)
  x = jax.vmap(lambda k: jax.random.normal(k, shape))(keys)
  kinds = sorted(set(plan.kinds))
  kind_ids = jnp.array([kinds.index(k) for k in plan.kinds], jnp.int32)
  steps = jnp.array(plan.steps, jnp.int32)
  model_ts = jnp.asarray(plan.model_timesteps, jnp.int32)

  def full_step(x, t_model, i):
    return guided(model_fn, params, x, jnp.full((x.shape[0],), t_model), labels, i, cfg_scale, null_class)

  branches = {"full": full_step}

  def body(x, inp):
    i, t, t_model, kind_id = inp
    if len(kinds) == 1:
      out = branches[kinds[0]](x, t_model, i)
    else:
      out = jax.lax.switch(kind_id, [branches[k] for k in kinds], x, t_model, i)
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i + 1), shape))(keys)
    return denoise_step(plan.schedule, method, eta, out, x, t, noise, clip_x0), (x if return_trajectory else None)

  x, xs = jax.lax.scan(body, x, (jnp.arange(len(plan.steps)), steps, model_ts, kind_ids))
  return (x, xs) if return_trajectory else x
