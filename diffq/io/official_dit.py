"""facebookresearch/DiT checkpoints (`DiT-XL-2-256x256.pt`: a torch state dict of the EMA weights) -> diffq DiT
(DiTConfig, params).

The file is read with `torch.load(..., weights_only=True)`: tensors and containers only, no code from the file
runs (torch is needed for the zip-pickle format; the converted .npz is then torch-free). The architecture is read
off the tensor shapes; the head count, which no shape carries, comes from the official model table by width
(S 384 -> 6, B 768 -> 12, L 1024 -> 16, XL 1152 -> 16) or from `num_heads`. The stored `pos_embed` is not a
parameter in diffq (recomputed) but is checked against the recomputed one, which catches a wrong input size.
Key mapping: ../shared/research/jax_ecosystem.md §6.2 (the original DiT's names are diffq's, up to list indices).
"""
from __future__ import annotations

import numpy as np

from diffq.io import state_dict
from diffq.models import dit

HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16}


def config_from_state_dict(sd: dict[str, np.ndarray], num_heads: int | None = None) -> dit.DiTConfig:
  for k in ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight", "final_layer.linear.weight"):
    if k not in sd:
      raise ValueError(f"State dict lacks {k!r}: not a facebookresearch/DiT checkpoint.")
  hidden, in_ch, p, _ = sd["x_embedder.proj.weight"].shape
  if num_heads is None:
    if hidden not in HEADS_BY_WIDTH:
      raise ValueError(f"Width {hidden} is none of the official DiT sizes {sorted(HEADS_BY_WIDTH)}; pass "
                       "num_heads (the head count is not stored in the weights).")
    num_heads = HEADS_BY_WIDTH[hidden]
  tokens = sd["pos_embed"].shape[1]
  grid = int(round(tokens ** 0.5))
  if grid * grid != tokens:
    raise ValueError(f"pos_embed has {tokens} tokens, not a square grid.")
  depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
  rows = sd["y_embedder.embedding_table.weight"].shape[0]
  out_ch = sd["final_layer.linear.weight"].shape[0] // (p * p)
  if out_ch not in (in_ch, 2 * in_ch):
    raise ValueError(f"The final layer emits {out_ch} channels for {in_ch} inputs (expected 1x or 2x).")
  return dit.DiTConfig(input_size=grid * p, patch_size=p, in_channels=in_ch, hidden_size=hidden, depth=depth,
                       num_heads=num_heads, num_classes=rows - 1, class_dropout_prob=0.1,
                       learn_sigma=out_ch == 2 * in_ch)


def params_from_state_dict(sd: dict[str, np.ndarray], config: dit.DiTConfig) -> dict:
  """Maps an official DiT state dict (numpy) onto the diffq DiT param tree; checks every key is used."""
  sd = state_dict.Tracked(sd, "facebookresearch/DiT")
  pos = dit.sincos_pos_embed_2d(config.hidden_size, config.grid_size)
  if not np.allclose(sd["pos_embed"][0], pos, atol=1e-5):
    raise ValueError("The stored pos_embed differs from the 2-D sin-cos positions of a "
                     f"{config.grid_size}x{config.grid_size} grid: not an official DiT checkpoint?")
  w = sd["x_embedder.proj.weight"]  # (D, C, p, p) -> a matmul over (p, q, c)-ordered patch features
  params = {
      "x_embedder": {"kernel": state_dict.patch_kernel(w), "bias": sd["x_embedder.proj.bias"]},
      "t_embedder": {"mlp_0": state_dict.dense(sd, "t_embedder.mlp.0"),
                     "mlp_2": state_dict.dense(sd, "t_embedder.mlp.2")},
      "y_embedder": {"embedding_table": {"embedding": sd["y_embedder.embedding_table.weight"]}},
      "final_layer": {"adaLN_modulation": state_dict.dense(sd, "final_layer.adaLN_modulation.1"),
                      "linear": state_dict.dense(sd, "final_layer.linear")},
  }
  for i in range(config.depth):
    b = f"blocks.{i}."
    params[f"blocks_{i}"] = {
        "adaLN_modulation": state_dict.dense(sd, b + "adaLN_modulation.1"),
        "attn": {"qkv": state_dict.dense(sd, b + "attn.qkv"), "proj": state_dict.dense(sd, b + "attn.proj")},
        "mlp": {"fc1": state_dict.dense(sd, b + "mlp.fc1"), "fc2": state_dict.dense(sd, b + "mlp.fc2")},
    }
  sd.check_all_used()
  return params


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A torch checkpoint's tensors as float32 numpy, loaded with weights_only=True (no code from the file runs).
  Accepts a plain state dict (the released files) or a dict of tensors-only entries with the state dict under
  'ema'; DiT's train.py checkpoints also hold an argparse Namespace, which weights_only refuses (the error says
  how to re-save the EMA alone)."""
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"Reading {path} needs torch (the .pt format is a torch zip-pickle): pip install torch "
                      "(the CPU build is enough), convert once, then use the .npz.") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle.UnpicklingError for anything beyond tensors and containers
    raise ValueError(f"{path} holds more than tensors (torch.load(weights_only=True) refused it: {e}). For a "
                     "train.py checkpoint, re-save its EMA alone: torch.save(torch.load(p)['ema'], 'ema.pt') where "
                     "you trust the file.") from e
  if isinstance(obj, dict) and "ema" in obj and isinstance(obj["ema"], dict):
    obj = obj["ema"]
  if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
    raise ValueError(f"{path} is not a state dict of tensors.")
  return {k: v.detach().to(torch.float32).numpy() for k, v in obj.items()}


def load_official_dit(path: str, num_heads: int | None = None) -> tuple[dit.DiTConfig, dict]:
  """(DiTConfig, params) from a facebookresearch/DiT .pt checkpoint (e.g. DiT-XL-2-256x256.pt)."""
  sd = read_state_dict(path)
  config = config_from_state_dict(sd, num_heads)
  return config, params_from_state_dict(sd, config)
