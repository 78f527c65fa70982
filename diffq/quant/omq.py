"""MPQ-DM's Outlier-driven Mixed Quantization (OMQ): kurtosis-ranked per-output-channel bit widths.

For a (pre-scaled) kernel W (in, out): rank output channels by Pearson kurtosis of their weights; the top-k get
N+1 bits, the bottom-k N-1, the rest N, so the layer averages exactly N bits. k is chosen per layer from a grid
of channel fractions by the MSE of the layer output on calibration inputs (activations unquantized), with
'max'-initialised per-channel quantizers during the search, as in the released code.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from diffq.quant import ops


def kurtosis(w: jax.Array) -> jax.Array:
  """(in, out) -> (out,): E[(w - mu)^4] / std^4 over fan-in, std Bessel-corrected (torch.std), non-excess."""
  mu = jnp.mean(w, axis=0)
  std = jnp.std(w, axis=0, ddof=1)
  return jnp.mean((w - mu) ** 4, axis=0) / jnp.maximum(std, 1e-12) ** 4


def omq_bit_allocation(kurt: jax.Array, n_bits: int, k: int) -> jax.Array:
  """(out,) kurtosis -> (1, out) int32 bits: top-k N+1, bottom-k N-1, others N (mean exactly N)."""
  n_out = kurt.shape[0]
  if not 0 <= 2 * k <= n_out:
    raise ValueError(f"OMQ k={k} needs 2k <= {n_out} output channels.")
  order = jnp.argsort(kurt)  # ascending
  rank = jnp.empty_like(order).at[order].set(jnp.arange(n_out))
  bits = jnp.where(rank >= n_out - k, n_bits + 1, jnp.where(rank < k, n_bits - 1, n_bits))
  return bits.astype(jnp.int32)[None, :]


def max_init(w: jax.Array, bits) -> tuple[jax.Array, jax.Array]:
  """Per-output-channel asymmetric (scale, zero) from the channel's [min, max] (including 0)."""
  lo = jnp.minimum(jnp.min(w, axis=0, keepdims=True), 0.0)
  hi = jnp.maximum(jnp.max(w, axis=0, keepdims=True), 0.0)
  scale = jnp.maximum((hi - lo) / ops.qmax_of(bits), 1e-8)
  return scale, jnp.round(-lo / scale)


def omq_search(w_hat: jax.Array, x_hat: jax.Array, n_bits: int, fractions: Sequence[float]):
  """Chooses k over `fractions` of output channels by MSE(x_hat Q(w_hat), x_hat w_hat); x_hat (..., in).

  Returns (bits (1, out), chosen k, errors per fraction). Bias cancels in the difference, so it is omitted."""
  n_out = w_hat.shape[1]
  kurt = kurtosis(w_hat)
  ref = x_hat @ w_hat
  ks = sorted({int(f * n_out) for f in fractions})
  if any(2 * k > n_out for k in ks):
    raise ValueError(f"OMQ fractions must be <= 0.5 (k channels up and k down); got {list(fractions)}.")
  errs = []
  for k in ks:
    bits = omq_bit_allocation(kurt, n_bits, k)
    s, z = max_init(w_hat, bits)
    errs.append(jnp.mean((x_hat @ ops.fake_quant(w_hat, s, z, ops.qmax_of(bits)) - ref) ** 2))
  errs = jnp.stack(errs)
  best = int(jnp.argmin(errs))
  return omq_bit_allocation(kurt, n_bits, ks[best]), ks[best], errs
