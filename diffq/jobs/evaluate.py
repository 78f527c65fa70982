"""Evaluate job: ADM-format samples.npz -> metrics.json (classifier-feature FID/sFID/IS/P/R/KID, class accuracy)."""
from __future__ import annotations

import os
import time

import numpy as np
from absl import logging

from diffq.eval import evaluator as evaluator_lib
from diffq.eval import reference, sample_quality
from diffq.io import npz
from diffq.jobs import common


def score(eval_cfg, images_u8: np.ndarray, labels: np.ndarray | None) -> dict:
  """Metrics of `images_u8` under the configured evaluator; names the extractor in `feature_extractor`."""
  path = eval_cfg.evaluator or evaluator_lib.DEFAULT_PATH
  ev = evaluator_lib.load_evaluator(path)
  sha = npz.load_manifest(path)["sha256"]
  expected = (32, 32, 1)
  if images_u8.shape[1:] != expected:
    raise ValueError(f"Samples have shape {list(images_u8.shape[1:])} per image but the Fashion-MNIST evaluator "
                     f"needs {list(expected)}. (ImageNet samples go to the official ADM evaluator.)")
  t0 = time.time()
  ref = reference.load_or_compute(ev, sha, eval_cfg.cache_dir, eval_cfg.reference_split, eval_cfg.data_dir)
  out = sample_quality.evaluate(ev, ref, images_u8, labels, eval_cfg.kid_subsets, eval_cfg.kid_subset_size)
  out.update(feature_extractor=f"evaluator_fm@{sha[:12]}", reference=f"fashion_mnist/{eval_cfg.reference_split}",
             eval_seconds=time.time() - t0)
  return out


def run(config, workdir: str) -> dict:
  if not config.samples:
    raise ValueError("Set --config.samples=PATH to an ADM-format samples.npz (arr_0 uint8 NHWC, arr_1 labels).")
  images, labels = sample_quality.load_samples(config.samples)
  result = dict(samples=os.path.abspath(config.samples), **score(config.eval, images, labels))
  common.write_metrics(workdir, result)
  logging.info("Metrics: %s", result)
  return result
