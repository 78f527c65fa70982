"""All sample-quality metrics of one sample set against a reference, under one frozen evaluator."""
from __future__ import annotations

import numpy as np

from diffq.eval import metrics
from diffq.io import npz


def load_samples(path: str) -> tuple[np.ndarray, np.ndarray | None]:
  """(arr_0 uint8 NHWC, arr_1 labels or None) from an ADM-format npz; refuses pickles and malformed arrays."""
  arrays = npz.read_npz(path, "Save samples as plain arrays: np.savez(path, arr_0=uint8 NHWC, arr_1=int labels).")
  if "arr_0" not in arrays:
    raise ValueError(f"{path} has no 'arr_0': ADM-format samples are np.savez(path, arr_0=uint8 NHWC images"
                     "[, arr_1=labels]).")
  images, labels = arrays["arr_0"], arrays.get("arr_1")
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f"{path}: arr_0 must be uint8 with shape (N, H, W, C) in [0, 255]; got "
                     f"{images.dtype}{list(images.shape)}.")
  if labels is not None and (labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer)):
    raise ValueError(f"{path}: arr_1 must hold one integer label per image; got {labels.dtype}{list(labels.shape)}.")
  return images, labels


def evaluate(evaluator, reference: dict, images_u8: np.ndarray, labels: np.ndarray | None = None,
             kid_subsets: int = 100, kid_subset_size: int = 1000) -> dict[str, float]:
  """fid/sfid/is/precision/recall/kid(/class_acc) in the evaluator's feature space (ADM semantics)."""
  feats = evaluator.features(images_u8)
  mu, sigma = metrics.feature_stats(feats["pool"])
  mu_s, sigma_s = metrics.feature_stats(feats["spatial"].reshape(len(images_u8), -1))
  precision, recall = metrics.precision_recall(reference["pool"], feats["pool"])
  kid, kid_std = metrics.kernel_distance(feats["pool"], reference["pool"], kid_subsets, kid_subset_size)
  out = dict(fid=metrics.frechet_distance(mu, sigma, reference["mu"], reference["sigma"]),
             sfid=metrics.frechet_distance(mu_s, sigma_s, reference["mu_s"], reference["sigma_s"]),
             is_=metrics.inception_score(feats["logits"]), precision=precision, recall=recall, kid=kid,
             kid_std=kid_std, num_eval_samples=len(images_u8))
  out["is"] = out.pop("is_")
  if labels is not None:
    out["class_acc"] = metrics.class_accuracy(feats["logits"], labels)
  return out
