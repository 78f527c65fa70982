"""Where two runs of the same command differ, stage by stage (reproducibility across machines / CPU ISAs).

  python experiments/repro.py --runs A,B [--labels a,b] [--out experiments/results/repro_isa.md]

For each stage file both run directories hold (calibrated_quant.npz, quantized.npz, samples.npz) it counts the
arrays that are bit-identical and the largest relative difference of the others; for the samples, the share of
pixels and images that differ; then the metrics of both metrics.json files and their difference.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from diffq.io import npz  # noqa: E402

STAGES = ("calibrated_quant.npz", "quantized.npz")
METRICS = ("fid", "sfid", "is", "precision", "recall", "kid", "class_acc", "train_loss")


def compare_arrays(a: dict, b: dict) -> str:
  """Bit-identical arrays; of the others, the share of entries that differ and (floats) the largest difference
  relative to the array's own scale."""
  same = [k for k in a if k in b and np.array_equal(a[k], b[k])]
  diff = [k for k in a if k in b and k not in same]
  out = f"{len(same)} / {len(a)} arrays bit-identical"
  if diff:
    share = np.mean([np.mean(a[k] != b[k]) for k in diff])
    out += f"; the other {len(diff)} differ in {share:.1%} of their entries on average"
    floats = [k for k in diff if np.issubdtype(a[k].dtype, np.floating)]
    if floats:
      rel = max(float(np.max(np.abs(a[k] - b[k])) / max(np.max(np.abs(a[k])), 1e-30)) for k in floats)
      out += f", float arrays by up to {rel:.2g} of their max |value|"
  return out


def report(runs: list[str], labels: list[str]) -> str:
  a, b = runs
  lines = [f"# Run vs run: {labels[0]} vs {labels[1]}", "",
           f"`{shlex.join(['python', 'experiments/repro.py', '--runs', f'{a},{b}', '--labels', ','.join(labels)])}`", "", "| stage | comparison |",
           "|---|---|"]
  for name in STAGES:
    pa, pb = os.path.join(a, name), os.path.join(b, name)
    if os.path.exists(pa) and os.path.exists(pb):
      lines.append(f"| {name} | {compare_arrays(npz.read_npz(pa), npz.read_npz(pb))} |")
  pa, pb = os.path.join(a, "samples.npz"), os.path.join(b, "samples.npz")
  if os.path.exists(pa) and os.path.exists(pb):
    x, y = (npz.read_npz(p)["arr_0"].astype(np.int16) for p in (pa, pb))
    lines.append(f"| samples.npz | {np.mean(x != y):.2%} of pixels differ (mean abs {np.abs(x - y).mean():.2f} "
                 f"levels); {np.mean(np.all(x == y, axis=(1, 2, 3))):.1%} of {len(x)} images identical |")
  ma, mb = (json.load(open(os.path.join(r, "metrics.json"))) for r in runs)
  lines += ["", f"| metric | {labels[0]} | {labels[1]} | difference |", "|---|---|---|---|"]
  for k in METRICS:
    if k in ma and k in mb:
      lines.append(f"| {k} | {ma[k]:.6g} | {mb[k]:.6g} | {mb[k] - ma[k]:+.3g} |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", required=True, help="two run directories, comma-separated")
  parser.add_argument("--labels", default="", help="a name for each run")
  parser.add_argument("--out", default="", help="also write the markdown here")
  args = parser.parse_args()
  runs = args.runs.split(",")
  labels = args.labels.split(",") if args.labels else runs
  if len(runs) != 2 or len(labels) != 2:
    raise SystemExit("--runs takes exactly two run directories (and --labels two names).")
  text = report(runs, labels)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
