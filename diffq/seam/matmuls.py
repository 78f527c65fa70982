"""Matmul parts: how a layer multiplies its input part's output by its weight part's matrix.

- `Float` (the default): x_hat @ W_hat, both operands floats cast to the compute dtype, float32 accumulation.
  Under fake-quant x_hat and W_hat are dequantized integer grids.
- `Integer`: the deployed integer form of a layer whose input is affine-quantized per tensor, row or token
  (`inputs.Static`, `inputs.Dynamic`) and whose weight is integer codes per output channel (`weights.Codes`):

      x_hat = s_a (x_q - z_a),   W_hat = s_w (w_q - z_w),   u = x_q - m_a,  v = w_q - m_w  (int8),  c = m - z
      x_hat @ W_hat = s_a s_w [(u + c_a) @ (v + c_w)]
                    = s_a s_w [u @ v + c_a colsum(v) + rowsum(u) c_w + K c_a c_w]

  m = 2^(b-1) recentres unsigned b-bit codes into int8 (m = 0 for symmetric weight codes), K is the number of
  inputs: one int8 `lax.dot_general` with int32 accumulation, integer correction terms and one float rescale. It
  equals the fake-quant product up to float rounding (fake-quant rounds every product and partial sum, the
  integer form only the final rescale). 4-bit codes also run as int8: XLA's CPU and GPU backends refuse int4
  dot operands (jax 0.12).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from diffq.quant import ops
from diffq.seam import inputs, weights

# |sum| < 2^31: the exact sum is at most K qmax_a qmax_w for zero points in [0, qmax] (calibrated ones are), so
# K 2^(a_bits + w_bits) must stay below it; int32 sums wrap, so a partial sum past it is harmless.
INT32_BITS = 31


def dot(a, b, dtype) -> jax.Array:
  """a @ b (contracting a's last axis with b's first) with operands in `dtype`, accumulated in float32."""
  return jnp.dot(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class Float:
  type: ClassVar[str] = "float"

  def check(self, spec) -> None:
    pass

  def __call__(self, spec, layer, x, q: dict, ctx, w_eff, dtype) -> jax.Array:
    """x_hat @ W_hat (..., out) float32 of the (smoothed, rotated) input x (..., in); `w_eff()` gives the float
    effective weight when the weight part needs it."""
    return dot(spec.input(layer, x, q, ctx), spec.weight.matrix(q, w_eff), dtype)


def integer_blocker(spec) -> str | None:
  """Why `spec`'s parts cannot run as an integer matmul (None: they can)."""
  w, a = spec.weight, spec.input
  if not isinstance(w, weights.Codes):
    return (f"its weight part is {w.type!r}; integer execution multiplies deployed scalar codes ('codes', a "
            "quantize job's export)")
  if w.group_size:
    return f"its weight codes have one scale per group of {w.group_size} inputs, not one per output channel"
  if not isinstance(a, (inputs.Static, inputs.Dynamic)):
    return (f"its input part is {a.type!r}; integer execution needs affine-quantized inputs ('static' or "
            "'dynamic')")
  return None


def _centre(qmax) -> jax.Array:
  """m = (qmax + 1) / 2 = 2^(b-1) as int32: unsigned codes minus m fit int8."""
  return ((qmax + 1) / 2).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Integer:
  """The integer matmul of the module docstring; `check` refuses parts it cannot run (`integer_blocker`)."""
  type: ClassVar[str] = "integer"

  def check(self, spec) -> None:
    reason = integer_blocker(spec)
    if reason:
      raise ValueError(f"A layer with an integer matmul cannot run: {reason}. Keep its matmul 'float'.")

  def __call__(self, spec, layer, x, q: dict, ctx, w_eff, dtype) -> jax.Array:
    n_in = x.shape[-1]
    w_bits = spec.weight.bits + (1 if spec.weight.mixed else 0)  # OMQ's widest channel
    if n_in << (spec.input.bits + w_bits) >= 1 << INT32_BITS:
      raise ValueError(f"An integer matmul over {n_in} inputs at A{spec.input.bits}W{w_bits} could overflow its "
                       "int32 accumulator; keep this layer's matmul 'float'.")
    s_a, z_a, qmax_a = spec.input.affine(x, q, ctx)
    w_q, s_w, z_w, qmax_w = spec.weight.affine(q)
    m_a = _centre(qmax_a)
    m_w = jnp.zeros_like(_centre(qmax_w)) if spec.weight.symmetric else _centre(qmax_w)
    u = (ops.quantize(x, s_a, z_a, qmax_a) - m_a).astype(jnp.int8)
    v = (w_q - m_w).astype(jnp.int8)
    c_a = m_a - jnp.round(z_a).astype(jnp.int32)
    c_w = m_w - jnp.round(z_w).astype(jnp.int32)  # (1, out)
    acc = jax.lax.dot_general(u, v, (((u.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    acc = (acc + c_a * jnp.sum(v, axis=0, dtype=jnp.int32, keepdims=True)
           + jnp.sum(u, axis=-1, dtype=jnp.int32, keepdims=True) * c_w + n_in * c_a * c_w)
    return acc.astype(jnp.float32) * (s_a * s_w)


TYPES = {"float": Float, "integer": Integer}

