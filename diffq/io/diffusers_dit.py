"""diffusers `DiTTransformer2DModel` (config.json + safetensors) -> diffq DiT (DiTConfig, params).

Reads weights with the safetensors numpy API (no torch). diffusers conventions handled here:
- PyTorch Linear weights are (out, in): transposed to Flax (in, out) kernels;
- the patch conv (D, C, p, p) becomes a matmul over (p, q, c)-ordered patch features;
- separate to_q/to_k/to_v become diffq's fused qkv (q, k, v order);
- every block carries its own copy of the timestep/class embedder (`norm1.emb`) and the final layer uses
  block 0's; diffq has one embedder, so the copies must be identical (checked);
- timestep frequencies divide by half-1 (`downscale_freq_shift=1`) -> DiTConfig.freq_shift=1;
- the pre-MLP LayerNorm uses `norm_eps` (default 1e-5) -> DiTConfig.mlp_norm_eps.
"""
from __future__ import annotations

import json
import os

import numpy as np

from diffq.models import dit

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def config_from_diffusers(cfg: dict) -> dit.DiTConfig:
  if cfg.get("_class_name") not in (None, "DiTTransformer2DModel"):
    raise ValueError(f"Expected a DiTTransformer2DModel config, got _class_name={cfg.get('_class_name')!r}.")
  if cfg.get("norm_type", "ada_norm_zero") != "ada_norm_zero" or cfg.get("norm_elementwise_affine", False):
    raise ValueError("Only adaLN-Zero DiTs with non-affine norms (the DiT architecture) can be converted.")
  in_ch = cfg.get("in_channels", 4)
  out_ch = cfg.get("out_channels") or in_ch
  if out_ch not in (in_ch, 2 * in_ch):
    raise ValueError(f"out_channels={out_ch} must equal in_channels ({in_ch}) or twice it (learned sigma).")
  return dit.DiTConfig(
      input_size=cfg.get("sample_size", 32), patch_size=cfg.get("patch_size", 2), in_channels=in_ch,
      hidden_size=cfg.get("num_attention_heads", 16) * cfg.get("attention_head_dim", 72),
      depth=cfg.get("num_layers", 28), num_heads=cfg.get("num_attention_heads", 16),
      num_classes=cfg.get("num_embeds_ada_norm", 1000), learn_sigma=out_ch == 2 * in_ch, freq_shift=1,
      mlp_norm_eps=cfg.get("norm_eps", 1e-5))


def _dense(sd, prefix):
  return {"kernel": np.ascontiguousarray(sd[f"{prefix}.weight"].T), "bias": sd[f"{prefix}.bias"]}


def params_from_state_dict(sd: dict[str, np.ndarray], config: dit.DiTConfig) -> dict:
  """Maps a diffusers state dict (numpy) onto the diffq DiT param tree; checks every key is used."""
  used = set()

  class Tracked(dict):
    def __getitem__(self, k):
      if k not in self:
        raise KeyError(f"diffusers state dict lacks {k!r}; is this a DiTTransformer2DModel checkpoint?")
      used.add(k)
      return dict.__getitem__(self, k)

  sd = Tracked(sd)
  emb = "transformer_blocks.{}.norm1.emb."
  for i in range(1, config.depth):  # per-block embedder copies must all equal block 0's
    for key in [k for k in sd if k.startswith(emb.format(i))]:
      ref = sd[key.replace(emb.format(i), emb.format(0), 1)]
      if not np.array_equal(sd[key], ref):
        raise ValueError(f"{key} differs from block 0's copy; diffq's DiT has one shared embedder.")
  e0 = emb.format(0)
  w = sd["pos_embed.proj.weight"]  # (D, C, p, p)
  params = {
      "x_embedder": {"kernel": np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])),
                     "bias": sd["pos_embed.proj.bias"]},
      "t_embedder": {"mlp_0": _dense(sd, e0 + "timestep_embedder.linear_1"),
                     "mlp_2": _dense(sd, e0 + "timestep_embedder.linear_2")},
      "y_embedder": {"embedding_table": {"embedding": sd[e0 + "class_embedder.embedding_table.weight"]}},
      "final_layer": {"adaLN_modulation": _dense(sd, "proj_out_1"), "linear": _dense(sd, "proj_out_2")},
  }
  for i in range(config.depth):
    b = f"transformer_blocks.{i}."
    q, k, v = (_dense(sd, f"{b}attn1.to_{n}") for n in "qkv")
    params[f"blocks_{i}"] = {
        "adaLN_modulation": _dense(sd, b + "norm1.linear"),
        "attn": {"qkv": {"kernel": np.concatenate([q["kernel"], k["kernel"], v["kernel"]], axis=1),
                         "bias": np.concatenate([q["bias"], k["bias"], v["bias"]])},
                 "proj": _dense(sd, b + "attn1.to_out.0")},
        "mlp": {"fc1": _dense(sd, b + "ff.net.0.proj"), "fc2": _dense(sd, b + "ff.net.2")},
    }
  unused = set(sd) - used  # embedder copies were read by the equality check above
  if unused:
    raise ValueError(f"Unconverted diffusers keys (unsupported architecture?): {sorted(unused)[:8]}")
  return params


def load_diffusers_dit(directory: str) -> tuple[dit.DiTConfig, dict]:
  """(DiTConfig, params) from a diffusers save_pretrained directory (e.g. facebook/DiT-XL-2-256/transformer)."""
  from safetensors.numpy import load_file
  cfg_path, w_path = os.path.join(directory, "config.json"), os.path.join(directory, WEIGHTS_NAME)
  for p in (cfg_path, w_path):
    if not os.path.exists(p):
      raise FileNotFoundError(f"{p} not found: expected a diffusers DiTTransformer2DModel directory "
                              f"(config.json + {WEIGHTS_NAME}).")
  with open(cfg_path) as f:
    config = config_from_diffusers(json.load(f))
  sd = {k: np.asarray(v, np.float32) for k, v in load_file(w_path).items()}
  return config, params_from_state_dict(sd, config)
