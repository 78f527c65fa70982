"""Reference statistics of the Fashion-MNIST test split under a given evaluator, computed once and cached.

The cache file is an ADM-format reference batch (`arr_0` uint8 images, `mu`, `sigma`, `mu_s`, `sigma_s`) plus the
pooled features `pool` (for precision/recall and KID), keyed by the evaluator file's sha256, so a different
evaluator can never be paired with stale statistics.
"""
from __future__ import annotations

import os

import numpy as np
from absl import logging

from diffq import data
from diffq.eval import metrics
from diffq.io import npz


def default_cache_dir() -> str:
  return os.environ.get("DIFFQ_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "diffq"))


def cached(cache_dir: str, evaluator_sha: str, split: str) -> bool:
  return os.path.exists(reference_path(cache_dir or default_cache_dir(), evaluator_sha, split))


def reference_path(cache_dir: str, evaluator_sha: str, split: str) -> str:
  return os.path.join(cache_dir, f"ref_fashion_mnist_{split}_{evaluator_sha[:16]}.npz")


KEYS = ("arr_0", "mu", "sigma", "mu_s", "sigma_s", "pool")


def compute_reference(evaluator, images_u8: np.ndarray) -> dict[str, np.ndarray]:
  feats = evaluator.features(images_u8)
  mu, sigma = metrics.feature_stats(feats["pool"])
  mu_s, sigma_s = metrics.feature_stats(feats["spatial"].reshape(len(images_u8), -1))
  return dict(arr_0=images_u8, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, pool=feats["pool"])


def load_or_compute(evaluator, evaluator_sha: str, cache_dir: str = "", split: str = "test",
                    data_dir: str = data.DEFAULT_DIR, dir_flag: str = data.DIR_FLAG) -> dict[str, np.ndarray]:
  """The reference dict for `split`; computed from the dataset on first use, then read from the cache. A cache
  file that cannot be read or lacks a statistic is recomputed (it is derived data) with a warning."""
  path = reference_path(cache_dir or default_cache_dir(), evaluator_sha, split)
  if os.path.exists(path):
    try:
      ref = npz.read_npz(path)
      if set(ref) >= set(KEYS):
        return ref
      problem = f"it lacks {sorted(set(KEYS) - set(ref))}"
    except ValueError as e:
      problem = str(e)
    logging.warning("Reference statistics cache %s is unusable (%s); recomputing it.", path, problem)
  logging.info("Computing reference statistics of Fashion-MNIST %s -> %s", split, path)
  images, _ = data.load_raw(split, data_dir, dir_flag)
  ref = compute_reference(evaluator, data.to_uint8(data.to_model_space(images)))

  def write(tmp):
    with open(tmp, "wb") as f:
      np.savez(f, **ref)

  npz.atomic_write(path, write)
  return ref
