"""Image grids as PNG."""
from __future__ import annotations

import numpy as np
from PIL import Image

from diffq.io.npz import atomic_write


def grid(images_u8: np.ndarray, nrow: int, pad: int = 2) -> np.ndarray:
  """(N, H, W, C) uint8 -> one (rows*(H+pad)+pad, nrow*(W+pad)+pad, C) uint8 mosaic, row-major."""
  n, h, w, c = images_u8.shape
  rows = -(-n // nrow)
  out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
  for i, img in enumerate(images_u8):
    r, col = divmod(i, nrow)
    out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = img
  return out


def class_grid(images_u8: np.ndarray, labels: np.ndarray, classes, per_class: int) -> np.ndarray:
  """Mosaic with one row per class id in `classes`, its first `per_class` samples, for eyeballing conditioning."""
  rows = []
  for k in classes:
    sel = images_u8[labels == k][:per_class]
    if len(sel) < per_class:
      sel = np.concatenate([sel, np.full((per_class - len(sel),) + images_u8.shape[1:], 255, np.uint8)])
    rows.append(sel)
  return grid(np.concatenate(rows), per_class)


def save_png(path: str, mosaic: np.ndarray, scale: int = 2) -> None:
  img = Image.fromarray(mosaic[..., 0] if mosaic.shape[-1] == 1 else mosaic)
  img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
