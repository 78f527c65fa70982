"""Deployable export of a fake-quant DiT: packed integer weight codes + scales, and its exact re-import.

`integer_codes` turns a fake-quant model's `quant` collection into its deployed form (`weights.Codes`: w_codes of
the merged, smoothed weight). Per quantized layer the npz holds `w_packed` (uint8): output channel c's `in` codes packed at
that channel's bit width (symmetric codes offset by 2^(b-1) to be unsigned), each channel starting on a byte
boundary, channels in order (the byte offsets follow from the bit widths, so they are not stored); plus
`w_scale`, `w_zero` (rounded, as used), `w_bits` (mixed precision), `smooth`, `rot_signs`, `a_scale`, `a_zero`. Float kernels
of quantized layers are not stored; LoRA is merged into the codes. Everything else (biases, the label table,
float layers) stays float32 under `params/`. The manifest metadata holds the DiT config, the deployed spec table
(`specs`, diffq/seam/spec.py dict form) and each quantized layer's (in, out). Exports written before the seam of
parts (metadata `policies`, wave-1 `LayerPolicy` dicts) still import.

Re-import gives a model of the deployed specs whose outputs equal the fake-quant model's bit for bit.
"""
from __future__ import annotations

import dataclasses

import flax
import jax
import numpy as np

from diffq.io import npz
from diffq.models import dit
from diffq.quant import ops, pack
from diffq.seam import spec as spec_lib, weights

KIND = "dit_quantized"
STORED = ("w_scale", "w_zero", "w_bits", "smooth", "rot_signs", "a_scale", "a_zero")


def deployed_table(table: spec_lib.SpecTable) -> tuple:
  """`table` with every spec replaced by its deployed form (integer codes, LoRA merged)."""
  return tuple((pat, spec.deployed()) for pat, spec in table)


def _layer_paths(quant: dict) -> list[str]:
  return sorted({"/".join(k[:-1]) for k in flax.traverse_util.flatten_dict(quant) if k[-1] == "w_scale"})


def _get(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def integer_codes(params, quant, table: spec_lib.SpecTable) -> dict:
  """The `quant` collection of the `deployed_table(table)` model: per quantized layer its variables without
  lora_a/lora_b, plus w_codes (in, out) int32, the codes of the weight the fake-quant forward quantizes."""
  flat = {}
  for p in _layer_paths(quant):
    spec, q = spec_lib.resolve(p, table), _get(quant, p)
    if not isinstance(spec.weight, weights.Scalar):
      raise ValueError(f"Layer {p} has a {spec.weight.type!r} weight; integer codes come from a 'scalar' "
                       "(fake-quant) weight.")
    flat.update({f"{p}/{k}": v for k, v in q.items() if k not in ("lora_a", "lora_b")})
    flat[f"{p}/w_codes"] = spec.weight.codes(q, lambda: spec.effective_weight(_get(params, p)["kernel"], q))
  return npz.unflatten(flat)


def export_quantized(path: str, model_cfg: dit.DiTConfig, params, quant, table: spec_lib.SpecTable,
                     metadata: dict | None = None, extra_stats: dict | None = None) -> dict:
  """Writes the export; returns stats: bits_per_weight (stored bits per matmul/embedding weight; float ones
  count 32), model_bytes (all stored arrays) = code_bytes (packed codes) + scale_bytes (other quantizer arrays)
  + float_bytes (float params), fp_model_bytes (the float32 params of the fake-quant model), plus
  `extra_stats` (e.g. the producing job's seconds). The manifest keeps them as metadata["job_metrics"]."""
  params = jax.device_get(params)
  quant_int = jax.device_get(integer_codes(params, jax.device_get(quant), table))
  flat = {"params/" + k: np.asarray(v) for k, v in npz.flatten(params).items()}
  shapes, code_bits, n_quantized = {}, 0, 0
  for p in _layer_paths(quant_int):
    part, q = spec_lib.resolve(p, table).weight, _get(quant_int, p)
    codes = np.asarray(q["w_codes"])
    bits = part.channel_bits(q, codes.shape[1])
    if part.symmetric:
      codes = codes + (1 << (bits - 1))[None, :]
    flat[f"quant/{p}/w_packed"], _ = pack.pack_rows(codes.T, bits)
    for name in STORED:
      if name in q:
        flat[f"quant/{p}/{name}"] = np.round(q[name]) if name == "w_zero" else np.asarray(q[name])
    del flat[f"params/{p}/kernel"]
    shapes[p] = list(codes.shape)
    code_bits += part.stored_bits(q, *codes.shape)
    n_quantized += codes.size
  float_weights = sum(v.size for k, v in flat.items() if k.startswith("params/") and k.endswith(("kernel",
                                                                                                 "embedding")))
  nbytes = lambda keep: sum(int(v.nbytes) for k, v in flat.items() if keep(k))
  stats = dict(extra_stats or {},
               bits_per_weight=(code_bits + 32 * float_weights) / (n_quantized + float_weights),
               model_bytes=nbytes(lambda k: True), code_bytes=nbytes(lambda k: k.endswith("/w_packed")),
               scale_bytes=nbytes(lambda k: k.startswith("quant/") and not k.endswith("/w_packed")),
               float_bytes=nbytes(lambda k: k.startswith("params/")),
               fp_model_bytes=int(sum(4 * np.size(v) for v in jax.tree.leaves(params))))
  meta = dict(metadata or {}, kind=KIND, model=dataclasses.asdict(model_cfg), layers=shapes,
              specs=spec_lib.table_to_list(deployed_table(table)), job_metrics=stats)
  npz.export_npz(path, npz.unflatten(flat), metadata=meta)
  return stats


def _decode(packed: np.ndarray, q: dict, part, n_in: int, n_out: int) -> np.ndarray:
  """w_packed bytes -> w_codes (n_in, n_out) int32 (the inverse of the packing in `export_quantized`)."""
  if not isinstance(part, weights.Codes):
    raise ValueError(f"the spec table gives it a {part.type!r} weight, not integer codes")
  bits = part.channel_bits(q, n_out)
  ops.check_bits(bits, "w_bits")
  offsets = np.concatenate([[0], np.cumsum(-(-n_in * bits // 8))])
  if bits.shape != (n_out,) or packed.size != offsets[-1]:
    raise ValueError(f"{packed.size} code bytes and {bits.size} channel bit widths; its ({n_in}, {n_out}) weight "
                     f"needs {offsets[-1]} bytes and {n_out} widths")
  shift = (1 << (bits - 1)) if part.symmetric else np.zeros_like(bits)
  return (pack.unpack_rows(packed, offsets, bits, n_in).T - shift[None, :]).astype(np.int32)


def stored_table(meta: dict) -> tuple:
  """The deployed spec table an export's metadata records (`specs`; wave-1 exports: `policies`)."""
  if "specs" in meta:
    return spec_lib.table_from_list(meta["specs"])
  return deployed_table(tuple((pat, spec_lib.from_legacy_policy(pol)) for pat, pol in meta["policies"]))


def import_quantized(path: str) -> tuple[dit.DiTConfig, dict, tuple]:
  """(DiT config, {"params", "quant"} of the deployed model, its spec table) from `export_quantized`."""
  tree, manifest = npz.import_npz(path)
  meta = manifest["metadata"]
  if meta.get("kind") != KIND:
    raise ValueError(f"{path} is not a quantized DiT export (manifest kind={meta.get('kind')!r}); write one with "
                     "diffq.io.quantized.export_quantized (the quantize job does).")
  try:
    table = stored_table(meta)
    model_cfg, params, quant = dit.DiTConfig(**meta["model"]), tree["params"], tree.get("quant", {})
    if set(meta["layers"]) != set(_layer_paths(quant)):
      raise ValueError(f"quantized layers {_layer_paths(quant)[:3]}... differ from the manifest's "
                       f"{sorted(meta['layers'])[:3]}...")
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{path} is a malformed quantized DiT export ({type(e).__name__}: {e}); re-export it with "
                     "diffq.io.quantized.export_quantized.") from e
  for p, shape in meta["layers"].items():
    try:
      q = _get(quant, p)
      q["w_codes"] = _decode(q.pop("w_packed"), q, spec_lib.resolve(p, table).weight, *shape)
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{path}: quantized layer {p} is malformed ({type(e).__name__}: {e}); re-export it with "
                       "diffq.io.quantized.export_quantized.") from e
  variables = {"params": params, "quant": quant}
  npz.check_shapes(variables, dit.variable_shapes(model_cfg, table), f"{path} (model {meta['model']})")
  return model_cfg, variables, table
