"""Randomised block-Hadamard rotation of a linear layer's input (QuaRot-style outlier spreading).

R = D (I_{n/b} ⊗ H_b) / sqrt(b), with D = diag(signs) random +-1 and H_b the Sylvester Hadamard matrix of the
largest power of two b dividing n (b = n for the embedded DiT's 128 / 512 widths; 128 and 512 blocks for
DiT-XL/2's 1152 / 4608). R is orthogonal, so (x R)(Rᵀ W) = x W: the input is rotated online and the weight
offline. An outlier channel of x is spread over the b channels of its block, which shrinks the per-tensor range
a low-bit activation quantizer must cover. The simulation applies H_b as small matmuls over its Kronecker factors;
a deployed kernel runs it as a fast Walsh-Hadamard transform, n log2(b) additions per token (`adds_per_token`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

SEED = 0  # the signs D: one fixed draw per width, the same for every layer of that width


def block_size(n: int) -> int:
  """The largest power of two dividing n."""
  if n < 1:
    raise ValueError(f"A rotation needs a positive width; got {n}.")
  return n & -n


def hadamard(b: int) -> np.ndarray:
  """The Sylvester Hadamard matrix H_b (b, b) of +-1 entries, b a power of two (H_b H_bᵀ = b I)."""
  if b < 1 or b & (b - 1):
    raise ValueError(f"A Sylvester Hadamard matrix needs a power-of-two size; got {b}.")
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < b:
    h = np.block([[h, h], [h, -h]])
  return h


def random_signs(n: int) -> jax.Array:
  """D's diagonal (n,) float32 of +-1, drawn from SEED (threefry: the same on every platform)."""
  return jax.random.rademacher(jax.random.key(SEED), (n,), jnp.float32)


def _factors(b: int, largest: int = 32) -> tuple[int, ...]:
  """Powers of two <= `largest` whose product is b: H_b = H_f1 ⊗ H_f2 ⊗ ... (Sylvester matrices factor)."""
  out = []
  while b > 1:
    out.append(min(b, largest))
    b //= out[-1]
  return tuple(out)


def _blocks(x, axis: int):
  """Apply (I ⊗ H_b) / sqrt(b) along `axis` of x (the rotation without D), as one small matmul per Kronecker
  factor of H_b (sum of the factors' sizes MACs per entry instead of b)."""
  n = x.shape[axis]
  b = block_size(n)
  fs = _factors(b)
  x = jnp.moveaxis(x, axis, -1)
  y = x.reshape(x.shape[:-1] + (n // b,) + fs)
  for k, f in enumerate(fs):
    ax = y.ndim - len(fs) + k
    h = jnp.asarray(hadamard(f) / math.sqrt(f), x.dtype)
    y = jnp.moveaxis(jnp.tensordot(y, h, axes=[[ax], [0]]), -1, ax)
  return jnp.moveaxis(y.reshape(x.shape), -1, axis)


def rotate(x, signs):
  """x R (..., n) of x (..., n): the rotated input."""
  return _blocks(x * signs.astype(x.dtype), -1)


def rotate_kernel(w, signs):
  """Rᵀ W (n, out) of W (n, out): the rotated weight, so rotate(x) @ rotate_kernel(W) == x @ W."""
  return _blocks(signs[:, None].astype(w.dtype) * w, 0)


def unrotate_kernel(w, signs):
  """R W (n, out): the inverse of `rotate_kernel`."""
  return signs[:, None].astype(w.dtype) * _blocks(w, 0)


def adds_per_token(n: int) -> int:
  """Float additions of one token's fast Walsh-Hadamard transform (n log2 b)."""
  return n * int(math.log2(block_size(n)))
