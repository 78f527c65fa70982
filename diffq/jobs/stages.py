"""Stage records: the settings that produced a cached stage of a job, compared before the stage is reused.

A multi-stage job (calibrate -> distill -> export) leaves each stage's result in its workdir and skips it on a
re-run. Each stage stores the settings it was computed from (every setting that changes its result, including
a content hash of the input weights); a re-run whose settings differ is refused with the differing keys, so a
stage computed under other settings is never reused under a new label.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from diffq.io import npz


def tree_sha256(tree) -> str:
  """Content hash of a pytree of arrays: keys, dtypes, shapes and bytes (independent of the file it came from)."""
  h = hashlib.sha256()
  for key, value in sorted(npz.flatten(tree).items()):
    value = np.ascontiguousarray(value)
    h.update(f"{key}:{value.dtype}:{value.shape};".encode())
    h.update(value.tobytes())
  return h.hexdigest()


def canonical(settings) -> dict:
  """Settings as plain JSON values (tuples -> lists), as they come back from a stored record."""
  return json.loads(json.dumps(settings, sort_keys=True))


def differences(stored: dict, current: dict, prefix: str = "") -> list[str]:
  """Dotted keys whose values differ between two settings dicts, as 'key: stored -> current'."""
  out = []
  for key in sorted(set(stored) | set(current)):
    a, b = stored.get(key, "<unset>"), current.get(key, "<unset>")
    name = f"{prefix}{key}"
    if isinstance(a, dict) and isinstance(b, dict):
      out += differences(a, b, name + ".")
    elif a != b:
      out.append(f"{name}: {a!r} -> {b!r}")
  return out


def check_reuse(stage: str, stored: dict | None, current: dict, remove: list[str]) -> None:
  """Raises unless `stored` (the record of a cached stage) equals `current`; the error lists the differing
  settings and the files to delete (`remove`: the stage's and its successors') to recompute it instead."""
  if stored is None:
    raise ValueError(f"The {stage} in {remove[0]} has no record of the settings that produced it (written by an "
                     f"older diffq?), so it cannot be reused safely. Use a new --workdir, or delete "
                     f"{' '.join(remove)} to recompute it.")
  diff = differences(stored, canonical(current))
  if diff:
    raise ValueError(f"The {stage} in {remove[0]} was computed under other settings: {'; '.join(diff[:8])}"
                     f"{' ...' if len(diff) > 8 else ''}. Use a new --workdir for the new settings, or delete "
                     f"{' '.join(remove)} to recompute it.")


def read_record(path: str) -> dict | None:
  """The settings record stored at `path` (JSON), or None when there is none."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"Stage record {path} is not valid JSON ({e}); delete its stage to recompute it.") from None
