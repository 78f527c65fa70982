"""Numpy export/import of any state pytree (nested dicts of arrays): `.npz` + JSON manifest.

Keys are '/'-joined paths. The manifest records every key's shape and dtype, the npz's sha256, and free
metadata. Writes are atomic (temp file + rename), reads refuse pickles and check the manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Mapping

import numpy as np

FORMAT = "diffq-npz-v1"


def flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  if not isinstance(tree, Mapping):
    raise TypeError(f"Export expects nested dicts of arrays; found {type(tree).__name__} at {prefix or '<root>'}.")
  for key, value in tree.items():
    if not isinstance(key, str) or "/" in key or not key:
      raise ValueError(f"Cannot export key {key!r} under {prefix or '<root>'}: keys must be non-empty strings "
                       f"without '/'.")
    path = f"{prefix}/{key}" if prefix else key
    if isinstance(value, Mapping):
      out.update(flatten(value, path))
    else:
      arr = np.asarray(value)
      if arr.dtype == object:
        raise TypeError(f"Cannot export {path}: object arrays are not allowed (they would need pickle).")
      out[path] = arr
  return out


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _atomic_write(path: str, write_fn) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
  os.close(fd)
  try:
    write_fn(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def manifest_path(npz_path: str) -> str:
  return os.path.splitext(npz_path)[0] + ".json"


def export_npz(path: str, tree: Mapping, metadata: Mapping[str, Any] | None = None) -> dict:
  """Writes `path` (.npz) and its manifest (same stem, .json). Returns the manifest."""
  if not path.endswith(".npz"):
    raise ValueError(f"Export path must end in .npz; got {path!r}.")
  flat = flatten(tree)

  def write_npz(tmp):
    with open(tmp, "wb") as f:
      np.savez(f, **flat)

  _atomic_write(path, write_npz)
  manifest = {"format": FORMAT, "sha256": _sha256(path),
              "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in flat.items()},
              "metadata": dict(metadata or {})}

  def write_json(tmp):
    with open(tmp, "w") as f:
      json.dump(manifest, f, indent=1, sort_keys=True)

  _atomic_write(manifest_path(path), write_json)
  return manifest


def load_manifest(path: str) -> dict:
  mpath = manifest_path(path)
  if not os.path.exists(mpath):
    raise FileNotFoundError(f"Manifest {mpath} missing next to {path}; re-export with diffq.io.npz.export_npz.")
  with open(mpath) as f:
    manifest = json.load(f)
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{mpath} is not a {FORMAT} manifest (format={manifest.get('format')!r}).")
  return manifest


def import_npz(path: str, verify_hash: bool = True) -> tuple[dict, dict]:
  """Loads (tree, manifest); refuses pickled content and any mismatch with the manifest."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"No export at {path}.")
  manifest = load_manifest(path)
  if verify_hash and _sha256(path) != manifest["sha256"]:
    raise ValueError(f"{path} does not match the sha256 in its manifest: the file is corrupt or was changed "
                     "after export. Re-export it.")
  try:
    with np.load(path, allow_pickle=False) as data:
      flat = {k: data[k] for k in data.files}
  except ValueError as e:
    raise ValueError(f"{path} holds pickled objects or is not a valid npz; refusing to load it ({e}).") from e
  expected = manifest["arrays"]
  if set(flat) != set(expected):
    raise ValueError(f"{path} keys differ from its manifest: missing {sorted(set(expected) - set(flat))[:5]}, "
                     f"extra {sorted(set(flat) - set(expected))[:5]}.")
  for k, v in flat.items():
    if list(v.shape) != expected[k]["shape"] or str(v.dtype) != expected[k]["dtype"]:
      raise ValueError(f"{path}:{k} is {v.dtype}{list(v.shape)}, manifest says "
                       f"{expected[k]['dtype']}{expected[k]['shape']}.")
  return unflatten(flat), manifest
