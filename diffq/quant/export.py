"""Deployable export of a fake-quant DiT: packed integer weight codes + scales, and its exact re-import.

Per quantized layer the npz holds `w_packed` (uint8): output channel c's `in` codes packed at that channel's bit
width (symmetric codes offset by 2^(b-1) to be unsigned), each channel starting on a byte boundary, channels
in order; plus `w_scale`, `w_zero` (rounded, as used), `w_bits` (mixed precision), `smooth`, `a_scale`,
`a_zero`. Float kernels of quantized layers are not stored; LoRA is merged into the codes. Everything else
(biases, the label table, float layers) stays float32 under `params/`. The manifest metadata holds the DiT
config, the policy table and each quantized layer's (in, out).

Re-import gives an `intweight` model whose outputs equal the fake-quant model's bit for bit.
"""
from __future__ import annotations

import dataclasses

import flax
import jax
import numpy as np

from diffq.io import npz
from diffq.models import dit, layers
from diffq.quant import pack

KIND = "dit_quantized"
STORED = ("w_scale", "w_zero", "w_bits", "smooth", "a_scale", "a_zero")


def intweight_table(table: layers.PolicyTable) -> tuple:
  """`table` with every fakequant policy replaced by its deployed intweight form (LoRA merged)."""
  return tuple((pat, dataclasses.replace(pol, kind="intweight", lora_rank=0) if pol.kind == "fakequant" else pol)
               for pat, pol in table)


def _layer_paths(quant: dict) -> list[str]:
  return sorted({"/".join(k[:-1]) for k in flax.traverse_util.flatten_dict(quant) if k[-1] == "w_scale"})


def _get(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def _channel_bits(q: dict, pol: layers.LayerPolicy, n_out: int) -> np.ndarray:
  return np.asarray(q["w_bits"]).reshape(-1) if pol.mixed_bits else np.full(n_out, pol.w_bits)


def export_quantized(path: str, model_cfg: dit.DiTConfig, params, quant, table: layers.PolicyTable,
                     metadata: dict | None = None) -> dict:
  """Writes the export; returns stats: bits_per_weight (stored bits per matmul/embedding weight; float ones
  count 32), model_bytes (all stored arrays), code_bytes, fp_model_bytes (the float32 params)."""
  params, quant = jax.device_get(params), jax.device_get(quant)
  flat = {"params/" + k: np.asarray(v) for k, v in npz.flatten(params).items()}
  shapes, code_bits, n_quantized = {}, 0, 0
  for p in _layer_paths(quant):
    pol, q = layers.resolve_policy(p, table), _get(quant, p)
    if pol.kind != "fakequant":
      raise ValueError(f"Layer {p} has policy kind {pol.kind!r}; export_quantized expects the fakequant model.")
    kernel = _get(params, p)["kernel"]
    codes = np.asarray(layers.weight_codes(kernel, q, pol))
    bits = _channel_bits(q, pol, kernel.shape[1])
    if pol.w_symmetric:
      codes = codes + (1 << (bits - 1))[None, :]
    flat[f"quant/{p}/w_packed"], _ = pack.pack_rows(codes.T, bits)
    for name in STORED:
      if name in q:
        flat[f"quant/{p}/{name}"] = np.round(q[name]) if name == "w_zero" else np.asarray(q[name])
    del flat[f"params/{p}/kernel"]
    shapes[p] = list(kernel.shape)
    code_bits += int(bits.sum()) * kernel.shape[0]
    n_quantized += kernel.size
  float_weights = sum(v.size for k, v in flat.items() if k.startswith("params/") and k.endswith(("kernel",
                                                                                                 "embedding")))
  meta = dict(metadata or {}, kind=KIND, model=dataclasses.asdict(model_cfg), layers=shapes,
              policies=[[pat, dataclasses.asdict(pol)] for pat, pol in table])
  npz.export_npz(path, npz.unflatten(flat), metadata=meta)
  return dict(bits_per_weight=(code_bits + 32 * float_weights) / (n_quantized + float_weights),
              model_bytes=sum(v.nbytes for v in flat.values()),
              code_bytes=sum(v.nbytes for k, v in flat.items() if k.endswith("w_packed")),
              fp_model_bytes=sum(4 * np.size(v) for v in jax.tree.leaves(params)))


def import_quantized(path: str) -> tuple[dit.DiTConfig, dict, tuple]:
  """(DiT config, {"params", "quant"} for the intweight model, its policy table) from `export_quantized`."""
  tree, manifest = npz.import_npz(path)
  meta = manifest["metadata"]
  if meta.get("kind") != KIND:
    raise ValueError(f"{path} is not a quantized DiT export (manifest kind={meta.get('kind')!r}); write one with "
                     "diffq.quant.export.export_quantized (the quantize job does).")
  table = intweight_table(tuple((pat, layers.LayerPolicy(**pol)) for pat, pol in meta["policies"]))
  quant = tree.get("quant", {})
  for p, (n_in, n_out) in meta["layers"].items():
    q, pol = _get(quant, p), layers.resolve_policy(p, table)
    bits = _channel_bits(q, pol, n_out)
    row_bytes = -(-n_in * bits // 8)
    offsets = np.concatenate([[0], np.cumsum(row_bytes)])
    packed = q.pop("w_packed")
    if packed.size != offsets[-1]:
      raise ValueError(f"{path}: layer {p} holds {packed.size} code bytes, its bit widths need {offsets[-1]}.")
    codes = pack.unpack_rows(packed, offsets, bits, n_in).T.astype(np.int32)
    q["w_codes"] = codes - (1 << (bits - 1))[None, :] if pol.w_symmetric else codes
  return dit.DiTConfig(**meta["model"]), {"params": tree["params"], "quant": quant}, table
