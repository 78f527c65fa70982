"""`LayerSpec`: one layer's parts, the config rules that assign specs to layers, and their stored (dict) form.

A rule table is ((layer glob, LayerSpec), ...), first match wins; layers no rule matches are `FLOAT`. The dict
form names each part by `type` (big_vision-style), e.g.
    {"weight": {"type": "scalar", "bits": 2}, "input": {"type": "static", "bits": 4, "steps": 20},
     "cache": {"type": "none"}, "lora_rank": 32, "smooth": true, "rotate": false, "train": true}
and is what exports and stage records store.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Sequence

import flax.linen as nn

from diffq.quant import rotation
from diffq.seam import caches, inputs, matmuls, weights
from diffq.seam.variables import Variable

LORA_GROUP = "lora"


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """A layer's parts (see diffq/seam/__init__.py). `lora_rank`: W + A B with A (in, r) U(+-1/sqrt(in)) and
  B (r, out) zeros; `smooth`: SmoothQuant pre-scale s (in,), x / s and W * s[:, None]; `rotate`: a randomised
  block-Hadamard rotation R (diffq/quant/rotation.py, signs `rot_signs` (in,)) after smoothing, (x / s) R and
  Rᵀ (W * s[:, None]); `train`: distillation trains the parts' trainable leaves (LoRA, quantizer scales) of this
  layer."""
  weight: Any = weights.Float()
  input: Any = inputs.Float()
  cache: Any = caches.NoCache()
  lora_rank: int = 0
  smooth: bool = False
  rotate: bool = False
  train: bool = False
  matmul: Any = matmuls.Float()

  def __post_init__(self):
    if self.lora_rank < 0:
      raise ValueError(f"lora_rank must be >= 0; got {self.lora_rank}.")
    if self.lora_rank and not self.weight.needs_kernel:
      raise ValueError(f"A {self.weight.type!r} weight stores no float kernel, so it cannot carry LoRA; merge LoRA "
                       "into the weight before export (diffq.io.quantized) or set lora_rank=0.")
    self.matmul.check(self)

  @property
  def parts(self) -> tuple:
    return (self.weight, self.input, self.cache)

  def variables(self, n_in: int, n_out: int) -> dict[str, Variable]:
    """Every variable of the layer's parts (collection `quant` unless the part says otherwise), in creation
    order: the weight's, smoothing, rotation, the input's, LoRA (random: drawn before the kernel), the cache's."""
    v = dict(self.weight.variables(n_in, n_out))
    if self.smooth:
      v["smooth"] = Variable((n_in,), fill=1.0)
    if self.rotate:
      v["rot_signs"] = Variable((n_in,), fill=1.0)
    v.update(self.input.variables(n_in))
    if self.lora_rank:
      v["lora_a"] = Variable((n_in, self.lora_rank),
                             init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"))  # torch kaiming(a=√5)
      v["lora_b"] = Variable((self.lora_rank, n_out))
    v.update(self.cache.variables(n_in, n_out))
    return v

  def trainable(self) -> dict[str, str]:
    """{variable name: learning-rate group} of the leaves distillation trains ({} unless `train`)."""
    if not self.train:
      return {}
    out = {**self.weight.trainable, **self.input.trainable, **self.cache.trainable}
    if self.lora_rank:
      out.update(lora_a=LORA_GROUP, lora_b=LORA_GROUP)
    return out

  def discrete(self) -> tuple[str, ...]:
    """Integer leaves distillation updates through the weight part's `update_discrete` (() unless `train`)."""
    return tuple(getattr(self.weight, "discrete", ())) if self.train else ()

  def part_stats(self, part: str) -> tuple[str, ...]:
    """The calibration statistics stage `part` ('smooth', 'rotate', 'weight', 'input' or 'cache') reads
    (diffq/calibrate.py's statistics pass)."""
    if part == "smooth":
      return ("in_min", "in_max") if self.smooth else ()
    if part == "rotate":
      return ()  # fixed random signs
    return getattr(self, part).stats

  def effective_weight(self, kernel, q: dict):
    """Rᵀ ((W + A B) * s[:, None]), (in, out): the float weight the weight part sees."""
    w = kernel
    if self.lora_rank:
      w = w + q["lora_a"] @ q["lora_b"]
    if self.smooth:
      w = w * q["smooth"][:, None]
    if self.rotate:
      w = rotation.rotate_kernel(w, q["rot_signs"])
    return w

  def transform_input(self, x, q: dict):
    """(x / s) R (..., in): what the input part receives."""
    if self.smooth:
      x = x / q["smooth"]
    return rotation.rotate(x, q["rot_signs"]) if self.rotate else x

  def deployed(self) -> "LayerSpec":
    """The exported form: each part's deployed form, LoRA merged into the weight, nothing trainable."""
    return LayerSpec(self.weight.deployed(), self.input.deployed(), self.cache.deployed(), 0, self.smooth,
                     self.rotate, False, self.matmul)

  def replace(self, **parts) -> "LayerSpec":
    return dataclasses.replace(self, **parts)


FLOAT = LayerSpec()

# A spec table: ((glob pattern over layer path, LayerSpec), ...); first match wins.
SpecTable = Sequence[tuple[str, LayerSpec]]


def resolve(path: str, table: SpecTable) -> LayerSpec:
  for pattern, spec in table:
    if fnmatch.fnmatchcase(path, pattern):
      return spec
  return FLOAT


def check_table(table: SpecTable, layer_paths: Sequence[str]) -> None:
  """Raises if a pattern matches no layer (a typo would silently do nothing)."""
  for pattern, _ in table:
    if not any(fnmatch.fnmatchcase(p, pattern) for p in layer_paths):
      raise ValueError(
          f"Layer pattern {pattern!r} matches no layer of the model. Known layers look like: "
          f"{', '.join(list(layer_paths)[:6])}, ... Fix the pattern in the config.")


def with_parts(table: SpecTable, layer_paths: Sequence[str], rules: SpecTable, part: str) -> tuple:
  """The per-layer table of `layer_paths` under `table`, with part `part` ('weight', 'input' or 'cache') taken
  from the first of `rules` that matches the layer (layers no rule matches keep their own)."""
  check_table(rules, layer_paths)
  out = []
  for p in layer_paths:
    spec = resolve(p, table)
    hit = next((s for pat, s in rules if fnmatch.fnmatchcase(p, pat)), None)
    out.append((p, spec if hit is None else spec.replace(**{part: getattr(hit, part)})))
  return tuple(out)


def with_integer_matmuls(table: SpecTable, layer_paths: Sequence[str]) -> tuple[tuple, dict[str, str]]:
  """(per-layer table of `layer_paths` under `table` with an integer matmul (`matmuls.Integer`) wherever the
  parts allow it, {path: why not} of the quantized layers that keep the float matmul)."""
  out, kept = [], {}
  for p in layer_paths:
    spec = resolve(p, table)
    reason = matmuls.integer_blocker(spec)
    if reason is None:
      spec = spec.replace(matmul=matmuls.Integer())
    elif not (isinstance(spec.weight, weights.Float) and isinstance(spec.input, inputs.Float)):
      kept[p] = reason
    out.append((p, spec))
  return tuple(out), kept


def _part_dict(part) -> dict:
  return {"type": part.type, **dataclasses.asdict(part)}


def to_dict(spec: LayerSpec) -> dict:
  """The dict form; `matmul` only when not float (the form of every export before integer execution)."""
  d = dict(weight=_part_dict(spec.weight), input=_part_dict(spec.input), cache=_part_dict(spec.cache),
           lora_rank=spec.lora_rank, smooth=spec.smooth, rotate=spec.rotate, train=spec.train)
  if not isinstance(spec.matmul, matmuls.Float):
    d["matmul"] = _part_dict(spec.matmul)
  return d


def _part(types: dict, d: dict, what: str):
  d = dict(d)
  name = d.pop("type", None)
  if name not in types:
    raise ValueError(f"Unknown {what} part type {name!r}; known: {sorted(types)}.")
  return types[name](**d)


def from_dict(d: dict) -> LayerSpec:
  """Inverse of `to_dict`; raises ValueError naming the bad part."""
  d = dict(d)
  try:
    parts = dict(weight=_part(weights.TYPES, d.pop("weight"), "weight"),
                 input=_part(inputs.TYPES, d.pop("input"), "input"),
                 cache=_part(caches.TYPES, d.pop("cache"), "cache"),
                 matmul=_part(matmuls.TYPES, d.pop("matmul", {"type": "float"}), "matmul"))
    return LayerSpec(**parts, **d)
  except (KeyError, TypeError) as e:
    raise ValueError(f"Malformed layer spec {d} ({type(e).__name__}: {e}).") from None


def from_legacy_policy(d: dict) -> LayerSpec:
  """The spec of a wave-1 `LayerPolicy` dict (exports written before the seam of parts): kind float,
  fakequant or intweight with w_bits, a_bits (0 = float), a_steps, w_symmetric, w_group_size, mixed_bits,
  smooth, lora_rank, grad."""
  try:
    if d["kind"] == "float":
      return FLOAT
    if d["kind"] not in ("fakequant", "intweight"):
      raise ValueError(f"unknown kind {d['kind']!r}")
    act = inputs.Static(d["a_bits"], d["a_steps"], d["grad"]) if d["a_bits"] else inputs.Float()
    spec = LayerSpec(weights.Scalar(d["w_bits"], d["w_symmetric"], d["w_group_size"], d["mixed_bits"],
                                    grad=d["grad"]), act, lora_rank=d["lora_rank"], smooth=d["smooth"],
                     train=d["lora_rank"] > 0)
    return spec.deployed() if d["kind"] == "intweight" else spec
  except (KeyError, ValueError) as e:
    raise ValueError(f"Malformed wave-1 layer policy {d} ({e}).") from None


def table_to_list(table: SpecTable) -> list:
  return [[pat, to_dict(s)] for pat, s in table]


def table_from_list(items) -> tuple:
  return tuple((pat, from_dict(d)) for pat, d in items)


@dataclasses.dataclass
class LayerData:
  """What a part's `calibrate` reads: the layer's FP kernel (in, out), its statistics {name: per-step array},
  the variables the parts calibrated before it (`q`), job options, and a report dict it may annotate.
  `transformed`: the weight and input statistics are already of the input part's input (x / s) R (a rotated
  layer's second statistics pass); otherwise they are of the layer input x."""
  path: str
  spec: LayerSpec
  kernel: Any
  stats: dict
  q: dict
  options: dict
  report: dict
  transformed: bool = False

  def part_input(self, x):
    """The input part's input (x / s) R of the statistics' inputs x (..., in)."""
    return x if self.transformed else self.spec.transform_input(x, self.q)

  def input_xtx(self):
    """H = XᵀX (in, in) of the input part's input over the calibration set (statistic in_xtx); smoothing is
    applied here, D⁻¹ H D⁻¹ with D = diag(s)."""
    h = self.stats["in_xtx"]
    if self.spec.smooth and not self.transformed:
      inv = 1.0 / self.q["smooth"]
      h = h * inv[:, None] * inv[None, :]
    return h

  def part_kernel(self):
    """Rᵀ (W * s[:, None]) (in, out): the FP weight the weight part quantizes (LoRA is zero at calibration)."""
    return self.spec.replace(lora_rank=0).effective_weight(self.kernel, self.q)

  def input_ranges(self, prefix: str = "in") -> list[tuple]:
    """Per step, (min (in,), max (in,), sampled entries (k,)) of the input part's input from the statistics
    `{prefix}_min`, `{prefix}_max`, `{prefix}_sample` (prefix 'in_delta': of its step increments). Smoothing is
    applied here as XLA computes it in the layer, x * (1 / s) broadcast over tokens (a positive per-channel
    scale commutes with min and max); a rotation's statistics were taken after it (`transformed`)."""
    st = self.stats
    lo, hi, sample = st[f"{prefix}_min"], st[f"{prefix}_max"], st[f"{prefix}_sample"]
    if self.spec.smooth and not self.transformed:
      inv = 1.0 / self.q["smooth"]
      lo, hi, sample = lo * inv, hi * inv, sample * inv[st[f"{prefix}_sample_channel"]]
    return [(lo[i], hi[i], sample[i]) for i in range(lo.shape[0])]

  def matrix(self):
    """The (in, out) linear map x -> y - b of the layer as calibrated so far (input quantization aside)."""
    w = self.spec.weight.matrix(self.q, lambda: self.spec.effective_weight(self.kernel, self.q))
    if self.spec.rotate:
      w = rotation.unrotate_kernel(w, self.q["rot_signs"])
    return w / self.q["smooth"][:, None] if self.spec.smooth else w
