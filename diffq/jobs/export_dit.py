"""Export job: any model source -> the project's numpy export (.npz + manifest), which every job reads.

Sources: a training workdir (latest EMA), a diffq DiT export, a diffusers directory (`DiTTransformer2DModel` or
`AutoencoderKL`, told apart by config.json's _class_name), a facebookresearch/DiT .pt checkpoint, or
`random:<DiT preset>` or `random:vae` (random weights, `config.overrides` on the architecture; `random_model`) for
pipeline and speed checks without downloads.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import os
import re

import jax
import numpy as np

from diffq.io import diffusers_dit, diffusers_vae, npz, official_dit
from diffq.jobs import common, sample
from diffq.models import dit, vae


RANDOM_STD = 0.02


def parse_overrides(text: str, cls) -> dict:
  """"key=value,..." (values Python literals: numbers, True/False, tuples) -> fields of the dataclass `cls`."""
  fields = {f.name for f in dataclasses.fields(cls)}
  kw = {}
  for item in filter(None, re.split(r",(?![^()]*\))", text)):
    key, _, value = item.partition("=")
    try:
      kw[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      key = ""
    if key not in fields:
      raise ValueError(f"Bad model override {item!r} (--config.overrides): write key=value, a number, True/False "
                       f"or a tuple, with key one of {sorted(fields)}.")
  return kw


def random_model(name: str, overrides: str, seed: int):
  """(manifest kind, config, params) of `random:<name>`: a DiT preset (DiT's initialisation, every parameter
  then perturbed by N(0, RANDOM_STD^2)) or 'vae' (SD-VAE's architecture, flax's initialisers), `overrides`
  applied to its config."""
  if name == "vae":
    cfg = vae.VAEConfig(**parse_overrides(overrides, vae.VAEConfig))
    return sample.VAE_KIND, cfg, vae.init_params(cfg, jax.random.key(seed))
  cfg = dit.preset(name, **parse_overrides(overrides, dit.DiTConfig))
  params = dit.init_params(cfg, jax.random.key(seed))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return "dit_params", cfg, jax.tree.unflatten(tree, [p + RANDOM_STD * jax.random.normal(k, p.shape)
                                                      for p, k in zip(leaves, keys)])


def read_source(config):
  """(manifest kind, model config, params, training steps or None) of config.source."""
  src = config.source
  if src.startswith("random:"):
    return (*random_model(src[len("random:"):], config.get("overrides", ""), config.get("seed", 0)), None)
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
