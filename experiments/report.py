"""Writing a diagnostic's markdown report into experiments/results/."""
from __future__ import annotations

import os

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write_markdown(name: str, lines: list[str]) -> str:
  """Writes `lines` to experiments/results/<name>, prints them, returns the path."""
  path = os.path.join(RESULTS, name)
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  return path


def paired_speedup(ref_times, times) -> str:
  """'median [q25, q75]' of ref_i / t_i over interleaved repeats i: each pair ran back to back, so a slow spell
  of the shared machine hits both sides of a ratio (the ratio of medians does not pair them)."""
  r = np.asarray(ref_times) / np.asarray(times)
  q25, q50, q75 = np.percentile(r, [25, 50, 75])
  return f"{q50:.2f}x [{q25:.2f}, {q75:.2f}]"
