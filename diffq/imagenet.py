"""ImageNet-1k through TFDS (`imagenet2012`) with DiT's preprocessing, and the VAE latents the encode job writes.

Prepare the dataset once (ImageNet needs a manual download: register at https://image-net.org/download-images,
put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in MANUAL_DIR):

  tfds build imagenet2012 --manual_dir=MANUAL_DIR --data_dir=$TFDS_DATA_DIR --file_format=array_record

array_record gives random access without TensorFlow (`tfds.data_source`), so each process reads only its rows.
Images are center-cropped as DiT and ADM do (`center_crop`), then encoded by the encode job
(configs/encode_latents.py) into shards over example ranges (and a record of the settings and layout) of
`latents` (N, h, w, C) float16 (scaled by the VAE's scaling factor:
what the DiT is trained on), `labels` (N,) int32, `index` (N,) int64 (the example's index in the split) and
`flipped` (N,) bool (the horizontally flipped image, DiT's augmentation, stored as its own example).
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

NAME = "imagenet2012"
PREPARE = (f"Prepare it with `tfds build {NAME} --manual_dir=<dir with ILSVRC2012_img_train.tar and "
           f"ILSVRC2012_img_val.tar> --data_dir=$TFDS_DATA_DIR --file_format=array_record` (ImageNet needs a "
           "manual download from https://image-net.org/download-images).")
RECORD = "latents-{tag}.json"  # an encoded split's settings and shard layout (written before its shards)
SHARD = "latents-{tag}-{start:08d}-{end:08d}.npz"  # the encoded examples [start, end) of the split


def open_split(split: str, data_dir: str = ""):
  """The random-access TFDS source of `split` ('train', 'validation', or TFDS slicing like 'train[:1%]'):
  source[i] = {'image': uint8 (H, W, 3), 'label': int, 'file_name': bytes}."""
  data_dir = data_dir or os.environ.get("TFDS_DATA_DIR", "")
  if not data_dir or not os.path.isdir(os.path.join(data_dir, NAME)):
    raise FileNotFoundError(f"No prepared {NAME} under {data_dir or '$TFDS_DATA_DIR (unset)'} (--config.data.dir, "
                            f"else $TFDS_DATA_DIR). {PREPARE}")
  import tensorflow_datasets as tfds  # reads array_record without TensorFlow
  try:
    return tfds.data_source(NAME, split=split, data_dir=data_dir, download=False)
  except (ValueError, FileNotFoundError, AssertionError) as e:
    raise ValueError(f"{NAME} under {data_dir} cannot be opened as a random-access source for split {split!r} "
                     f"({type(e).__name__}: {str(e)[:300]}). It must be built with --file_format=array_record. "
                     f"{PREPARE}") from None


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """ADM's / DiT's center_crop_arr: halve with a box filter while the short side is >= 2 size, resize the short
  side to `size` (bicubic), crop the centre: uint8 (H, W, 3) -> (size, size, 3)."""
  from PIL import Image
  img = Image.fromarray(image)
  while min(img.size) >= 2 * size:
    img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
  scale = size / min(img.size)
  img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
  arr = np.asarray(img.convert("RGB"))
  top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
  return arr[top:top + size, left:left + size]


def split_tag(split: str) -> str:
  """A file-name form of a TFDS split: 'train[:1%]' -> 'train_1'."""
  return re.sub(r"[^A-Za-z0-9]+", "_", split).strip("_")


def shard_ranges(examples: int, shard_size: int) -> list[tuple[int, int]]:
  """[start, end) of every shard of a split of `examples` (process p of P encodes shards p, p + P, ...)."""
  return [(a, min(a + shard_size, examples)) for a in range(0, examples, shard_size)]


def shard_path(directory: str, split: str, start: int, end: int) -> str:
  return os.path.join(directory, SHARD.format(tag=split_tag(split), start=start, end=end))


def record_path(directory: str, split: str) -> str:
  return os.path.join(directory, RECORD.format(tag=split_tag(split)))


def load_latents(directory: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
  """(latents float16 (N, h, w, C), labels int32 (N,)) of every shard of `split` the record in `directory`
  lists; raises if the encoding is unfinished."""
  record = record_path(directory, split)
  if not os.path.exists(record):
    raise FileNotFoundError(f"No encoded split {split!r} in {directory!r} (no {os.path.basename(record)}): encode "
                            "it with configs/encode_latents.py (--config.data.split, --workdir=<this directory>).")
  with open(record) as f:
    settings = json.load(f)
  paths = [shard_path(directory, split, a, b) for a, b in shard_ranges(settings["examples"], settings["shard_size"])]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(f"The encoding of {split!r} in {directory} is unfinished: {len(missing)} of "
                            f"{len(paths)} shards missing (e.g. {os.path.basename(missing[0])}); re-run the encode "
                            "job to finish it.")
  latents, labels = [], []
  for p in paths:
    with np.load(p, allow_pickle=False) as f:
      latents.append(f["latents"])
      labels.append(f["labels"])
  return np.concatenate(latents), np.concatenate(labels).astype(np.int32)
