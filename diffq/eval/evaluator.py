"""The frozen evaluator: the project's Fashion-MNIST classifier in eval mode, as a feature extractor.

`features` maps uint8 NHWC images (the ADM sample format) to logits (IS, class accuracy), pool (FD,
precision/recall) and spatial (sFID) features. Every classifier-feature metric depends on the committed weights
`diffq/assets/evaluator_fm.npz` (model card `evaluator_fm.md`); compare numbers only under the same file.
"""
from __future__ import annotations

import os

import jax
import numpy as np

from diffq import data
from diffq.eval import metrics
from diffq.io import npz
from diffq.models import classifier

DEFAULT_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                            "evaluator_fm.npz")
KIND = "classifier"


class Evaluator:
  """A Classifier with fixed variables (params, batch_stats); jitted eval-mode forward over fixed-size batches."""

  def __init__(self, model: classifier.Classifier, variables: dict, batch_size: int = 500):
    self.model, self.variables, self.batch_size = model, variables, batch_size
    self._apply = jax.jit(lambda v, x: model.apply(v, x, train=False))

  def features(self, images_u8: np.ndarray) -> dict[str, np.ndarray]:
    """uint8 (N, 32, 32, 1) in [0, 255] -> dict(logits (N, 10), pool (N, F), spatial (N, 8, 8, C)), float32."""
    images_u8 = np.asarray(images_u8)
    if images_u8.dtype != np.uint8 or images_u8.ndim != 4 or images_u8.shape[1:] != (32, 32, 1):
      raise ValueError(f"The evaluator expects uint8 images of shape (N, 32, 32, 1) (the ADM sample format); got "
                       f"{images_u8.dtype}{list(images_u8.shape)}. Convert model-space images with data.to_uint8.")
    outputs = []
    for start in range(0, len(images_u8), self.batch_size):
      chunk = images_u8[start:start + self.batch_size]
      batch = np.zeros((self.batch_size, *chunk.shape[1:]), np.uint8)  # pad the last batch: one compilation
      batch[:len(chunk)] = chunk
      out = jax.device_get(self._apply(self.variables, data.from_uint8(batch)))
      outputs.append({k: v[:len(chunk)] for k, v in out.items()})
    if not outputs:
      raise ValueError("The evaluator got no images.")
    return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}

  def class_accuracy(self, images_u8: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of images classified as their label."""
    if len(images_u8) != len(labels):
      raise ValueError(f"Got {len(images_u8)} images but {len(labels)} labels.")
    return metrics.class_accuracy(self.features(images_u8)["logits"], labels)


def load_evaluator(path: str = DEFAULT_PATH, batch_size: int = 500) -> Evaluator:
  """Evaluator from a classifier export (manifest metadata kind='classifier' with the model fields)."""
  variables, manifest = npz.import_npz(path)
  meta = manifest["metadata"]
  if meta.get("kind") != KIND or "model" not in meta:
    raise ValueError(f"{path} is not a classifier export (manifest metadata kind={meta.get('kind')!r}); train one "
                     "with `python main.py --config=configs/train_evaluator.py --workdir=DIR` and load "
                     "DIR/classifier.npz.")
  model = classifier.Classifier(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["model"].items()})
  return Evaluator(model, variables, batch_size)
