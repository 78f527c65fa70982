"""Numpy export/import of any state pytree (nested dicts of arrays): `.npz` + JSON manifest.

Keys are '/'-joined paths. The manifest records every key's shape and dtype, the npz's sha256, free metadata,
and a checksum over all of these (so an edited model config is refused, not silently loaded). Writes are atomic
(temp file + rename) and refuse NaN/inf arrays; reads refuse pickles and check the manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from typing import Any, Mapping

import numpy as np

FORMAT = "diffq-npz-v2"


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


def atomic_write(path: str, write_fn) -> None:
  """write_fn(tmp) into a temp file in path's directory, then rename it to `path`: readers never see half a file."""
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


def _manifest_checksum(manifest: Mapping) -> str:
  """sha256 of the canonical JSON of everything in the manifest but this checksum (the npz's sha256 included)."""
  body = json.loads(json.dumps({k: v for k, v in manifest.items() if k != "manifest_sha256"}))  # as read back
  return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_finite(flat: Mapping[str, np.ndarray], what: str) -> None:
  """Raises naming the arrays of `flat` that hold NaN or inf (a diverged run must not be written as a result)."""
  bad = [k for k, v in flat.items() if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()]
  if bad:
    raise FloatingPointError(f"{what}: {len(bad)} array(s) hold NaN/inf, e.g. {bad[:3]}; the computation that "
                             "produced them diverged, so nothing was written.")


def write_manifest(path: str, flat: Mapping[str, np.ndarray], metadata: Mapping[str, Any] | None = None) -> dict:
  """Writes the manifest of the existing npz `path` holding `flat`; its checksum covers the metadata too."""
  manifest = {"format": FORMAT, "sha256": _sha256(path),
              "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in flat.items()},
              "metadata": dict(metadata or {})}
  manifest["manifest_sha256"] = _manifest_checksum(manifest)

  def write_json(tmp):
    with open(tmp, "w") as f:
      json.dump(manifest, f, indent=1, sort_keys=True, allow_nan=False)

  atomic_write(manifest_path(path), write_json)
  return manifest


def export_npz(path: str, tree: Mapping, metadata: Mapping[str, Any] | None = None) -> dict:
  """Writes `path` (.npz) and its manifest (same stem, .json). Returns the manifest. Refuses NaN/inf arrays."""
  if not path.endswith(".npz"):
    raise ValueError(f"Export path must end in .npz; got {path!r}.")
  flat = flatten(tree)
  check_finite(flat, f"Export {path}")
  try:
    json.dumps(dict(metadata or {}), allow_nan=False)
  except (TypeError, ValueError) as e:
    raise ValueError(f"Export {path}: its metadata is not strict JSON ({e}); nothing was written.") from None

  def write_npz(tmp):
    with open(tmp, "wb") as f:
      np.savez(f, **flat)

  atomic_write(path, write_npz)
  return write_manifest(path, flat, metadata)


def load_manifest(path: str) -> dict:
  """The manifest next to `path`, checked: format, JSON and its own checksum (an edited manifest is refused)."""
  mpath = manifest_path(path)
  if not os.path.exists(mpath):
    raise FileNotFoundError(f"Manifest {mpath} missing next to {path}; re-export with diffq.io.npz.export_npz.")
  try:
    with open(mpath) as f:
      manifest = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"Manifest {mpath} is not valid JSON ({e}): it was truncated or edited. Restore it from the "
                     f"export's source, or re-export {path}.") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    hint = (" (written by an older diffq, whose checksum did not cover the metadata)" if fmt == "diffq-npz-v1"
            else "")
    raise ValueError(f"{mpath} is not a {FORMAT} manifest (format={fmt!r}){hint}; re-export {path} with "
                     "diffq.io.npz.export_npz.")
  if manifest.get("manifest_sha256") != _manifest_checksum(manifest):
    raise ValueError(f"Manifest {mpath} does not match its own checksum: it was edited after export (metadata such "
                     "as the model config must not change under the weights). Restore the original manifest or "
                     "re-export the model.")
  return manifest


def check_shapes(tree: Mapping, expected: Mapping, what: str) -> None:
  """Raises if the arrays of `tree` differ in keys or shapes from `expected` (same nesting, objects with .shape)."""
  got, want = ({k: tuple(np.shape(v)) for k, v in _flat_items(t)} for t in (tree, expected))
  problems = [f"missing {k}" for k in sorted(set(want) - set(got))] + \
             [f"unexpected {k}" for k in sorted(set(got) - set(want))] + \
             [f"{k} is {list(got[k])}, expected {list(want[k])}" for k in sorted(set(got) & set(want))
              if got[k] != want[k]]
  if problems:
    raise ValueError(f"{what}: {len(problems)} array(s) do not fit the model config, e.g. {'; '.join(problems[:4])}.")


def _flat_items(tree: Mapping, prefix: str = ""):
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else key
    if isinstance(value, Mapping):
      yield from _flat_items(value, path)
    else:
      yield path, value


def read_npz(path: str, fix: str = "") -> dict[str, np.ndarray]:
  """All arrays of an .npz as a flat dict, never unpickling; errors say what the file is instead, then `fix`."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"No file at {path}. {fix}".strip())
  with open(path, "rb") as f:
    head = f.read(4)
  if head not in (b"PK\x03\x04", b"PK\x05\x06"):
    what = "it is empty" if not head else f"it starts with {head!r}, not a zip header"
    raise ValueError(f"{path} is not an .npz archive ({what}). {fix}".strip())
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except ValueError as e:  # numpy refuses object arrays when allow_pickle=False; or a malformed .npy header
    what = "holds pickled object arrays; refusing to load it" if "pickle" in str(e) else "holds a malformed array"
    raise ValueError(f"{path} {what} ({e}). {fix}".strip()) from None
  except (zipfile.BadZipFile, OSError, EOFError, KeyError) as e:
    raise ValueError(f"{path} is a damaged .npz archive, e.g. truncated ({type(e).__name__}: {e}). "
                     f"{fix}".strip()) from None


def import_npz(path: str, verify_hash: bool = True) -> tuple[dict, dict]:
  """Loads (tree, manifest); refuses pickled content and any mismatch with the manifest."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"No export at {path}.")
  manifest = load_manifest(path)
  if verify_hash and _sha256(path) != manifest["sha256"]:
    raise ValueError(f"{path} does not match the sha256 in its manifest: the file is corrupt or was changed "
                     "after export. Restore it or re-export it.")
  flat = read_npz(path, "Restore it or re-export it.")
  expected = manifest["arrays"]
  if set(flat) != set(expected):
    raise ValueError(f"{path} keys differ from its manifest: missing {sorted(set(expected) - set(flat))[:5]}, "
                     f"extra {sorted(set(flat) - set(expected))[:5]}.")
  for k, v in flat.items():
    if list(v.shape) != expected[k]["shape"] or str(v.dtype) != expected[k]["dtype"]:
      raise ValueError(f"{path}:{k} is {v.dtype}{list(v.shape)}, manifest says "
                       f"{expected[k]['dtype']}{expected[k]['shape']}.")
  return unflatten(flat), manifest
