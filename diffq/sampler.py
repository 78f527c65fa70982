"""The step-planned sampler: one jitted `lax.scan` over a static plan of denoising steps (`diffq.plan`).

The model contract is `model_fn(variables, state, x, t, y, ctx) -> (out, state)`: `ctx` is the step's
`plan.StepContext` (index and static kind) and `state` the model's state collections (caches, reconstructions),
which ride in the scan carry with x. Each step kind of the plan is a branch of a `lax.switch` inside the scan
body; a plan of one kind has no switch.

Randomness is keyed by sample index (x_T and every step's noise come from fold_in(key, sample_id)), so a
sample does not depend on the batch it is drawn in or on the number of devices.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from diffq import plan as plan_lib
from diffq.diffusion import gaussian

METHODS = ("ddim", "ddpm")


def cfg_batch(x, t, y, null_class: int):
  """The classifier-free-guidance network batch: [x; x], [t; t], [y; null] (conditional half first)."""
  return jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([y, jnp.full_like(y, null_class)])


def cfg_combine(out, channels: int, cfg_scale: float):
  """Network output on a `cfg_batch` (2N, ..., 2C) -> guided (N, ..., 2C): eps = eps_null + s (eps_cond -
  eps_null) on the first `channels` channels; the learned-sigma channels come from the conditional half."""
  cond, uncond = jnp.split(out, 2)
  eps = uncond[..., :channels] + cfg_scale * (cond[..., :channels] - uncond[..., :channels])
  return jnp.concatenate([eps, cond[..., channels:]], axis=-1)


WEAK_GUIDE_RATIO = 2.5  # FlexiDiT §3.4: (1 - s1) / (1 - s2) = 2.5 couples the weak-guide scale to the CFG scale


def weak_guide_scale(cfg_scale: float) -> float:
  """s2 = 1 - (1 - s1) / 2.5: the weak-guidance scale that matches CFG scale s1 (FlexiDiT §3.4)."""
  return 1.0 - (1.0 - cfg_scale) / WEAK_GUIDE_RATIO


def guided(model_fn: Callable, variables, state, x, t, y, ctx: plan_lib.StepContext, cfg_scale: float,
           null_class: int, cfg_channels: int = 0):
  """(output, state) of one network call with classifier-free guidance on the first `cfg_channels` eps channels
  (0 = all C; see `cfg_combine`; the state holds one row per network row, i.e. 2N under guidance). DiT's
  released forward_with_cfg guides only 3 of 4 latent channels (cfg_channels=3), the others come from the
  conditional half, which is what its and ICC's published FIDs were sampled with. A 'weak_guide' step guides
  the conditional prediction by the conditional prediction at the kind's guide_patch_size instead of the
  unconditional one, at scale `weak_guide_scale(cfg_scale)` (two calls of N rows; such steps keep no state)."""
  if cfg_scale == 1.0:
    return model_fn(variables, state, x, t, y, ctx)
  c = cfg_channels or x.shape[-1]
  if ctx.kind.cfg == "weak_guide":
    if state:
      raise ValueError(f"Step kind {ctx.kind.name!r} guides by a weak branch, which cannot carry sampler state "
                       "(ICC caches, MoDiff reconstructions) of its own token count; use t_weak_guide = t_weak "
                       "with stateful parts.")
    weak = plan_lib.StepContext(ctx.index, ctx.kind.guide_call())
    cond, _ = model_fn(variables, state, x, t, y, ctx)
    guide, _ = model_fn(variables, state, x, t, y, weak)
    eps = guide[..., :c] + weak_guide_scale(cfg_scale) * (cond[..., :c] - guide[..., :c])
    return jnp.concatenate([eps, cond[..., c:]], axis=-1), state
  out, state = model_fn(variables, state, *cfg_batch(x, t, y, null_class), ctx)
  return cfg_combine(out, c, cfg_scale), state


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


def sample(model_fn: Callable, variables, key: jax.Array, labels: jax.Array, sample_ids: jax.Array, *,
           plan: plan_lib.StepPlan, shape: tuple[int, ...], method: str = "ddim", eta: float = 0.0,
           cfg_scale: float = 1.0, null_class: int = 0, clip_x0: bool = False, state=None,
           return_trajectory: bool = False, cfg_channels: int = 0):
  """Draws x_0 for `labels` (N,). model_fn(variables, state, x, t_model, y, ctx) -> ((N, *shape[:-1], 2C),
  state) (the module docstring's contract); `state` is its initial state (None: the model keeps none), reset
  at the start of every segment of the plan (a plan with several patch sizes: {patch size: its initial state},
  `dit.init_states`). Returns x_0 (N, *shape), and with `return_trajectory` also the
  model inputs x_t of every step (S, N, *shape) (the data-free calibration set).

  `cfg_channels`: see `guided`. Wrap in jax.jit with plan/shape/method/eta/cfg_scale/null_class/cfg_channels
  static.
  """
  if method not in METHODS:
    raise ValueError(f"Unknown sampling method {method!r}; choose one of {METHODS}.")
  state = {} if state is None else state
  by_size = bool(state) and all(isinstance(k, int) for k in state)
  keys = jax.vmap(jax.random.fold_in, (None, 0))(key, sample_ids)
  x = jax.vmap(lambda k: jax.random.normal(k, shape))(keys)
  steps = jnp.array(plan.steps, jnp.int32)
  model_ts = jnp.asarray(plan.model_timesteps, jnp.int32)

  def network(kind):
    def call(x, state, i, t_model):
      t = jnp.full((x.shape[0],), t_model)
      return guided(model_fn, variables, state, x, t, labels, plan_lib.StepContext(i, kind), cfg_scale,
                    null_class, cfg_channels)
    return call

  def run_segment(x, start, stop):
    kinds = sorted(set(plan.step_kinds[start:stop]), key=lambda k: k.name)
    kind_ids = jnp.array([kinds.index(k) for k in plan.step_kinds[start:stop]], jnp.int32)

    def body(carry, inp):
      x, state = carry
      i, t, t_model, kind_id = inp
      if len(kinds) == 1:
        out, state = network(kinds[0])(x, state, i, t_model)
      else:
        out, state = jax.lax.switch(kind_id, [network(k) for k in kinds], x, state, i, t_model)
      noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i + 1), shape))(keys)
      x_next = denoise_step(plan.schedule, method, eta, out, x, t, noise, clip_x0)
      return (x_next, state), (x if return_trajectory else None)

    size = plan.step_kinds[start].patch_size
    if by_size and size not in state:
      raise ValueError(f"No initial sampler state for patch size {size} (plan steps {start}..{stop - 1}); build "
                       "it with dit.init_states(model, variables, rows, plan).")
    state0 = state[size] if by_size else state
    idx = slice(start, stop)
    (x, _), xs = jax.lax.scan(body, (x, state0), (jnp.arange(start, stop), steps[idx], model_ts[idx], kind_ids))
    return x, xs

  trajectory = []
  for start, stop in plan.segments:
    x, xs = run_segment(x, start, stop)
    trajectory.append(xs)
  if not return_trajectory:
    return x
  return x, trajectory[0] if len(trajectory) == 1 else jnp.concatenate(trajectory)
