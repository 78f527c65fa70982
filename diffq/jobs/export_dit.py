"""Export job: any model source -> the project's numpy export (.npz + manifest), which every job reads.

Sources: a training workdir (latest EMA), a diffq DiT export, a diffusers directory (`DiTTransformer2DModel` or
`AutoencoderKL`, told apart by config.json's _class_name) or a facebookresearch/DiT .pt checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from diffq.io import diffusers_dit, diffusers_vae, npz, official_dit
from diffq.jobs import common, sample


def read_source(config):
  """(manifest kind, model config, params, training steps or None) of config.source."""
  src = config.source
  if not os.path.exists(src):
    raise FileNotFoundError(f"No model at {src} (--config.source): a training workdir, a DiT export (.npz), a "
                            "diffusers DiTTransformer2DModel / AutoencoderKL directory or a DiT .pt checkpoint.")
  if config.num_heads and not src.endswith((".pt", ".pth")):
    raise ValueError(f"--config.num_heads is for .pt checkpoints (which do not store it); {src} has its own "
                     "architecture record: unset num_heads.")
  diffusers_cfg = os.path.join(src, "config.json")
  if os.path.isdir(src) and os.path.exists(os.path.join(src, diffusers_vae.WEIGHTS_NAME)):
    if not os.path.exists(diffusers_cfg):
      raise FileNotFoundError(f"{src} holds {diffusers_vae.WEIGHTS_NAME} but no config.json: copy the model's "
                              "config.json next to it (diffusers save_pretrained writes both).")
    with open(diffusers_cfg) as f:
      if json.load(f).get("_class_name") == "AutoencoderKL":
        return (sample.VAE_KIND, *diffusers_vae.load_diffusers_vae(src), None)
    return ("dit_params", *diffusers_dit.load_diffusers_dit(src), None)
  if os.path.isdir(src):
    return ("dit_params", *sample.load_training_run(src))
  if src.endswith((".pt", ".pth")):
    return ("dit_params", *official_dit.load_official_dit(src, config.num_heads or None), None)
  return ("dit_params", *sample.load_dit(src), None)


def run(config, workdir: str) -> dict:
  if not config.source or not config.dest:
    raise ValueError("Set --config.source (a training workdir, DiT export, diffusers directory or DiT .pt) and "
                     "--config.dest (.npz path).")
  kind, model_cfg, params, steps = read_source(config)
  manifest = npz.export_npz(config.dest, jax.device_get(params),
                            metadata=dict(kind=kind, model=dataclasses.asdict(model_cfg), steps=steps,
                                          source=os.path.abspath(config.source)))
  result = dict(dest=config.dest, kind=kind, sha256=manifest["sha256"], steps=steps if steps is not None else -1,
                params=int(sum(np.size(x) for x in jax.tree.leaves(params))))
  common.write_metrics(workdir, result)
  return result
