"""Uniform affine fake-quantization as `jax.custom_vjp` ops.

    x_int = clip(round(x / s) + z, 0, qmax),   qmax = 2^b - 1,   x_hat = (x_int - z) * s      (asymmetric)
    x_int = clip(round(x / s), -(qmax+1)/2, (qmax-1)/2),          x_hat = x_int * s           (symmetric, z = 0)

`s`, `z` and `qmax` broadcast against `x`, which covers per-tensor, per-output-channel, per-group (reshape `x`
to (..., groups, group_size) first) and per-channel bit vectors (qmax of shape (C, 1)). `z` is stored and learned
as a float but used rounded (straight-through): MPQ-DM's released quantizer uses the continuous z, which puts
the clip bounds off the integer grid, so its outputs cannot be stored as b-bit codes. Rounding makes
`dequantize(quantize(x))` reproduce `fake_quant(x)` bit for bit.

Gradients (u = x / s, in-range means qmin <= round(u) + z <= qmax):
    dx = g            in range,  0 outside                          (straight-through estimator)
    ds = g (round(u) - u)  in range,  g (clip bound - z) outside    (LSQ, Esser et al. 2020, eq. 3)
    dz = 0            in range,  -g s outside   (through round(z) by straight-through)
`grad_scale` multiplies ds and dz (LSQ uses 1 / sqrt(numel(x) * qmax) per quantizer; 1.0 gives the plain
autograd-of-STE gradients of MPQ-DM's released quantizer).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _sum_to(g: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sums a broadcast cotangent back to `shape` (the inverse of numpy broadcasting)."""
  g = jnp.sum(g, axis=tuple(range(g.ndim - len(shape))))
  return jnp.sum(g, axis=tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1), keepdims=True)


def _bounds(qmax, symmetric: bool):
  if symmetric:
    return -(qmax + 1) / 2, (qmax - 1) / 2
  return jnp.zeros_like(qmax), qmax


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def fake_quant(x, scale, zero_point, qmax, symmetric: bool = False, grad_scale: float = 1.0):
  """x_hat (same shape as x); see the module docstring. qmax = 2**bits - 1 (float array or scalar)."""
  lo, hi = _bounds(qmax, symmetric)
  z = jnp.round(zero_point)
  x_int = jnp.clip(jnp.round(x / scale) + z, lo, hi)
  return (x_int - z) * scale


def _fwd(x, scale, zero_point, qmax, symmetric, grad_scale):
  return fake_quant(x, scale, zero_point, qmax, symmetric, grad_scale), (x, scale, zero_point, qmax)


def _bwd(symmetric, grad_scale, res, g):
  x, scale, zero_point, qmax = res
  lo, hi = _bounds(qmax, symmetric)
  u = x / scale
  z = jnp.round(zero_point)
  v = jnp.round(u) + z
  below, above = v < lo, v > hi
  inside = ~(below | above)
  dx = jnp.where(inside, g, 0.0)
  ds = g * jnp.where(inside, jnp.round(u) - u, jnp.where(below, lo - z, hi - z)) * grad_scale
  dz = g * jnp.where(inside, 0.0, -scale) * grad_scale
  shp = lambda a: jnp.shape(a)
  return (dx, _sum_to(ds, shp(scale)).reshape(shp(scale)), _sum_to(dz, shp(zero_point)).reshape(shp(zero_point)),
          jnp.zeros_like(qmax))


fake_quant.defvjp(_fwd, _bwd)


def qmax_of(bits) -> jax.Array:
  """2**bits - 1 as float32 (bits: an int or an integer array; validate with `check_bits`)."""
  b = jnp.asarray(bits)
  return (2.0 ** b - 1).astype(jnp.float32)


def check_bits(bits, what: str = "bits") -> None:
  """Raises a clear error unless every bit width is an integer in [1, 8]."""
  b = np.asarray(bits)
  if not np.issubdtype(b.dtype, np.integer) and not np.all(np.equal(np.mod(b, 1), 0)):
    raise ValueError(f"{what} must be integers; got {b}.")
  if b.size == 0 or b.min() < 1 or b.max() > 8:
    raise ValueError(f"{what} must lie in 1..8 (diffq packs codes into bytes); got {np.unique(b)[:8]}.")


def quantize(x, scale, zero_point, qmax, symmetric: bool = False) -> jax.Array:
  """Integer codes (int32) of x: asymmetric in [0, qmax], symmetric in [-(qmax+1)/2, (qmax-1)/2]."""
  lo, hi = _bounds(qmax, symmetric)
  return jnp.clip(jnp.round(x / scale) + jnp.round(zero_point), lo, hi).astype(jnp.int32)


def dequantize(codes, scale, zero_point) -> jax.Array:
  return (codes.astype(jnp.float32) - jnp.round(zero_point)) * scale
