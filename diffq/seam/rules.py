"""Config blocks -> spec tables: which layer gets which parts.

`quant_table(config.quant, steps)`: MPQ-DM's layout. Layers matching `keep_8bit` get W8A8 per-channel weights
and per-step inputs, no smoothing/rotation/OMQ/LoRA, frozen (the boundary rule); every other seam Linear gets
W`w_bits`A`a_bits` with the configured options (`quant.act` its input part, `quant.rotate` the Hadamard rotation
of its input), and trains in distillation when it carries LoRA; `quant.weight='vq'` makes the body's weights
additive VQ (`quant.vq`; `quant.vq.layouts` sets some block layer types' own layout), trained in distillation
(codebooks and scales) when `quant.vq.train`.
`icc_rules(ranks, svd, state_dtype, mlp)`: the ICC cache part on the block linears, one rank per layer type.
"""
from __future__ import annotations

import dataclasses
import re

from diffq.quant import vq
from diffq.seam import caches, inputs, spec as spec_lib, weights

ICC_LAYERS = {"qkv": ("blocks_*/attn/qkv", 3), "proj": ("blocks_*/attn/proj", 1), "fc1": ("blocks_*/mlp/fc1", 1),
              "fc2": ("blocks_*/mlp/fc2", 1)}  # layer type -> (glob, output splits: q, k, v factorised apart)


ACTS = ("static", "dynamic", "modiff")  # quant.act: the body layers' input part


def input_part(act: str, a_bits: int, steps: int, *, grad: str = "ste", granularity: str = "tensor",
               modiff=None):
  """The input part of A`a_bits` activations (0 = float): 'static' per-step calibrated ranges, 'dynamic' min-max
  per call, 'modiff' MoDiff's modulated input (`modiff`: quantizer, compensate, warmup_bits, late_bits,
  late_from)."""
  if not a_bits:
    return inputs.Float()
  if act == "static":
    return inputs.Static(a_bits, steps, grad)
  if act == "dynamic":
    return inputs.Dynamic(a_bits, granularity)
  if act == "modiff":
    m = dict(modiff or {})
    return inputs.Modulated(a_bits, m.get("quantizer", "dynamic"), granularity,
                            steps if m.get("quantizer") == "static" else 1, m.get("compensate", True),
                            m.get("warmup_bits", 0), m.get("late_bits", 0), m.get("late_from", 0))
  raise ValueError(f"Unknown quant.act {act!r}; choose one of {ACTS}.")


def scalar_spec(w_bits: int, a_bits: int = 0, steps: int = 1, *, symmetric: bool = False, group_size: int = 0,
                mixed: bool = False, smooth: bool = False, rotate: bool = False, lora_rank: int = 0,
                grad: str = "ste", act=None):
  """A fake-quant layer: W`w_bits` scalar weights, A`a_bits` inputs (0 = float; `act` an input part, default
  static per-step), trained in distillation when it carries LoRA."""
  act = input_part("static", a_bits, steps, grad=grad) if act is None else act
  return spec_lib.LayerSpec(weight=weights.Scalar(w_bits, symmetric, group_size, mixed, grad=grad), input=act,
                            lora_rank=lora_rank, smooth=smooth, rotate=rotate, train=lora_rank > 0)


WEIGHTS = ("scalar", "vq")  # quant.weight: the body layers' weight part


def vq_part(vcfg) -> weights.VQ:
  """The additive-VQ weight part of a `quant.vq` block (num_codebooks, codebook_bits, group_size, share; codes
  update in distillation when both `train` and `update_codes`)."""
  return weights.VQ(vcfg.num_codebooks, vcfg.codebook_bits, vcfg.group_size, vcfg.share,
                    bool(vcfg.get("train", False) and vcfg.get("update_codes", False)))


def parse_layouts(text: str) -> dict[str, tuple[int, int, int]]:
  """'adaLN_modulation=1x8g8,mlp/fc1=3x8g8' -> {block layer type: (codebooks, codebook bits, group size)}
  (AQLM's MxB gG notation)."""
  out = {}
  for item in filter(None, text.split(",")):
    name, _, layout = item.partition("=")
    m = re.fullmatch(r"(\d+)x(\d+)g(\d+)", layout)
    if not name or m is None:
      raise ValueError(f"Bad VQ layout {item!r} in quant.vq.layouts; write <layer type>=<M>x<B>g<G>, e.g. "
                       "'adaLN_modulation=1x8g8,mlp/fc1=3x8g8' (M codebooks of 2^B codewords, groups of G inputs).")
    out[name] = tuple(int(v) for v in m.groups())
  return out


def vq_layout_rules(vcfg, body: spec_lib.LayerSpec) -> tuple:
  """(('blocks_*/<type>', body with that type's VQ layout), ...) of `quant.vq.layouts` (LAQ: per layer type
  codebooks, bits and group size; the other body layers keep the default layout)."""
  return tuple((f"blocks_*/{name}", body.replace(weight=dataclasses.replace(body.weight, num_codebooks=m,
                                                                             codebook_bits=b, group_size=g)))
               for name, (m, b, g) in parse_layouts(vcfg.get("layouts", "")).items())


def vq_fit_settings(vcfg) -> vq.FitSettings:
  """How calibration fits the VQ weights (`quant.vq`: beam_size, steps_per_epoch, lr, max_epochs, tolerance,
  kmeans_iters, seed)."""
  return vq.FitSettings(**{f.name: vcfg[f.name] for f in dataclasses.fields(vq.FitSettings)})


def quant_table(qcfg, num_steps: int) -> tuple[tuple[str, spec_lib.LayerSpec], ...]:
  """Boundary layers (`keep_8bit`) W8A8; the body: weight part `quant.weight` (scalar W`w_bits`, or additive VQ
  from `quant.vq`), input part `quant.act` at A`a_bits`."""
  kind = qcfg.get("weight", "scalar")
  if kind not in WEIGHTS:
    raise ValueError(f"Unknown quant.weight {kind!r}; choose one of {WEIGHTS}.")
  if qcfg.omq and qcfg.w_group_size:
    raise ValueError("quant.omq assigns bits per output channel and cannot be combined with quant.w_group_size; "
                     "set one of them to its default (omq=False or w_group_size=0).")
  if kind == "vq" and (qcfg.omq or qcfg.lora_rank):
    raise ValueError("VQ weights (quant.weight='vq') have no scalar bit map for OMQ and no float kernel for LoRA; "
                     "set quant.omq=False and quant.lora_rank=0.")
  boundary = scalar_spec(8, 8, num_steps, grad=qcfg.grad)
  act = input_part(qcfg.get("act", "static"), qcfg.a_bits, num_steps, grad=qcfg.grad,
                   granularity=qcfg.get("act_granularity", "tensor"), modiff=qcfg.get("modiff"))
  body = scalar_spec(qcfg.w_bits, qcfg.a_bits, num_steps, symmetric=qcfg.w_symmetric, group_size=qcfg.w_group_size,
                     mixed=qcfg.omq, smooth=qcfg.smooth, rotate=qcfg.get("rotate", False), lora_rank=qcfg.lora_rank,
                     grad=qcfg.grad, act=act)
  layouts = ()
  if kind == "vq":
    body = body.replace(weight=vq_part(qcfg.vq), train=qcfg.vq.train)
    layouts = vq_layout_rules(qcfg.vq, body)
  patterns = [p for p in qcfg.keep_8bit.split(",") if p]
  return tuple((p, boundary) for p in patterns) + layouts + (("*", body),)


MLP_MODES = ("layers", "chain")  # icc.mlp: fc1 and fc2 cached apart (the paper) | one increment through GELU


def icc_rules(ranks, svd: str, state_dtype: str = "float32", mlp: str = "layers"
              ) -> tuple[tuple[str, spec_lib.LayerSpec], ...]:
  """(glob, spec whose cache part is ICC at that layer type's rank) for every type in `ranks` ({type: rank});
  `mlp='chain'` chains fc1 and fc2 through the linearised GELU (caches.chain_read)."""
  unknown = sorted(set(ranks) - set(ICC_LAYERS))
  if unknown:
    raise ValueError(f"Unknown ICC layer types {unknown} in icc.ranks; known: {sorted(ICC_LAYERS)}.")
  if mlp not in MLP_MODES:
    raise ValueError(f"Unknown icc.mlp {mlp!r}; choose one of {MLP_MODES}.")
  roles = {}
  if mlp == "chain":
    if not (ranks.get("fc1") and ranks.get("fc2")):
      raise ValueError(f"icc.mlp='chain' needs ICC ranks > 0 on fc1 and fc2; got {dict(ranks)}.")
    roles = dict(fc1="first", fc2="last")
  return tuple((ICC_LAYERS[name][0], spec_lib.LayerSpec(cache=caches.ICC(
      rank, ICC_LAYERS[name][1], svd, state_dtype, roles.get(name, "")))) for name, rank in ranks.items())
