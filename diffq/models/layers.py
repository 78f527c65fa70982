"""The one seam every DiT matmul goes through.

`Linear` is a dense layer whose behaviour is chosen by a static `LayerPolicy`. Policies are resolved from the
layer's path (e.g. ``blocks_3/attn/qkv``) by `resolve_policy`, so quantization and caching change any layer by
config without touching the DiT code.

Kinds:
- ``float``: y = x W + b.
- ``fakequant``: y = Q_a(x / s) Q_w((W + A B) * s[:, None]) + b, with
  * Q_w uniform affine per output channel (or per group of `w_group_size` inputs), `w_bits` bits, or a
    per-output-channel bit vector (`mixed_bits`, OMQ);
  * Q_a per-tensor, `a_bits` bits (0 = float activations), one (scale, zero) pair per sampling step
    (`a_steps` entries, selected by the explicit `step` argument);
  * s the SmoothQuant pre-scale per input channel (`smooth`), A B a rank-`lora_rank` LoRA on the FP weight.
  Quantizer state lives in the `quant` collection (shapes below), float weights stay in `params`.
- ``intweight``: the deployed form of ``fakequant`` (LoRA merged): no float kernel; the `quant` collection holds
  the integer codes `w_codes` (in, out) and the layer computes Q_a(x / s) dequantize(codes) + b, bit for bit
  the ``fakequant`` output (see diffq/quant/export.py).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from diffq.quant import ops

KINDS = ("float", "fakequant", "intweight")
GRADS = ("ste", "lsq")


@dataclasses.dataclass(frozen=True)
class LayerPolicy:
  """Static per-layer behaviour. `kind` selects the matmul implementation; the rest configures it."""
  kind: str = "float"
  w_bits: int = 8
  a_bits: int = 0
  w_symmetric: bool = False
  w_group_size: int = 0
  a_steps: int = 1
  mixed_bits: bool = False
  smooth: bool = False
  lora_rank: int = 0
  grad: str = "ste"

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Unknown layer policy kind {self.kind!r}; expected one of {KINDS}.")
    if self.kind != "float":
      if self.kind == "intweight" and self.lora_rank:
        raise ValueError("An intweight layer stores merged integer codes and has no LoRA; set lora_rank=0 (merge "
                         "LoRA into the weight before export, see diffq.quant.export).")
      ops.check_bits(self.w_bits, "w_bits")
      if self.a_bits:
        ops.check_bits(self.a_bits, "a_bits")
      if self.mixed_bits and not 2 <= self.w_bits <= 7:
        raise ValueError(f"mixed_bits (OMQ) uses w_bits-1..w_bits+1 bits, so w_bits must be 2..7; got "
                         f"{self.w_bits}.")
      if self.mixed_bits and self.w_group_size:
        raise ValueError("mixed_bits assigns bits per output channel; it cannot be combined with w_group_size.")
      if self.a_steps < 1 or self.lora_rank < 0 or self.w_group_size < 0:
        raise ValueError(f"a_steps must be >= 1, lora_rank and w_group_size >= 0; got {self}.")
      if self.grad not in GRADS:
        raise ValueError(f"Unknown quantizer gradient {self.grad!r}; expected one of {GRADS}.")


FLOAT = LayerPolicy()

# A policy table: ((glob pattern over layer path, LayerPolicy), ...); first match wins.
PolicyTable = Sequence[tuple[str, LayerPolicy]]


def resolve_policy(path: str, table: PolicyTable) -> LayerPolicy:
  for pattern, policy in table:
    if fnmatch.fnmatchcase(path, pattern):
      return policy
  return FLOAT


def check_policy_table(table: PolicyTable, layer_paths: Sequence[str]) -> None:
  """Raises if a pattern matches no layer (a typo would silently do nothing)."""
  for pattern, _ in table:
    if not any(fnmatch.fnmatchcase(p, pattern) for p in layer_paths):
      raise ValueError(
          f"Layer pattern {pattern!r} matches no layer of the model. Known layers look like: "
          f"{', '.join(list(layer_paths)[:6])}, ... Fix the pattern in the config.")


def weight_quant_shape(policy: LayerPolicy, in_features: int, out_features: int) -> tuple[int, ...]:
  """Shape of w_scale / w_zero: (1, out) per output channel, (in/g, 1, out) per group of g inputs."""
  if policy.w_group_size:
    if in_features % policy.w_group_size:
      raise ValueError(f"w_group_size {policy.w_group_size} does not divide the layer's {in_features} inputs.")
    return (in_features // policy.w_group_size, 1, out_features)
  return (1, out_features)


def effective_weight(kernel, q: dict, policy: LayerPolicy):
  """(W + A B) * s[:, None], (in, out): the float weight the weight quantizer sees."""
  w = kernel
  if policy.lora_rank:
    w = w + q["lora_a"] @ q["lora_b"]
  if policy.smooth:
    w = w * q["smooth"][:, None]
  return w


def _grouped(w, policy: LayerPolicy):
  """(in, out) -> (in/g, g, out) for per-group quantizers (the layout of w_scale / w_zero), else unchanged."""
  g = policy.w_group_size
  return w.reshape(w.shape[0] // g, g, w.shape[1]) if g else w


def _qmax(q: dict, policy: LayerPolicy):
  return ops.qmax_of(q["w_bits"] if policy.mixed_bits else policy.w_bits)


def quantized_weight(kernel, q: dict, policy: LayerPolicy):
  """Q_w((W + A B) * s[:, None]) for kernel (in, out) and the layer's `quant` variables; returns (in, out)."""
  w = effective_weight(kernel, q, policy)
  gscale = 1.0 / math.sqrt(w.shape[0] * (2 ** policy.w_bits - 1)) if policy.grad == "lsq" else 1.0
  return ops.fake_quant(_grouped(w, policy), q["w_scale"], q["w_zero"], _qmax(q, policy), policy.w_symmetric,
                        gscale).reshape(w.shape)


def weight_codes(kernel, q: dict, policy: LayerPolicy):
  """Integer codes (in, out) int32 of the weight `quantized_weight` fake-quantizes."""
  w = effective_weight(kernel, q, policy)
  return ops.quantize(_grouped(w, policy), q["w_scale"], q["w_zero"], _qmax(q, policy),
                      policy.w_symmetric).reshape(w.shape)


def integer_weight(q: dict, policy: LayerPolicy):
  """dequantize(w_codes) (in, out): equals `quantized_weight` of the weight the codes came from."""
  codes = q["w_codes"]
  return ops.dequantize(_grouped(codes, policy), q["w_scale"], q["w_zero"]).reshape(codes.shape)


def quantized_input(x, q: dict, policy: LayerPolicy, step):
  """Q_a(x / s) with the (scale, zero) entry of plan index `step` (clipped to the calibrated range)."""
  if policy.smooth:
    x = x / q["smooth"]
  if not policy.a_bits:
    return x
  i = jnp.clip(jnp.asarray(step, jnp.int32), 0, policy.a_steps - 1)
  gscale = 1.0 if policy.grad == "ste" else 1.0 / math.sqrt(x.size * (2 ** policy.a_bits - 1))
  return ops.fake_quant(x, q["a_scale"][i], q["a_zero"][i], ops.qmax_of(policy.a_bits), False, gscale)


class Linear(nn.Module):
  """y = x @ kernel + bias, kernel (in, out); behaviour set by `policy` (see the module docstring)."""
  features: int
  policy: LayerPolicy = FLOAT
  use_bias: bool = True
  kernel_init: nn.initializers.Initializer = nn.initializers.xavier_uniform()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x, ctx=None):
    """y (..., features) of x (..., in) at step `ctx` (a plan.StepContext; None: step 0)."""
    step = 0 if ctx is None else ctx.index
    n_in = x.shape[-1]
    kernel = lambda: self.param("kernel", self.kernel_init, (n_in, self.features), jnp.float32)
    if self.policy.kind == "float":
      y = jnp.dot(x, kernel().astype(x.dtype))
    else:
      q = self._quant_variables(n_in)
      if self.policy.kind == "fakequant":
        w = quantized_weight(kernel(), q, self.policy)
      else:
        w = integer_weight(q, self.policy)
      y = jnp.dot(quantized_input(x, q, self.policy, step), w)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(y.dtype)
    return y

  def _quant_variables(self, n_in: int) -> dict:
    """The layer's `quant` collection, created with neutral values (calibration overwrites them):
    w_scale/w_zero (see weight_quant_shape), w_bits (1, out) int32 if mixed, smooth (in,), a_scale/a_zero
    (a_steps,), lora_a (in, r) U(+-1/sqrt(in)), lora_b (r, out) zeros; intweight: w_codes (in, out) int32."""
    p, shape = self.policy, weight_quant_shape(self.policy, n_in, self.features)
    var = lambda name, fn: self.variable("quant", name, fn).value
    q = {"w_scale": var("w_scale", lambda: jnp.ones(shape, jnp.float32)),
         "w_zero": var("w_zero", lambda: jnp.zeros(shape, jnp.float32))}
    if p.kind == "intweight":
      q["w_codes"] = var("w_codes", lambda: jnp.zeros((n_in, self.features), jnp.int32))
    if p.mixed_bits:
      q["w_bits"] = var("w_bits", lambda: jnp.full((1, self.features), p.w_bits, jnp.int32))
    if p.smooth:
      q["smooth"] = var("smooth", lambda: jnp.ones((n_in,), jnp.float32))
    if p.a_bits:
      q["a_scale"] = var("a_scale", lambda: jnp.ones((p.a_steps,), jnp.float32))
      q["a_zero"] = var("a_zero", lambda: jnp.zeros((p.a_steps,), jnp.float32))
    if p.lora_rank:
      init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")  # torch kaiming_uniform(a=sqrt(5))
      q["lora_a"] = var("lora_a", lambda: init(self.make_rng("params"), (n_in, p.lora_rank), jnp.float32))
      q["lora_b"] = var("lora_b", lambda: jnp.zeros((p.lora_rank, self.features), jnp.float32))
    return q
