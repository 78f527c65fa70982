"""Writing a diagnostic's markdown report into experiments/results/."""
from __future__ import annotations

import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write_markdown(name: str, lines: list[str]) -> str:
  """Writes `lines` to experiments/results/<name>, prints them, returns the path."""
  path = os.path.join(RESULTS, name)
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  return path
