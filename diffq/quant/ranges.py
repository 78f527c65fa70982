"""Range searches for uniform quantizers (pure functions of arrays).

`mse_range`: LAPQ-style search (MPQ-DM / Q-Diffusion): shrink [min, max] by (1 - 0.01 i), i < 80, and keep the
candidate minimising mean |x - Q(x)|^2.4 -- per output channel for weights, per tensor for activations.
`smooth_scale`: SmoothQuant's per-input-channel pre-scale.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffq.quant import ops

NUM_CANDIDATES = 80
NORM_P = 2.4


def asym_params(lo, hi, qmax):
  """Asymmetric (scale, zero) covering [lo, hi] (widened to include 0, so 0 stays exactly representable)."""
  lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
  scale = jnp.maximum((hi - lo) / qmax, 1e-8)
  return scale, jnp.round(-lo / scale)


def mse_range(x, bits, reduce_axes: tuple[int, ...], num_candidates: int = NUM_CANDIDATES, p: float = NORM_P,
              symmetric: bool = False, bounds=None):
  """(scale, zero) minimising mean |x - Q(x)|^p over `reduce_axes` (kept as size-1 dims), per remaining index.

  `bits` is an int or an int array broadcastable to the kept shape (per-channel bit vectors). `bounds` (lo, hi)
  overrides the min/max of `x` (when `x` is a subsample of the tensor whose range is searched)."""
  qmax = ops.qmax_of(bits)
  if bounds is None:
    bounds = jnp.min(x, axis=reduce_axes, keepdims=True), jnp.max(x, axis=reduce_axes, keepdims=True)
  lo0, hi0 = bounds

  def candidate(carry, i):
    best_err, best_s, best_z = carry
    shrink = 1.0 - 0.01 * i
    if symmetric:
      s = jnp.maximum(jnp.maximum(-lo0, hi0) * shrink / ((qmax + 1) / 2), 1e-8)
      z = jnp.zeros_like(s)
    else:
      s, z = asym_params(lo0 * shrink, hi0 * shrink, qmax)
    err = jnp.mean(jnp.abs(x - ops.fake_quant(x, s, z, qmax, symmetric)) ** p, axis=reduce_axes, keepdims=True)
    better = err < best_err
    return (jnp.where(better, err, best_err), jnp.where(better, s, best_s), jnp.where(better, z, best_z)), None

  init = (jnp.full(lo0.shape, jnp.inf), jnp.ones(lo0.shape), jnp.zeros(lo0.shape))
  (_, scale, zero), _ = jax.lax.scan(candidate, init, jnp.arange(num_candidates, dtype=jnp.float32))
  return scale, zero


def smooth_scale(act_absmax, w_absmax, alpha: float = 0.5, eps: float = 1e-5):
  """SmoothQuant pre-scale per input channel: s_j = max|X_j|^alpha / max|W_j|^(1-alpha) (alpha=0.5: the sqrt
  ratio MPQ-DM uses), with an epsilon the released code lacks (a zero max gave inf/NaN there)."""
  a = jnp.maximum(act_absmax, eps)
  w = jnp.maximum(w_absmax, eps)
  return a ** alpha / w ** (1 - alpha)
