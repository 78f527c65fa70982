"""Input parts: what a layer does to its (smoothed, rotated) input x before the matmul.

- `Float`: x unchanged.
- `Static`: per-tensor uniform fake-quant Q_a(x) with one calibrated (scale, zero) pair per sampling step
  (`steps` entries, selected by the step context's plan index, clipped to the calibrated range). Variables
  a_scale, a_zero (steps,).
- `Dynamic`: min-max fake-quant computed from x itself at run time, per tensor or per token (no variables).
- `Modulated` (MoDiff, Ma et al. ICML 2025, research/modiff.md §2): quantizes the difference between the input
  and its running reconstruction, x_hat_t = x_hat_{t-1} + Q(x_t - x_hat_{t-1}) (error compensation), and feeds
  x_hat_t to the matmul; the first call of a trajectory (warm-up) passes x (or Q_warm(x)). This is the released
  code's datapath in its equivalent simulation form (§2.10): W x_hat_t + b = o_hat_{t-1} + W Q(delta_t), the bias
  added once. The state (`modulation/x_hat` per network row, plus `x_prev` without compensation and a per-row
  `started` flag) rides in the sampler carry and starts at zeros on every plan segment.
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
MODULATED_GRANULARITIES = ("tensor", "sample", "token")  # sample: one range per network row (per image under CFG)
MODULATED_QUANTIZERS = ("dynamic", "static")  # min-max of delta per call | calibrated per-step delta ranges
STATE = "modulation"  # the variable collection of MoDiff's reconstructions, carried by the sampler


@dataclasses.dataclass(frozen=True)
class Float:
  type: ClassVar[str] = "float"
  trainable: ClassVar[dict] = {}
  stats: ClassVar[tuple] = ()
  bits: ClassVar[int] = 0

  def variables(self, n_in: int) -> dict[str, Variable]:
    return {}

  def step_bits(self, first: bool, index: int = 0) -> int:
    """Bits of the matmul's activation operand at plan step `index` (`first`: the trajectory's first call);
    32 = float."""
    return 32

  def __call__(self, layer, x, q: dict, ctx):
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

  def step_bits(self, first: bool, index: int = 0) -> int:
    return self.bits

  def __call__(self, layer, x, q: dict, ctx):
    gscale = 1.0 if self.grad == "ste" else 1.0 / math.sqrt(x.size * (2 ** self.bits - 1))
    return _step_quant(x, q, ctx, self.steps, self.bits, gscale)

  def affine(self, x, q: dict, ctx):
    """(scale, zero, qmax) the part quantizes x with (scalars): the integer operand of `matmuls.Integer`."""
    return (*_step_params(q, ctx, self.steps), ops.qmax_of(self.bits))

  def calibrate(self, layer) -> dict:
    """Per step: the MSE-searched per-tensor (scale, zero) of x / s, candidates spanning the whole tensor's
    [min, max] and scored on the statistics pass's fixed random entries."""
    steps = layer.input_ranges()
    if self.steps != len(steps):
      raise ValueError(f"Layer {layer.path} keeps {self.steps} activation quantizers but the calibration plan has "
                       f"{len(steps)} steps; set steps to the number of sampling steps.")
    return _per_step_ranges(steps, self.bits)

  def deployed(self):
    return self


@functools.partial(jax.jit, static_argnums=(3,))
def _step_range(sample, lo, hi, bits):
  return ranges.mse_range(sample, bits, (0,), bounds=(lo, hi))


def _per_step_ranges(steps, bits) -> dict:
  """{'a_scale', 'a_zero'} (S,): per step, the MSE-searched per-tensor pair of the entries `sample`, candidates
  spanning [min lo, max hi]; `steps` is a list of (lo, hi, sample), `bits` an int or one per step."""
  bits = [bits] * len(steps) if isinstance(bits, int) else bits
  pairs = [_step_range(sample, jnp.min(lo, keepdims=True), jnp.max(hi, keepdims=True), b)
           for (lo, hi, sample), b in zip(steps, bits)]
  return {"a_scale": jnp.stack([s.reshape(()) for s, _ in pairs]),
          "a_zero": jnp.stack([z.reshape(()) for _, z in pairs])}


def _step_params(q: dict, ctx, steps: int):
  """The calibrated (scale, zero) of plan index ctx.index (clipped to the `steps` calibrated)."""
  i = jnp.clip(jnp.asarray(ctx.index, jnp.int32), 0, steps - 1)
  return q["a_scale"][i], q["a_zero"][i]


def _step_quant(x, q: dict, ctx, steps: int, bits, gscale: float = 1.0):
  """Q(x) at `bits` (an int or a traced scalar) with the (scale, zero) of plan index ctx.index."""
  return ops.fake_quant(x, *_step_params(q, ctx, steps), ops.qmax_of(bits), False, gscale)


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

  def step_bits(self, first: bool, index: int = 0) -> int:
    return self.bits

  def __call__(self, layer, x, q: dict, ctx):
    return _min_max_quant(x, self.bits, self.granularity)

  def affine(self, x, q: dict, ctx):
    """(scale, zero, qmax) the part quantizes x with (per tensor or (..., 1) per token): the integer operand of
    `matmuls.Integer`."""
    return _min_max_params(x, self.bits, self.granularity)

  def deployed(self):
    return self


def _min_max_params(x, bits, granularity: str):
  """(scale, zero, qmax) of x (..., C)'s asymmetric min-max range: one per tensor, leading row ('sample') or
  token, broadcastable against x."""
  axes = {"tensor": tuple(range(x.ndim)), "sample": tuple(range(1, x.ndim)), "token": (x.ndim - 1,)}[granularity]
  qmax = ops.qmax_of(bits)
  lo = jax.lax.stop_gradient(jnp.min(x, axis=axes, keepdims=True))
  hi = jax.lax.stop_gradient(jnp.max(x, axis=axes, keepdims=True))
  return (*ranges.asym_params(lo, hi, qmax), qmax)


def _min_max_quant(x, bits, granularity: str):
  """Asymmetric min-max fake-quant of x (..., C) (`_min_max_params`' range)."""
  return ops.fake_quant(x, *_min_max_params(x, bits, granularity))


@dataclasses.dataclass(frozen=True)
class Modulated:
  """MoDiff's modulated input (see the module docstring): delta_t = x_t - x_hat_{t-1} quantized at `bits`, by
  min-max per call ('dynamic', per tensor / sample / token) or with calibrated per-step ranges ('static', the
  Q-Diff variant: `steps` (scale, zero) pairs fitted to the FP trajectory's step increments). `compensate=False`
  is the paper's "standard modulation" ablation: x_hat accumulates Q(x_t - x_{t-1}) of the true previous input.
  `warmup_bits`: the first call's activation bits (0 = float, as the released code). `late_bits` (0 = off):
  the difference's bits from plan step `late_from` on, where the increments are widest (a step's last
  increments span up to 0.5-0.9 of its input range on the embedded model, against 0.02-0.05 early)."""
  type: ClassVar[str] = "modulated"
  trainable: ClassVar[dict] = {}
  bits: int = 4
  quantizer: str = "dynamic"
  granularity: str = "tensor"
  steps: int = 1
  compensate: bool = True
  warmup_bits: int = 0
  late_bits: int = 0
  late_from: int = 0

  def __post_init__(self):
    ops.check_bits(self.bits, "modulated activation bits")
    if self.warmup_bits:
      ops.check_bits(self.warmup_bits, "warm-up activation bits")
    if self.late_bits:
      ops.check_bits(self.late_bits, "late-step activation bits")
      if self.late_from < 1:
        raise ValueError(f"late_bits needs late_from >= 1, the first plan step at late_bits; got {self.late_from}.")
      if self.quantizer == "static" and self.steps == 1:
        raise ValueError("late_bits with the static MoDiff quantizer needs per-step ranges: set steps to the "
                         "number of sampling steps.")
    if self.quantizer not in MODULATED_QUANTIZERS:
      raise ValueError(f"Unknown MoDiff quantizer {self.quantizer!r}; choose one of {MODULATED_QUANTIZERS}.")
    if self.granularity not in MODULATED_GRANULARITIES:
      raise ValueError(f"Unknown MoDiff granularity {self.granularity!r}; choose one of {MODULATED_GRANULARITIES}.")
    if self.steps < 1:
      raise ValueError(f"A modulated input needs steps >= 1; got {self.steps}.")

  @property
  def stats(self) -> tuple[str, ...]:
    return ("in_delta_min", "in_delta_max", "in_delta_sample") if self.quantizer == "static" else ()

  def variables(self, n_in: int) -> dict[str, Variable]:
    if self.quantizer != "static":
      return {}
    return {"a_scale": Variable((self.steps,), fill=1.0), "a_zero": Variable((self.steps,))}

  def step_bits(self, first: bool, index: int = 0) -> int:
    """The difference's bits at plan step `index`; the warm-up call's (float = 32, or `warmup_bits`) on the
    first step. The increment datapath (o_hat + W Q(delta)) multiplies only the low-bit difference."""
    if first:
      return self.warmup_bits or 32
    return self.late_bits if self.late_bits and index >= self.late_from else self.bits

  def _bits(self, ctx):
    """The difference's bits at the step of `ctx` (a traced scalar when late_bits is set)."""
    if not self.late_bits:
      return self.bits
    return jnp.where(jnp.asarray(ctx.index) >= self.late_from, self.late_bits, self.bits)

  def __call__(self, layer, x, q: dict, ctx):
    """x_hat_t (..., C) for the input x_t (..., C) of a network call, updating the layer's `modulation` state."""
    if not (layer.is_mutable_collection(STATE) or layer.has_variable(STATE, "x_hat")):
      raise ValueError(f"Layer {'/'.join(layer.scope.path)} modulates its input but the call carries no "
                       "modulation state: run MoDiff models through diffq.sampler.sample with dit.init_state.")
    rows = (x.shape[0],) + (1,) * (x.ndim - 1)
    x_hat = layer.variable(STATE, "x_hat", jnp.zeros, x.shape, jnp.float32)
    started = layer.variable(STATE, "started", jnp.zeros, rows, jnp.float32)
    base = x_hat.value
    if not self.compensate:
      x_prev = layer.variable(STATE, "x_prev", jnp.zeros, x.shape, jnp.float32)
      delta = x - x_prev.value
    else:
      delta = x - base
    modulated = base + self._quant(delta, q, ctx)
    warm = x if not self.warmup_bits else _min_max_quant(x, self.warmup_bits, self.granularity)
    out = jnp.where(started.value > 0, modulated, warm)
    if layer.is_mutable_collection(STATE):
      x_hat.value = out
      started.value = jnp.ones_like(started.value)
      if not self.compensate:
        x_prev.value = x
    return out

  def _quant(self, delta, q: dict, ctx):
    if self.quantizer == "dynamic":
      return _min_max_quant(delta, self._bits(ctx), self.granularity)
    return _step_quant(delta, q, ctx, self.steps, self._bits(ctx))

  def calibrate(self, layer) -> dict:
    """Per step i >= 1: the MSE-searched (scale, zero) of the FP trajectory's increments x_i - x_{i-1}, candidates
    spanning their [min, max], scored on fixed random entries (step 0 is the warm-up; it keeps step 1's pair)."""
    if self.quantizer == "dynamic":
      return {}
    steps = layer.input_ranges("in_delta")
    n = len(steps) + 1
    if self.steps not in (1, n):
      raise ValueError(f"Layer {layer.path} keeps {self.steps} modulated quantizers but the calibration plan has "
                       f"{n} steps; set steps to 1 (one range for every step, the released code's) or to the "
                       "number of sampling steps.")
    if self.late_bits and self.late_from >= n:
      raise ValueError(f"Layer {layer.path}: late_from={self.late_from} lies beyond the plan's {n} steps, so "
                       "late_bits would never apply; set late_from below the number of sampling steps.")
    if self.steps == 1:  # pooled over the steps
      steps = [(jnp.stack([lo for lo, _, _ in steps]).min(0), jnp.stack([hi for _, hi, _ in steps]).max(0),
                jnp.concatenate([x for _, _, x in steps]))]
    out = _per_step_ranges(steps, self.bits if self.steps == 1 else
                           [self.step_bits(False, i) for i in range(1, n)])
    if self.steps > 1:  # step 0 is the warm-up; it keeps step 1's pair
      out = {k: jnp.concatenate([v[:1], v]) for k, v in out.items()}
    return out

  def deployed(self):
    return self


TYPES = {"float": Float, "static": Static, "dynamic": Dynamic, "modulated": Modulated}
