"""Deployable export of a quantized DiT: packed weight codes + their quantizer arrays, and its exact re-import.

`integer_codes` turns a fake-quant model's `quant` collection into its deployed form (`weights.Codes`: w_codes of
the merged, smoothed weight; additive-VQ layers are already deployed). Per quantized layer the npz holds
- scalar codes: `w_packed` (uint8): output channel c's `in` codes packed at that channel's bit width (symmetric
  codes offset by 2^(b-1) to be unsigned), each channel starting on a byte boundary, channels in order (the byte
  offsets follow from the bit widths, so they are not stored); plus `w_scale`, `w_zero` (rounded, as used),
  `w_bits` (mixed precision);
- additive VQ: `vq_packed` (uint8): the (out, in/g, M) codes packed at codebook_bits, `vq_scales` (float16), and
  `vq_codebooks` (float16) stored once per sharing group, in its first layer (manifest `vq_codebooks_of`:
  {layer: the layer holding its codebooks});
- `smooth`, `rot_signs`, `a_scale`, `a_zero`.
Float kernels of quantized layers are not stored; LoRA is merged into the codes. Everything else (biases, the
label table, float layers) stays float32 under `params/`. The manifest metadata holds the DiT config, the
deployed spec table (`specs`, diffq/seam/spec.py dict form) and each quantized layer's (in, out). Exports
written before the seam of parts (metadata `policies`, wave-1 `LayerPolicy` dicts) still import.

Re-import gives a model of the deployed specs whose outputs equal the fake-quant model's bit for bit (VQ layers
compute with float16-rounded codebooks and scales, which is what is stored).
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
LAYER_MARKS = ("w_scale", "vq_codes", "vq_packed")  # a quantized layer's variables (fake-quant, VQ, stored VQ)
WEIGHT_STORED = ("w_scale", "w_zero", "w_bits")  # the scalar weight quantizer's arrays (bits_per_weight_total)


def deployed_table(table: spec_lib.SpecTable) -> tuple:
  """`table` with every spec replaced by its deployed form (integer codes, LoRA merged)."""
  return tuple((pat, spec.deployed()) for pat, spec in table)


def quantized_layer_paths(quant: dict) -> list[str]:
  """Layers with a quantized weight (scalar scales or VQ codes)."""
  return sorted({"/".join(k[:-1]) for k in flax.traverse_util.flatten_dict(quant) if k[-1] in LAYER_MARKS})


def _get(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def integer_codes(params, quant, table: spec_lib.SpecTable) -> dict:
  """The `quant` collection of the `deployed_table(table)` model: per quantized layer its variables without
  lora_a/lora_b, plus w_codes (in, out) int32, the codes of the weight the fake-quant forward quantizes."""
  flat = {}
  for p in quantized_layer_paths(quant):
    spec, q = spec_lib.resolve(p, table), _get(quant, p)
    if isinstance(spec.weight, weights.VQ):
      flat.update({f"{p}/{k}": v for k, v in q.items()})
      continue
    if not isinstance(spec.weight, weights.Scalar):
      raise ValueError(f"Layer {p} has a {spec.weight.type!r} weight; integer codes come from a 'scalar' "
                       "(fake-quant) weight.")
    flat.update({f"{p}/{k}": v for k, v in q.items() if k not in ("lora_a", "lora_b")})
    flat[f"{p}/w_codes"] = spec.weight.codes(q, lambda: spec.effective_weight(_get(params, p)["kernel"], q))
  return npz.unflatten(flat)


def export_quantized(path: str, model_cfg: dit.DiTConfig, params, quant, table: spec_lib.SpecTable,
                     metadata: dict | None = None, extra_stats: dict | None = None) -> dict:
  """Writes the export; returns stats: bits_per_weight (stored bits per matmul/embedding weight; float ones
  count 32; scalar layers count their codes, VQ layers codes, scales and their share of the codebooks),
  bits_per_weight_total (every weight-quantizer array counted: scalar scales, zero points and bit maps too), model_bytes (all stored arrays) = code_bytes (packed codes) + scale_bytes (other quantizer arrays)
  + float_bytes (float params), fp_model_bytes (the float32 params of the fake-quant model), plus
  `extra_stats` (e.g. the producing job's seconds). The manifest keeps them as metadata["job_metrics"]."""
  params = jax.device_get(params)
  quant_int = jax.device_get(integer_codes(params, jax.device_get(quant), table))
  flat = {"params/" + k: np.asarray(v) for k, v in npz.flatten(params).items()}
  shapes, code_bits, quantizer_bits, n_quantized, owners, holders = {}, 0, 0, 0, {}, {}
  for p in quantized_layer_paths(quant_int):
    part, q = spec_lib.resolve(p, table).weight, _get(quant_int, p)
    n_in, n_out = _get(params, p)["kernel"].shape
    if isinstance(part, weights.VQ):
      bits = _pack_vq(flat, p, part, q, holders, owners)
      code_bits += bits
      quantizer_bits += bits
    else:
      codes = np.asarray(q["w_codes"])
      bits = part.channel_bits(q, n_out)
      if part.symmetric:
        codes = codes + (1 << (bits - 1))[None, :]
      flat[f"quant/{p}/w_packed"], _ = pack.pack_rows(codes.T, bits)
      code_bits += part.stored_bits(q, n_in, n_out)
      quantizer_bits += part.stored_bits(q, n_in, n_out) + sum(8 * np.asarray(q[k]).nbytes for k in WEIGHT_STORED
                                                                if k in q)
    for name in STORED:
      if name in q:
        flat[f"quant/{p}/{name}"] = np.round(q[name]) if name == "w_zero" else np.asarray(q[name])
    del flat[f"params/{p}/kernel"]
    shapes[p] = [int(n_in), int(n_out)]
    n_quantized += n_in * n_out
  float_weights = sum(v.size for k, v in flat.items() if k.startswith("params/") and k.endswith(("kernel",
                                                                                                 "embedding")))
  nbytes = lambda keep: sum(int(v.nbytes) for k, v in flat.items() if keep(k))
  per_weight = lambda bits: (bits + 32 * float_weights) / (n_quantized + float_weights)
  packed = lambda k: k.endswith(("/w_packed", "/vq_packed"))
  stats = dict(extra_stats or {}, bits_per_weight=per_weight(code_bits),
               bits_per_weight_total=per_weight(quantizer_bits),
               model_bytes=nbytes(lambda k: True), code_bytes=nbytes(packed),
               scale_bytes=nbytes(lambda k: k.startswith("quant/") and not packed(k)),
               float_bytes=nbytes(lambda k: k.startswith("params/")),
               fp_model_bytes=int(sum(4 * np.size(v) for v in jax.tree.leaves(params))))
  meta = dict(metadata or {}, kind=KIND, model=dataclasses.asdict(model_cfg), layers=shapes,
              specs=spec_lib.table_to_list(deployed_table(table)), job_metrics=stats)
  if owners:
    meta["vq_codebooks_of"] = owners
  npz.export_npz(path, npz.unflatten(flat), metadata=meta)
  return stats


def _pack_vq(flat: dict, p: str, part: weights.VQ, q: dict, holders: dict, owners: dict) -> float:
  """Stores layer p's VQ codes, scales and (if it is the first of its sharing group) codebooks in `flat`;
  records its codebooks' layer in owners[p]. Returns its stored bits."""
  flat[f"quant/{p}/vq_packed"] = pack.pack(np.asarray(q["vq_codes"]), part.codebook_bits)
  flat[f"quant/{p}/vq_scales"] = np.asarray(q["vq_scales"]).astype(np.float16)
  books = np.asarray(q["vq_codebooks"]).astype(np.float16)
  group = part.share_group(p)
  owner = holders.setdefault(p if group is None else (part, group), p)
  owners[p] = owner
  bits = 8 * (flat[f"quant/{p}/vq_packed"].nbytes + flat[f"quant/{p}/vq_scales"].nbytes)
  if owner == p:
    flat[f"quant/{p}/vq_codebooks"] = books
    return bits + 8 * books.nbytes
  if not np.array_equal(flat[f"quant/{owner}/vq_codebooks"], books):
    raise ValueError(f"Layers {owner} and {p} share codebooks (group {group!r}) but hold different ones; train "
                     "shared codebooks tied (diffq/distill.py) or set quant.vq.share='none'.")
  return bits


def _unpack_vq(quant: dict, p: str, part, n_in: int, n_out: int, owner: str) -> None:
  """vq_packed -> vq_codes (out, in/g, M) int32; float16 scales and the owner's codebooks -> float32."""
  if not isinstance(part, weights.VQ):
    raise ValueError(f"the spec table gives it a {part.type!r} weight, not additive VQ")
  q = _get(quant, p)
  shape = (n_out, n_in // part.group_size, part.num_codebooks)
  q["vq_codes"] = pack.unpack(q.pop("vq_packed"), part.codebook_bits, shape).astype(np.int32)
  q["vq_scales"] = q["vq_scales"].astype(np.float32)
  books = _get(quant, owner)["vq_codebooks"]
  q["vq_codebooks"] = books.astype(np.float32)


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
    if set(meta["layers"]) != set(quantized_layer_paths(quant)):
      raise ValueError(f"quantized layers {quantized_layer_paths(quant)[:3]}... differ from the manifest's "
                       f"{sorted(meta['layers'])[:3]}...")
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{path} is a malformed quantized DiT export ({type(e).__name__}: {e}); re-export it with "
                     "diffq.io.quantized.export_quantized.") from e
  owners = meta.get("vq_codebooks_of", {})
  for p in sorted(meta["layers"], key=lambda p: owners.get(p) == p, reverse=True):  # codebook holders first
    shape = meta["layers"][p]
    try:
      q = _get(quant, p)
      if p in owners:
        _unpack_vq(quant, p, spec_lib.resolve(p, table).weight, *shape, owners[p])
      else:
        q["w_codes"] = _decode(q.pop("w_packed"), q, spec_lib.resolve(p, table).weight, *shape)
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{path}: quantized layer {p} is malformed ({type(e).__name__}: {e}); re-export it with "
                       "diffq.io.quantized.export_quantized.") from e
  variables = {"params": params, "quant": quant}
  npz.check_shapes(variables, dit.variable_shapes(model_cfg, table), f"{path} (model {meta['model']})")
  return model_cfg, variables, table
