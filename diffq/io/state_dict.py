"""Reading PyTorch-layout state dicts (numpy arrays by dotted key) into Flax trees: the pieces every converter uses."""
from __future__ import annotations

import json
import os

import numpy as np

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


class Tracked(dict):
  """A state dict that records which keys were read, so a converter can refuse keys it did not map."""

  def __init__(self, sd: dict[str, np.ndarray], what: str):
    super().__init__(sd)
    self.used: set[str] = set()
    self.what = what

  def __getitem__(self, k):
    if k not in self:
      raise KeyError(f"State dict lacks {k!r}; is this a {self.what} checkpoint?")
    self.used.add(k)
    return dict.__getitem__(self, k)

  def check_all_used(self):
    unused = sorted(set(self) - self.used)
    if unused:
      raise ValueError(f"Unconverted {self.what} keys (unsupported architecture?): {unused[:8]}")


def dense(sd, prefix: str) -> dict:
  """torch Linear (out, in) weight + bias -> Flax {'kernel': (in, out), 'bias'}."""
  return {"kernel": np.ascontiguousarray(sd[f"{prefix}.weight"].T), "bias": sd[f"{prefix}.bias"]}


def patch_kernel(w: np.ndarray) -> np.ndarray:
  """A stride-p patch conv (D, C, p, p) -> the equivalent matmul kernel over (p, q, c)-ordered patch features."""
  return np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0]))


def read_diffusers_dir(directory: str, what: str, config_from):
  """(config_from(config.json), float32 state dict) of a diffusers save_pretrained directory of a `what` model;
  the config is parsed (and refused) before the weights are read with the safetensors numpy API (no torch)."""
  from safetensors.numpy import load_file
  cfg_path, w_path = os.path.join(directory, "config.json"), os.path.join(directory, DIFFUSERS_WEIGHTS)
  for p in (cfg_path, w_path):
    if not os.path.exists(p):
      raise FileNotFoundError(f"{p} not found: expected a diffusers {what} directory (config.json + "
                              f"{DIFFUSERS_WEIGHTS}).")
  with open(cfg_path) as f:
    config = config_from(json.load(f))
  return config, {k: np.asarray(v, np.float32) for k, v in load_file(w_path).items()}
