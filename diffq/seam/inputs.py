"""Input parts: what a layer does to its (smoothed) input x before the matmul.

- `Float`: x unchanged.
- `Static`: per-tensor uniform fake-quant Q_a(x) with one calibrated (scale, zero) pair per sampling step
  (`steps` entries, selected by the step context's plan index, clipped to the calibrated range). Variables
  a_scale, a_zero (steps,).
- `Dynamic`: min-max fake-quant computed from x itself at run time, per tensor or per token (no variables).
- MoDiff's modulated input (quantize x_t - x_hat_{t-1}): the slot exists (`TYPES`), filled by the MoDiff issue.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from diffq.quant import ops, ranges
from diffq.seam.variables import Variable

GRANULARITIES = ("tensor", "token")


@dataclasses.dataclass(frozen=True)
class Float:
  type: ClassVar[str] = "float"
  trainable: ClassVar[dict] = {}
  stats: ClassVar[tuple] = ()
  bits: ClassVar[int] = 0

  def variables(self, n_in: int) -> dict[str, Variable]:
    return {}

  def __call__(self, x, q: dict, ctx):
    return x

  def deployed(self):
    return self


@dataclasses.dataclass(frozen=True)
class Static:
  """Q_a(x) with the (scale, zero) of plan index ctx.index; `grad` as the weight part's ('ste' or 'lsq')."""
  type: ClassVar[str] = "static"
  trainable: ClassVar[dict] = {"a_scale": "act_quant", "a_zero": "act_quant"}
  stats: ClassVar[tuple] = ("in_min", "in_max", "in_sample")
  bits: int = 8
  steps: int = 1
  grad: str = "ste"

  def __post_init__(self):
    ops.check_bits(self.bits, "activation bits")
    if self.steps < 1:
      raise ValueError(f"A static activation quantizer needs steps >= 1 (one per sampling step); got {self.steps}.")

  def variables(self, n_in: int) -> dict[str, Variable]:
    return {"a_scale": Variable((self.steps,), fill=1.0), "a_zero": Variable((self.steps,))}

  def __call__(self, x, q: dict, ctx):
    i = jnp.clip(jnp.asarray(ctx.index, jnp.int32), 0, self.steps - 1)
    gscale = 1.0 if self.grad == "ste" else 1.0 / math.sqrt(x.size * (2 ** self.bits - 1))
    return ops.fake_quant(x, q["a_scale"][i], q["a_zero"][i], ops.qmax_of(self.bits), False, gscale)

  def calibrate(self, layer) -> dict:
    """Per step: the MSE-searched per-tensor (scale, zero) of x / s, candidates spanning the whole tensor's
    [min, max] and scored on the statistics pass's fixed random entries."""
    stats = layer.stats
    if self.steps != stats["in_min"].shape[0]:
      raise ValueError(f"Layer {layer.path} keeps {self.steps} activation quantizers but the calibration plan has "
                       f"{stats['in_min'].shape[0]} steps; set steps to the number of sampling steps.")
    smooth = layer.q.get("smooth")
    channel = stats["in_sample_channel"]
    scales, zeros = [], []
    for i in range(self.steps):
      lo, hi, sample = stats["in_min"][i], stats["in_max"][i], stats["in_sample"][i]
      if smooth is not None:  # x / s as XLA computes it in the layer: x * (1 / s), s broadcast over tokens
        inv = 1.0 / smooth
        lo, hi, sample = lo * inv, hi * inv, sample * inv[channel]
      s, z = _step_range(sample, jnp.min(lo, keepdims=True), jnp.max(hi, keepdims=True), self.bits)
      scales.append(s.reshape(()))
      zeros.append(z.reshape(()))
    return {"a_scale": jnp.stack(scales), "a_zero": jnp.stack(zeros)}

  def deployed(self):
    return self


@functools.partial(jax.jit, static_argnums=(3,))
def _step_range(sample, lo, hi, bits):
  return ranges.mse_range(sample, bits, (0,), bounds=(lo, hi))


@dataclasses.dataclass(frozen=True)
class Dynamic:
  """Asymmetric min-max fake-quant of x at run time, one (scale, zero) per tensor or per token (row of x)."""
  type: ClassVar[str] = "dynamic"
  trainable: ClassVar[dict] = {}
  stats: ClassVar[tuple] = ()
  bits: int = 8
  granularity: str = "tensor"

  def __post_init__(self):
    ops.check_bits(self.bits, "activation bits")
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"Unknown dynamic quantizer granularity {self.granularity!r}; choose one of "
                       f"{GRANULARITIES}.")

  def variables(self, n_in: int) -> dict[str, Variable]:
    return {}

  def __call__(self, x, q: dict, ctx):
    axes = tuple(range(x.ndim)) if self.granularity == "tensor" else (x.ndim - 1,)
    qmax = ops.qmax_of(self.bits)
    lo = jax.lax.stop_gradient(jnp.min(x, axis=axes, keepdims=True))
    hi = jax.lax.stop_gradient(jnp.max(x, axis=axes, keepdims=True))
    s, z = ranges.asym_params(lo, hi, qmax)
    return ops.fake_quant(x, s, z, qmax)

  def deployed(self):
    return self


TYPES = {"float": Float, "static": Static, "dynamic": Dynamic, "modulated": None}  # modulated: the MoDiff issue
