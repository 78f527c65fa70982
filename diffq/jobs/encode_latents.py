"""Encode job: an ImageNet split (TFDS) -> SD-VAE latents in shards (diffq/imagenet.py), the training data of
DiTs on latents (FlexiDiT-XL/2 fine-tuning: configs/train_flexidit_fm.py:xl2).

The split is cut into shards of `shard_size` examples; process p of P (a pod run: --config.distributed=True or
the coordinator flags) encodes shards p, p + P, ... on its local devices, with no cross-host traffic. A shard is
written atomically and a re-run skips the shards that exist, so a killed job resumes where it stopped; the
settings record written first (`imagenet.RECORD`) refuses a re-run under other settings. Images: DiT's center crop to `image_size`, [-1, 1]; latents: the posterior
mean times the VAE's scaling factor (DiT samples the posterior; its std is small next to the mean).
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np
from absl import logging

from diffq import data, imagenet, parallel
from diffq.io import npz
from diffq.jobs import common, sample, stages
from diffq.models import vae


def check_settings(config, vae_cfg: vae.VAEConfig, mesh) -> int:
  """Validates the job's settings before any work; returns the images per encoder call."""
  if config.image_size % vae_cfg.downsample_factor:
    raise ValueError(f"image_size={config.image_size} is not a multiple of the VAE's downsampling factor "
                     f"{vae_cfg.downsample_factor}; set --config.image_size.")
  rows_per_image = 2 if config.flip else 1
  if config.batch_size % rows_per_image or config.shard_size < 1 or config.limit < 0:
    raise ValueError(f"batch_size must be even with flip=True, shard_size >= 1 and limit >= 0; got "
                     f"{config.batch_size}, {config.shard_size}, {config.limit}.")
  parallel.check_batch_divisible(config.batch_size, mesh)
  return config.batch_size // rows_per_image


def make_encode_fn(vae_cfg: vae.VAEConfig, mesh):
  """Jitted fn(vae params, images (B, H, W, 3) in [-1, 1]) -> scaled latents (B, h, w, C), batch-sharded."""
  rep, bat = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(lambda p, x: vae.encode(vae_cfg, p, x) * vae_cfg.scaling_factor, in_shardings=(rep, bat),
                 out_shardings=bat)


def encode_shard(source, ids: np.ndarray, config, encode, params, mesh, per_call: int) -> dict[str, np.ndarray]:
  """The shard of examples `ids`: their latents (and their flipped images' with config.flip), labels, indices."""
  out = {"latents": [], "labels": [], "index": [], "flipped": []}
  for start in range(0, len(ids), per_call):
    chunk = ids[start:start + per_call]
    items = [source[int(i)] for i in chunk]
    images = np.stack([imagenet.center_crop(it["image"], config.image_size) for it in items])
    labels = np.array([it["label"] for it in items], np.int32)
    views = [(images, False)] + ([(images[:, :, ::-1], True)] if config.flip else [])
    x = np.concatenate([v for v, _ in views])
    n = len(x)
    x = np.concatenate([x, np.repeat(x[-1:], config.batch_size - n, axis=0)])  # one compiled shape
    z = np.asarray(jax.device_get(encode(params, parallel.shard_batch(data.from_uint8(x), mesh))))[:n]
    out["latents"].append(z.astype(np.float16))
    for _, flipped in views:
      out["labels"].append(labels)
      out["index"].append(chunk.astype(np.int64))
      out["flipped"].append(np.full(len(chunk), flipped))
  return {k: np.concatenate(v) for k, v in out.items()}


def vae_identity(path: str) -> str:
  """The VAE's content hash (a numpy export's manifest) or, for a diffusers directory, its absolute path."""
  return os.path.abspath(path) if os.path.isdir(path) else npz.load_manifest(path)["sha256"]


def check_record(workdir: str, split: str, settings: dict) -> None:
  """Writes the split's settings record, or refuses to continue one made under other settings."""
  path = imagenet.record_path(workdir, split)
  stored = stages.read_record(path)
  if stored is None:
    common.write_json(path, stages.canonical(settings))
    return
  diff = stages.differences(stored, stages.canonical(settings))
  if diff:
    raise ValueError(f"{workdir} holds latents of {split!r} encoded under other settings ({'; '.join(diff)}); use "
                     "a new --workdir for these settings.")


def run(config, workdir: str) -> dict:
  mesh = parallel.local_mesh(config.num_devices or None)
  vae_cfg, params = sample.load_vae(config.vae)
  per_call = check_settings(config, vae_cfg, mesh)
  source = imagenet.open_split(config.data.split, config.data.dir)
  total = min(len(source), config.limit) if config.limit else len(source)
  check_record(workdir, config.data.split, dict(split=config.data.split, examples=total, shard_size=config.shard_size,
                                                image_size=config.image_size, flip=bool(config.flip),
                                                vae=vae_identity(config.vae)))
  p, n_proc = jax.process_index(), jax.process_count()
  shards = imagenet.shard_ranges(total, config.shard_size)[p::n_proc]
  encode = make_encode_fn(vae_cfg, mesh)
  params = jax.device_put(params, parallel.replicated(mesh))
  progress = common.Progress(sum(b - a for a, b in shards), unit="images", every_seconds=30)
  t0, written, done = time.time(), 0, 0
  for start, end in shards:
    ids = np.arange(start, end)
    path = imagenet.shard_path(workdir, config.data.split, start, end)
    if not os.path.exists(path):  # written atomically: an existing shard is complete
      arrays = encode_shard(source, ids, config, encode, params, mesh, per_call)
      if not np.isfinite(arrays["latents"]).all():
        raise FloatingPointError(f"The VAE returned NaN/inf latents for examples {ids[0]}..{ids[-1]}; nothing was "
                                 "written for them. Check the VAE export (--config.vae).")
      npz.atomic_write(path, lambda tmp, a=arrays: np.savez(tmp, **a))
      written += 1
    done += len(ids)
    progress(done)
  logging.info("Process %d of %d: %d shards of split %s in %s (%d newly written).", p, n_proc, len(shards),
               config.data.split, workdir, written)
  result = dict(split=config.data.split, examples=int(total), shards=len(shards), shards_written=written,
                seconds=time.time() - t0, flip=bool(config.flip), image_size=config.image_size)
  common.write_metrics(workdir, result)
  return result
