"""Helpers for config files: big_vision-style `file.py:key=val,flag` arguments and model sub-configs."""
from __future__ import annotations

import dataclasses

import ml_collections

from diffq.models import dit


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'a=1,b=x,flag' -> ConfigDict(a=1, b='x', flag=True), typed by `defaults`; unknown keys are errors."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r}; known: {sorted(defaults)}.")
    if not _:
      value = True
    elif isinstance(defaults[key], bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"Config argument {key} expects a bool, got {value!r}.")
      value = value.lower() in ("true", "1")
    else:
      value = type(defaults[key])(value)
    out[key] = value
  return out


def model_config(preset: str, **overrides) -> ml_collections.ConfigDict:
  """Every DiTConfig field of a preset, so any of them can be overridden with --config.model.X=..."""
  return ml_collections.ConfigDict(dataclasses.asdict(dit.preset(preset, **overrides)))


def dit_config(model_cfg) -> dit.DiTConfig:
  return dit.DiTConfig(**dict(model_cfg))


def eval_config() -> ml_collections.ConfigDict:
  """How samples are scored: frozen evaluator, reference split, cache for its statistics, KID subsets."""
  return ml_collections.ConfigDict(dict(evaluator="", reference_split="test", cache_dir="", data_dir=
                                        "/usr/share/datasets/fashion-mnist", kid_subsets=100, kid_subset_size=1000))
