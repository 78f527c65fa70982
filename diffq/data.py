"""Fashion-MNIST, the embedded dataset: 28x28 padded to 32x32, one channel, scaled to [-1, 1], NHWC.

Source order: the Debian package's idx files (`apt-get install dataset-fashion-mnist`), else a prepared
TFDS `fashion_mnist` (via `tfds.data_source`, no TensorFlow needed) under $TFDS_DATA_DIR.
"""
from __future__ import annotations

import gzip
import os
import struct

import numpy as np

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
DIR_FLAG = "--config.data.dir"  # the config key of the data directory in the training jobs


def install_hint(dir_flag: str = DIR_FLAG) -> str:
  return (f"Install it with `sudo apt-get install dataset-fashion-mnist` (idx files under {DEFAULT_DIR}), or point "
          f"{dir_flag} at a directory holding the four idx(.gz) files.")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
NUM_CLASSES = 10
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")


def read_idx(path: str, dir_flag: str = DIR_FLAG) -> np.ndarray:
  """Parses an idx file (optionally .gz) into a uint8 array; raises on a corrupt header or size."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise ValueError(f"{path} is not a uint8 idx file (bad magic). Re-install the dataset: {install_hint(dir_flag)}")
  ndim = data[3]
  dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
  body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if body.size != int(np.prod(dims)):
    raise ValueError(f"{path} is truncated: header says {dims}, found {body.size} values. {install_hint(dir_flag)}")
  return body.reshape(dims)


def _find(directory: str, stem: str) -> str | None:
  for name in (stem + ".gz", stem):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      return path
  return None


def load_raw(split: str, directory: str = DEFAULT_DIR, dir_flag: str = DIR_FLAG) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 (N, 28, 28), labels int32 (N,)) for split 'train' or 'test'; errors name `dir_flag`, the
  caller's config key for `directory`."""
  if split not in _FILES:
    raise ValueError(f"Unknown split {split!r}; use 'train' or 'test'.")
  paths = [_find(directory, stem) for stem in _FILES[split]]
  if all(paths):
    images, labels = read_idx(paths[0], dir_flag), read_idx(paths[1], dir_flag)
  else:
    loaded = _load_tfds(split)
    if loaded is None:
      raise FileNotFoundError(f"Fashion-MNIST {split} split not found in {directory!r} (and no prepared TFDS "
                              f"fashion_mnist under $TFDS_DATA_DIR). {install_hint(dir_flag)}")
    images, labels = loaded
  if images.shape[1:] != (28, 28) or len(images) != len(labels):
    raise ValueError(f"Fashion-MNIST {split} has unexpected shapes {images.shape}, {labels.shape}; expected "
                     f"(N, 28, 28) images and N labels. {install_hint(dir_flag)}")
  return images, labels.astype(np.int32)


def _load_tfds(split: str):
  data_dir = os.environ.get("TFDS_DATA_DIR")
  if not data_dir or not os.path.isdir(os.path.join(data_dir, "fashion_mnist")):
    return None
  import tensorflow_datasets as tfds  # optional path; reads array_record without TensorFlow
  source = tfds.data_source("fashion_mnist", split=split, data_dir=data_dir, download=False)
  items = [source[i] for i in range(len(source))]
  return (np.stack([it["image"][..., 0] for it in items]), np.array([it["label"] for it in items]))


def to_model_space(images_u8: np.ndarray, size: int = 32) -> np.ndarray:
  """uint8 (N, 28, 28) -> float32 (N, size, size, 1) in [-1, 1], zero-padded (background) to `size`."""
  if images_u8.ndim != 3 or images_u8.shape[1] != images_u8.shape[2] or images_u8.shape[1] > size:
    raise ValueError(f"Expected square images no larger than {size}x{size}, got shape {images_u8.shape}.")
  pad = (size - images_u8.shape[1]) // 2
  extra = size - images_u8.shape[1] - 2 * pad
  x = np.pad(images_u8, ((0, 0), (pad, pad + extra), (pad, pad + extra)))
  return from_uint8(x)[..., None]


def from_uint8(images_u8: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1] (same shape); `to_uint8` inverts it exactly."""
  return np.asarray(images_u8).astype(np.float32) / 127.5 - 1.0


def to_uint8(x: np.ndarray) -> np.ndarray:
  """Model space [-1, 1] -> uint8 [0, 255] (same N, H, W, C), the ADM sample format."""
  return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def load(split: str, directory: str = DEFAULT_DIR, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
  """(images float32 (N, size, size, 1) in [-1, 1], labels int32 (N,))."""
  images, labels = load_raw(split, directory)
  return to_model_space(images, size), labels


def epoch_batches(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Indices of the batch at global `step`: a fresh permutation per epoch from (seed, epoch). Stateless, so a
  resumed run sees exactly the batches an uninterrupted run would."""
  steps_per_epoch = num_examples // batch_size
  epoch, i = divmod(step, steps_per_epoch)
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return perm[i * batch_size:(i + 1) * batch_size]
