"""diffusers `AutoencoderKL` (config.json + safetensors, e.g. stabilityai/sd-vae-ft-ema) -> diffq VAE
(VAEConfig, params).

Reads weights with the safetensors numpy API (no torch). diffq's module tree mirrors diffusers' names with list
indices joined (`down_blocks.0.resnets.1.conv1` -> `down_blocks_0/resnets_1/conv1`), so the mapping is per leaf:
conv weights (O, I, kh, kw) -> kernels (kh, kw, I, O); linear weights (O, I) -> (I, O); GroupNorm weight -> scale.
Checkpoints saved before diffusers renamed the mid-block attention (`query`, `key`, `value`, `proj_attn`, as
sd-vae-ft-ema's own files are) are read too, their 1x1-conv attention weights (CompVis layout) included.
"""
from __future__ import annotations

import re

import flax
import numpy as np

from diffq.io import state_dict
from diffq.models import vae

WEIGHTS_NAME = state_dict.DIFFUSERS_WEIGHTS
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_BLOCK_TYPES = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}


def config_from_diffusers(cfg: dict) -> vae.VAEConfig:
  if cfg.get("_class_name") not in (None, "AutoencoderKL"):
    raise ValueError(f"Expected an AutoencoderKL config, got _class_name={cfg.get('_class_name')!r}.")
  for key, kind in _BLOCK_TYPES.items():
    if any(b != kind for b in cfg.get(key, [kind])):
      raise ValueError(f"{key}={cfg[key]}: only {kind} blocks (the SD-VAE architecture) can be converted.")
  if cfg.get("act_fn", "silu") != "silu" or cfg.get("latents_mean") is not None or cfg.get("shift_factor"):
    raise ValueError("Only SiLU AutoencoderKLs without latents_mean/std or shift_factor (the SD-VAE family, whose "
                     "latents are z * scaling_factor) can be converted.")
  chans = tuple(cfg.get("block_out_channels", (64,)))
  for key in _BLOCK_TYPES:
    if key in cfg and len(cfg[key]) != len(chans):
      raise ValueError(f"{key} has {len(cfg[key])} entries for {len(chans)} block_out_channels.")
  return vae.VAEConfig(
      in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
      latent_channels=cfg.get("latent_channels", 4), block_out_channels=chans,
      layers_per_block=cfg.get("layers_per_block", 1), norm_num_groups=cfg.get("norm_num_groups", 32),
      scaling_factor=cfg.get("scaling_factor", 0.18215), use_quant_conv=cfg.get("use_quant_conv", True),
      use_post_quant_conv=cfg.get("use_post_quant_conv", True),
      mid_block_add_attention=cfg.get("mid_block_add_attention", True))


def _target(key: str) -> tuple[tuple[str, ...], str]:
  """diffusers key -> (diffq module path, leaf kind 'weight' | 'bias')."""
  *mods, leaf = key.split(".")
  mods = [_LEGACY_ATTENTION.get(m, m) for m in mods]
  mods = ".".join(mods).split(".")  # to_out.0 from the legacy map splits too
  path = []
  for m in mods:
    if re.fullmatch(r"\d+", m) and path:
      path[-1] += f"_{m}"
    else:
      path.append(m)
  return tuple(path), leaf


def params_from_state_dict(sd: dict[str, np.ndarray], config: vae.VAEConfig) -> dict:
  """Maps a diffusers AutoencoderKL state dict (numpy) onto the diffq VAE param tree; every key of either side
  must be used, shapes must match."""
  shapes = flax.traverse_util.flatten_dict(vae.variable_shapes(config))
  out = {}
  for key, w in sd.items():
    path, leaf = _target(key)
    if leaf not in ("weight", "bias"):
      raise ValueError(f"Unexpected diffusers key {key!r} (unsupported architecture?).")
    if leaf == "bias":
      name = "bias"
    elif path + ("kernel",) in shapes:
      name = "kernel"
      if w.ndim == 4 and len(shapes[path + ("kernel",)].shape) == 2:  # legacy 1x1-conv attention weights
        w = w[:, :, 0, 0]
      w = w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T
    else:
      name = "scale"
    full = path + (name,)
    if full not in shapes:
      raise ValueError(f"diffusers key {key!r} has no place in the diffq VAE ({'/'.join(full)}); is this an "
                       "SD-VAE AutoencoderKL with the config next to it?")
    if tuple(w.shape) != tuple(shapes[full].shape):
      raise ValueError(f"{key}: shape {w.shape} after conversion, the config implies {shapes[full].shape}.")
    out[full] = np.ascontiguousarray(w, np.float32)
  missing = sorted("/".join(k) for k in set(shapes) - set(out))
  if missing:
    raise ValueError(f"diffusers state dict lacks {len(missing)} VAE parameters, e.g. {missing[:4]}.")
  return flax.traverse_util.unflatten_dict(out)


def load_diffusers_vae(directory: str) -> tuple[vae.VAEConfig, dict]:
  """(VAEConfig, params) from a diffusers save_pretrained directory (e.g. stabilityai/sd-vae-ft-ema)."""
  config, sd = state_dict.read_diffusers_dir(directory, "AutoencoderKL", config_from_diffusers)
  return config, params_from_state_dict(sd, config)
