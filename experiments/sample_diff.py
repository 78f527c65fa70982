"""Per-pixel differences between ADM sample sets drawn for the same ids (same seed, N, labels), as a markdown table.

  python experiments/sample_diff.py A=runs/x/samples.npz B=runs/y/samples.npz C=... [--out NAME.md]

Every pair of the named sets: mean |a - b| in uint8 levels over all pixels, the median / 90th / 99th percentile
of the per-image mean, and the share of bit-identical images. Writes experiments/results/<out> when given.
"""
from __future__ import annotations

import argparse
import itertools
import os
import shlex
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import report  # noqa: E402


def load(path: str) -> tuple[np.ndarray, np.ndarray]:
  with np.load(path, allow_pickle=False) as f:
    return f["arr_0"].astype(np.int16), f["arr_1"]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("sets", nargs="+", help="NAME=path/to/samples.npz")
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  sets = {}
  for item in args.sets:
    name, _, path = item.partition("=")
    if not path:
      raise SystemExit(f"Write each set as NAME=path/to/samples.npz; got {item!r}.")
    sets[name] = load(path)
  lines = ["| a | b | images | mean abs diff (uint8) | per-image mean: median | p90 | p99 | identical images |",
           "|---|---|---|---|---|---|---|---|"]
  for (na, (a, la)), (nb, (b, lb)) in itertools.combinations(sets.items(), 2):
    n = min(len(a), len(b))
    if a.shape[1:] != b.shape[1:] or not np.array_equal(la[:n], lb[:n]):
      raise SystemExit(f"{na} and {nb} are not drawn for the same images (shapes or labels differ).")
    d = np.abs(a[:n] - b[:n]).reshape(n, -1)
    per = d.mean(1)
    p50, p90, p99 = np.percentile(per, [50, 90, 99])
    lines.append(f"| {na} | {nb} | {n} | {d.mean():.3f} | {p50:.2f} | {p90:.2f} | {p99:.2f} | "
                 f"{np.mean(d.max(1) == 0):.3f} |")
  cmd = "python experiments/sample_diff.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  print("\n".join(lines))
  if args.out:
    report.write_markdown(args.out, [f"# Sample differences: {', '.join(sets)}", "", f"Command: `{cmd}`", "",
                                     *lines])


if __name__ == "__main__":
  main()
