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

import numpy as np

from diffq.io import state_dict
from diffq.models import dit

WEIGHTS_NAME = state_dict.DIFFUSERS_WEIGHTS


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


def params_from_state_dict(sd: dict[str, np.ndarray], config: dit.DiTConfig) -> dict:
  """Maps a diffusers state dict (numpy) onto the diffq DiT param tree; checks every key is used."""
  sd = state_dict.Tracked(sd, "diffusers DiTTransformer2DModel")
  emb = "transformer_blocks.{}.norm1.emb."
  for i in range(1, config.depth):  # per-block embedder copies must all equal block 0's
    for key in [k for k in sd if k.startswith(emb.format(i))]:
      ref = sd[key.replace(emb.format(i), emb.format(0), 1)]
      if not np.array_equal(sd[key], ref):
        raise ValueError(f"{key} differs from block 0's copy; diffq's DiT has one shared embedder.")
  e0 = emb.format(0)
  w = sd["pos_embed.proj.weight"]  # (D, C, p, p)
  params = {
      "x_embedder": {"kernel": state_dict.patch_kernel(w), "bias": sd["pos_embed.proj.bias"]},
      "t_embedder": {"mlp_0": state_dict.dense(sd, e0 + "timestep_embedder.linear_1"),
                     "mlp_2": state_dict.dense(sd, e0 + "timestep_embedder.linear_2")},
      "y_embedder": {"embedding_table": {"embedding": sd[e0 + "class_embedder.embedding_table.weight"]}},
      "final_layer": {"adaLN_modulation": state_dict.dense(sd, "proj_out_1"),
                      "linear": state_dict.dense(sd, "proj_out_2")},
  }
  for i in range(config.depth):
    b = f"transformer_blocks.{i}."
    q, k, v = (state_dict.dense(sd, f"{b}attn1.to_{n}") for n in "qkv")
    params[f"blocks_{i}"] = {
        "adaLN_modulation": state_dict.dense(sd, b + "norm1.linear"),
        "attn": {"qkv": {"kernel": np.concatenate([q["kernel"], k["kernel"], v["kernel"]], axis=1),
                         "bias": np.concatenate([q["bias"], k["bias"], v["bias"]])},
                 "proj": state_dict.dense(sd, b + "attn1.to_out.0")},
        "mlp": {"fc1": state_dict.dense(sd, b + "ff.net.0.proj"), "fc2": state_dict.dense(sd, b + "ff.net.2")},
    }
  sd.check_all_used()  # embedder copies were read by the equality check above
  return params


def load_diffusers_dit(directory: str) -> tuple[dit.DiTConfig, dict]:
  """(DiTConfig, params) from a diffusers save_pretrained directory (e.g. facebook/DiT-XL-2-256/transformer)."""
  config, sd = state_dict.read_diffusers_dir(directory, "DiTTransformer2DModel", config_from_diffusers)
  return config, params_from_state_dict(sd, config)
