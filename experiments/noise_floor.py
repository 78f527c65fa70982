"""Noise floor of the classifier-feature metrics.

  python experiments/noise_floor.py [--samples runs/sweeps/fp_seeds/fp_seed0/samples.npz,...] [--out NAME.md]

Real-data floors: Fashion-MNIST test half vs test half (5000 vs 5000) and N train images vs the test split
(what a perfect generator would score). Model floor: FD between FP sample sets drawn with different seeds
(sample set vs sample set, each as the other's reference). Any sample sets compare the same way, e.g. a W8A8 model's
against the FP model's at the same seed. Writes experiments/results/<out> (default noise_floor.md).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from diffq import data  # noqa: E402
from diffq.eval import evaluator as evaluator_lib  # noqa: E402
from diffq.eval import reference, sample_quality  # noqa: E402
from diffq.io import npz  # noqa: E402

COLS = ["fid", "sfid", "precision", "recall", "kid", "class_acc"]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--samples", default="", help="comma-separated samples.npz of FP runs with different seeds")
  parser.add_argument("--num_train", type=int, default=5000)
  parser.add_argument("--out", default="noise_floor.md", help="file name under experiments/results/")
  args = parser.parse_args()
  ev = evaluator_lib.load_evaluator()
  sha = npz.load_manifest(evaluator_lib.DEFAULT_PATH)["sha256"][:12]
  rows = []
  test_raw, test_y = data.load_raw("test")
  test = data.to_uint8(data.to_model_space(test_raw))
  perm = np.random.default_rng(0).permutation(len(test))
  a, b = perm[:5000], perm[5000:]
  rows.append(("test half A (5000) vs test half B (5000)",
               sample_quality.evaluate(ev, reference.compute_reference(ev, test[b]), test[a], test_y[a])))
  train_raw, train_y = data.load_raw("train")
  idx = np.random.default_rng(1).choice(len(train_raw), args.num_train, replace=False)
  full_ref = reference.compute_reference(ev, test)
  rows.append((f"train subset ({args.num_train}) vs test split (10000)",
               sample_quality.evaluate(ev, full_ref, data.to_uint8(data.to_model_space(train_raw[idx])),
                                       train_y[idx])))
  sets = [p for p in args.samples.split(",") if p]
  for p, q in itertools.combinations(sets, 2):
    (xp, yp), (xq, _) = sample_quality.load_samples(p), sample_quality.load_samples(q)
    rows.append((f"{os.path.relpath(p, ROOT)} vs {os.path.relpath(q, ROOT)}",
                 sample_quality.evaluate(ev, reference.compute_reference(ev, xq), xp, yp)))
  lines = ["# Noise floor of the classifier-feature metrics", "",
           f"Evaluator `evaluator_fm@{sha}`. Produced by: `python experiments/noise_floor.py"
           + (f" --samples {args.samples}" if sets else "")
           + (f" --out {args.out}" if args.out != "noise_floor.md" else "") + "`", "",
           "| comparison | " + " | ".join(COLS) + " |", "|---|" + "---|" * len(COLS)]
  for name, m in rows:
    lines.append(f"| {name} | " + " | ".join(f"{m.get(c, float('nan')):.4g}" for c in COLS) + " |")
  os.makedirs(os.path.join(ROOT, "experiments", "results"), exist_ok=True)
  with open(os.path.join(ROOT, "experiments", "results", args.out), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
