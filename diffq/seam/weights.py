"""Weight parts: how a layer turns its float weight W_eff = (W + A B) * s[:, None] into the matmul weight.

- `Float`: W_eff itself.
- `Scalar`: uniform affine fake-quant Q_w(W_eff), per output channel or per group of `group_size` inputs, at
  `bits` bits or a per-output-channel bit vector (`mixed`, MPQ-DM's OMQ). Variables w_scale/w_zero ((1, out) or
  (in/g, 1, out)), w_bits (1, out) int32 when mixed. Its deployed form is `Codes`.
- `Codes`: the deployed form: no float kernel; integer codes w_codes (in, out) and the same scales;
  dequantize(codes) equals `Scalar`'s output bit for bit. Per output channel, it can run as an integer matmul
  (`diffq/seam/matmuls.py`).
- `VQ`: additive vector quantization (diffq/quant/vq.py): each group of `group_size` inputs of an output channel
  is s_o Σ_m C_m[B[o, j, m]]; variables vq_codes (out, in/g, M) int32, vq_codebooks (M, 2^b, g), vq_scales (out,).
  No float kernel; it is its own deployed form. Layers of one `share` group (one per layer type across blocks, or
  one for all) and of the same layout share a codebook set, fitted jointly to their summed output errors.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from diffq.quant import omq, ops, ranges, vq
from diffq.seam.variables import Variable

GRADS = ("ste", "lsq")
SHARES = ("none", "type", "all")  # VQ codebook sharing


@dataclasses.dataclass(frozen=True)
class Float:
  type: ClassVar[str] = "float"
  needs_kernel: ClassVar[bool] = True
  trainable: ClassVar[dict] = {}
  stats: ClassVar[tuple] = ()

  def variables(self, n_in: int, n_out: int) -> dict[str, Variable]:
    return {}

  def matrix(self, q: dict, w_eff):
    """The (in, out) matmul weight from `w_eff()` (the float effective weight, computed on demand)."""
    return w_eff()

  def deployed(self):
    return self

  def stored_bits(self, q: dict, n_in: int, n_out: int) -> int:
    return 32 * n_in * n_out


@dataclasses.dataclass(frozen=True)
class _Uniform:
  """Shared fields and layout of the scalar weight quantizer and its integer form."""
  bits: int = 8
  symmetric: bool = False
  group_size: int = 0
  mixed: bool = False

  def __post_init__(self):
    ops.check_bits(self.bits, "weight bits")
    if self.mixed and not 2 <= self.bits <= 7:
      raise ValueError(f"mixed (OMQ) weights use bits-1..bits+1 bits, so bits must be 2..7; got {self.bits}.")
    if self.mixed and self.group_size:
      raise ValueError("mixed weight bits are per output channel; they cannot be combined with group_size.")
    if self.group_size < 0:
      raise ValueError(f"group_size must be >= 0 (0 = per output channel); got {self.group_size}.")

  def scale_shape(self, n_in: int, n_out: int) -> tuple[int, ...]:
    """Shape of w_scale / w_zero: (1, out) per output channel, (in/g, 1, out) per group of g inputs."""
    if self.group_size:
      if n_in % self.group_size:
        raise ValueError(f"Weight group_size {self.group_size} does not divide the layer's {n_in} inputs.")
      return (n_in // self.group_size, 1, n_out)
    return (1, n_out)

  def variables(self, n_in: int, n_out: int) -> dict[str, Variable]:
    shape = self.scale_shape(n_in, n_out)
    v = {"w_scale": Variable(shape, fill=1.0), "w_zero": Variable(shape)}
    if self.mixed:
      v["w_bits"] = Variable((1, n_out), jnp.int32, fill=self.bits)
    return v

  def grouped(self, w):
    """(in, out) -> (in/g, g, out) for per-group quantizers (the layout of w_scale / w_zero), else unchanged."""
    g = self.group_size
    return w.reshape(w.shape[0] // g, g, w.shape[1]) if g else w

  def qmax(self, q: dict):
    return ops.qmax_of(q["w_bits"] if self.mixed else self.bits)

  def channel_bits(self, q: dict, n_out: int) -> np.ndarray:
    """(out,) bit width of each output channel."""
    return np.asarray(q["w_bits"]).reshape(-1) if self.mixed else np.full(n_out, self.bits)

  def stored_bits(self, q: dict, n_in: int, n_out: int) -> int:
    return int(self.channel_bits(q, n_out).sum()) * n_in


@dataclasses.dataclass(frozen=True)
class Scalar(_Uniform):
  """Q_w(W_eff): `grad` 'ste' (plain autograd of the straight-through quantizer) or 'lsq' (LSQ gradient scale)."""
  type: ClassVar[str] = "scalar"
  needs_kernel: ClassVar[bool] = True
  trainable: ClassVar[dict] = {"w_scale": "weight_quant", "w_zero": "weight_quant"}
  grad: str = "ste"

  def __post_init__(self):
    super().__post_init__()
    if self.grad not in GRADS:
      raise ValueError(f"Unknown quantizer gradient {self.grad!r}; expected one of {GRADS}.")

  @property
  def stats(self) -> tuple[str, ...]:
    return ("in_rows",) if self.mixed else ()  # OMQ scores bit allocations on real layer inputs

  def calibrate(self, layer) -> dict:
    """w_scale/w_zero by MSE search on the (smoothed, rotated) FP kernel, after OMQ's bit allocation when
    mixed."""
    out, bits = {}, None
    w_hat = layer.part_kernel()
    if self.mixed:
      bits, k, _ = omq.omq_search(w_hat, layer.part_input(layer.stats["in_rows"]), self.bits,
                                  layer.options["omq_fractions"])
      out["w_bits"] = bits
      layer.report["omq_k"] = k
    out["w_scale"], out["w_zero"] = weight_ranges(w_hat, self, bits)
    return out

  def matrix(self, q: dict, w_eff):
    w = w_eff()
    gscale = 1.0 / math.sqrt(w.shape[0] * (2 ** self.bits - 1)) if self.grad == "lsq" else 1.0
    return ops.fake_quant(self.grouped(w), q["w_scale"], q["w_zero"], self.qmax(q), self.symmetric,
                          gscale).reshape(w.shape)

  def codes(self, q: dict, w_eff):
    """Integer codes (in, out) int32 of the weight `matrix` fake-quantizes."""
    w = w_eff()
    return ops.quantize(self.grouped(w), q["w_scale"], q["w_zero"], self.qmax(q), self.symmetric).reshape(w.shape)

  def deployed(self):
    return Codes(self.bits, self.symmetric, self.group_size, self.mixed)


@dataclasses.dataclass(frozen=True)
class Codes(_Uniform):
  """dequantize(w_codes) (in, out); w_codes are stored (packed) in an export, the float kernel is not."""
  type: ClassVar[str] = "codes"
  needs_kernel: ClassVar[bool] = False
  trainable: ClassVar[dict] = {}
  stats: ClassVar[tuple] = ()

  def variables(self, n_in: int, n_out: int) -> dict[str, Variable]:
    return {**super().variables(n_in, n_out), "w_codes": Variable((n_in, n_out), jnp.int32)}

  def matrix(self, q: dict, w_eff):
    codes = q["w_codes"]
    return ops.dequantize(self.grouped(codes), q["w_scale"], q["w_zero"]).reshape(codes.shape)

  def affine(self, q: dict):
    """(codes (in, out) int32, scale (1, out), zero (1, out), qmax (1, out) or a scalar): the integer operand of
    `matmuls.Integer` (per output channel only; `matmuls.integer_blocker` refuses grouped layouts)."""
    return q["w_codes"], q["w_scale"], q["w_zero"], self.qmax(q)

  def deployed(self):
    return self


@functools.partial(jax.jit, static_argnums=(1,))
def weight_ranges(w, part: _Uniform, bits=None):
  """MSE-searched (scale, zero) of the kernel w (in, out), per output channel or per input group; `bits` (1, out)
  per-channel widths (default: part.bits everywhere, through the same array code path)."""
  bits = jnp.full((1, w.shape[1]), part.bits, jnp.int32) if bits is None else bits
  if part.group_size:
    n_in, n_out = w.shape
    w = w.reshape(n_in // part.group_size, part.group_size, n_out)
    return ranges.mse_range(w, bits, (1,), symmetric=part.symmetric)
  return ranges.mse_range(w, bits, (0,), symmetric=part.symmetric)


@dataclasses.dataclass(frozen=True)
class VQ:
  """Ŵ = dequantize(vq_codes, vq_codebooks, vq_scales) (in, out), fitted at calibration from the layer's FP
  (smoothed, rotated) kernel and the second moment H = XᵀX of the input part's input over the calibration
  trajectory (`vq.quantize_weights`, settings from the job option `vq`: a vq.FitSettings)."""
  type: ClassVar[str] = "vq"
  needs_kernel: ClassVar[bool] = False
  stats: ClassVar[tuple] = ("in_xtx",)
  shared: ClassVar[tuple] = ("vq_codebooks",)  # one value per sharing group (distillation ties them)
  num_codebooks: int = 2
  codebook_bits: int = 8
  group_size: int = 8
  share: str = "none"  # none: private codebooks | type: one set per layer type across blocks | all: one set
  update_codes: bool = False  # PV-tuning's discrete step: a straight-through target vq_target (in, out) is
  # trained and the codes re-encoded towards it (`update_discrete`)

  @property
  def trainable(self) -> dict:
    """Codebooks and scales (the continuous P-step); the straight-through target when codes update."""
    return {"vq_codebooks": "vq", "vq_scales": "vq", **({"vq_target": "vq_target"} if self.update_codes else {})}

  @property
  def discrete(self) -> tuple:
    """Integer leaves distillation updates by `update_discrete` (not by gradients)."""
    return ("vq_codes",) if self.update_codes else ()

  def __post_init__(self):
    vq.check_shape(self.group_size, self.num_codebooks, self.codebook_bits, self.group_size)
    if self.share not in SHARES:
      raise ValueError(f"Unknown VQ codebook sharing {self.share!r}; choose one of {SHARES}.")

  def share_group(self, path: str) -> str | None:
    """The codebook group of layer `path` (None: private): 'attn/qkv' for blocks_3/attn/qkv under 'type'."""
    if self.share == "none":
      return None
    return re.sub(r"^blocks_\d+/", "", path) if self.share == "type" else "all"

  def variables(self, n_in: int, n_out: int) -> dict[str, Variable]:
    vq.check_shape(n_in, self.num_codebooks, self.codebook_bits, self.group_size)
    m, g = self.num_codebooks, self.group_size
    v = {"vq_codes": Variable((n_out, n_in // g, m), jnp.int32),
         "vq_codebooks": Variable((m, 2 ** self.codebook_bits, g)), "vq_scales": Variable((n_out,), fill=1.0)}
    if self.update_codes:
      v["vq_target"] = Variable((n_in, n_out))
    return v

  def matrix(self, q: dict, w_eff):
    """Ŵ; with `update_codes` Ŵ + (T - sg(T)): the same value, and the target T gets dL/dŴ (straight through)."""
    w = vq.dequantize(vq.VQWeight(q["vq_codes"], q["vq_codebooks"], q["vq_scales"]))
    if self.update_codes:
      w = w + (q["vq_target"] - jax.lax.stop_gradient(q["vq_target"]))
    return w

  def update_discrete(self, q: dict, key, options) -> dict:
    """PV-tuning's V-step: codes re-encoded towards the target by L2 beam search (`options`: code_beam, the
    fraction `max_code_change` of groups allowed to change)."""
    order = jax.random.permutation(key, self.num_codebooks).astype(jnp.int32)
    return {"vq_codes": vq.l2_beam_search(q["vq_target"].T, q["vq_codebooks"], q["vq_codes"], q["vq_scales"],
                                          order, options.max_code_change, beam_size=options.code_beam)}

  def calibrate_shared(self, layers) -> list[dict]:
    """The VQ variables of `layers` (LayerData of the layers sharing this part's codebooks, or one layer)."""
    fitted, info = vq.quantize_weights([l.part_kernel() for l in layers], [l.input_xtx() for l in layers],
                                       num_codebooks=self.num_codebooks, codebook_bits=self.codebook_bits,
                                       group_size=self.group_size, settings=layers[0].options["vq"])
    for l, start, end in zip(layers, info["start_errors"], info["errors"]):
      l.report.update(vq_loss=end, vq_start_loss=start, vq_epochs=info["epochs"],
                      vq_seconds=info["seconds"] / len(layers), vq_shared_by=len(layers))
    target = lambda w: {"vq_target": vq.dequantize(w)} if self.update_codes else {}  # the STE buffer starts at Ŵ
    return [dict(vq_codes=w.codes, vq_codebooks=w.codebooks, vq_scales=w.scales, **target(w)) for w in fitted]

  def calibrate(self, layer) -> dict:
    return self.calibrate_shared([layer])[0]

  def deployed(self):
    return dataclasses.replace(self, update_codes=False)

  def stored_bits(self, q: dict, n_in: int, n_out: int) -> int:
    """Codes and scales (the codebooks are counted once per sharing group by the export)."""
    b = vq.stored_bits(n_in, n_out, self.num_codebooks, self.codebook_bits, self.group_size)
    return int(b["codes"] + b["scales"])


TYPES = {"float": Float, "scalar": Scalar, "codes": Codes, "vq": VQ}
