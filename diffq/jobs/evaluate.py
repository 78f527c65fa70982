"""Evaluate job: ADM-format samples.npz -> metrics.json (classifier-feature FID/sFID/IS/P/R/KID, class accuracy)."""
from __future__ import annotations

import os
import time

import numpy as np
from absl import logging

from diffq import data
from diffq.eval import evaluator as evaluator_lib
from diffq.eval import reference, sample_quality
from diffq.io import npz
from diffq.jobs import common


DIR_FLAG = "--config.eval.data_dir"  # where every scoring job keeps the dataset directory


def check_settings(eval_cfg, dir_flag: str = DIR_FLAG) -> None:
  """Validates the scoring settings before any work: evaluator export, split, KID sizes, the reference data
  (`dir_flag`: the command-line key of eval_cfg.data_dir, for the error message)."""
  path = eval_cfg.evaluator or evaluator_lib.DEFAULT_PATH
  sha = npz.load_manifest(path)["sha256"]
  if eval_cfg.reference_split not in ("train", "test"):
    raise ValueError(f"eval.reference_split must be 'train' or 'test'; got {eval_cfg.reference_split!r}.")
  if eval_cfg.kid_subsets < 1 or eval_cfg.kid_subset_size < 2:
    raise ValueError(f"eval.kid_subsets must be >= 1 and eval.kid_subset_size >= 2; got {eval_cfg.kid_subsets}, "
                     f"{eval_cfg.kid_subset_size}.")
  if not reference.cached(eval_cfg.cache_dir, sha, eval_cfg.reference_split):
    data.load_raw(eval_cfg.reference_split, eval_cfg.data_dir, dir_flag)  # the reference must be computable


def score(eval_cfg, images_u8: np.ndarray, labels: np.ndarray | None) -> dict:
  """Metrics of `images_u8` under the configured evaluator; names the extractor in `feature_extractor`."""
  path = eval_cfg.evaluator or evaluator_lib.DEFAULT_PATH
  ev = evaluator_lib.load_evaluator(path)
  sha = npz.load_manifest(path)["sha256"]
  expected = (32, 32, 1)
  if images_u8.shape[1:] != expected:
    raise ValueError(f"Samples have shape {list(images_u8.shape[1:])} per image but the Fashion-MNIST evaluator "
                     f"needs {list(expected)}. (ImageNet samples go to the official ADM evaluator.)")
  if labels is not None and len(labels) and (labels.min() < 0 or labels.max() >= data.NUM_CLASSES):
    raise ValueError(f"Sample labels must be class ids in [0, {data.NUM_CLASSES}) (Fashion-MNIST); got "
                     f"{int(labels.min())}..{int(labels.max())}. Write arr_1 with the labels the samples were drawn "
                     "for, or omit arr_1 to skip class accuracy.")
  t0 = time.time()
  ref = reference.load_or_compute(ev, sha, eval_cfg.cache_dir, eval_cfg.reference_split, eval_cfg.data_dir,
                                  DIR_FLAG)
  out = sample_quality.evaluate(ev, ref, images_u8, labels, eval_cfg.kid_subsets, eval_cfg.kid_subset_size)
  out.update(feature_extractor=f"evaluator_fm@{sha[:12]}", reference=f"fashion_mnist/{eval_cfg.reference_split}",
             eval_seconds=time.time() - t0)
  return out


def run(config, workdir: str) -> dict:
  if not config.samples:
    raise ValueError("Set --config.samples=PATH to an ADM-format samples.npz (arr_0 uint8 NHWC, arr_1 labels).")
  check_settings(config.eval)
  images, labels = sample_quality.load_samples(config.samples)
  result = dict(samples=os.path.abspath(config.samples), **score(config.eval, images, labels))
  common.write_metrics(workdir, result)
  logging.info("Metrics: %s", result)
  return result
