"""Markdown table of experiments/distill_diag.py runs: held-out fidelity over training, per run.

  python experiments/diag_table.py runs/diag/w3a8_pv.json runs/diag/w3a8_pv_xprev.json ...

Columns: the distill overrides (--set), x0 RMS vs FP from the same noise at each evaluation (trajectory 0 is the
PTQ start), and the teacher-forced relative eps error at the start and the end, averaged over all plan positions
but the last and shown for the last (t -> 0, where d x_{t-1} / d eps is 0.01).
"""
from __future__ import annotations

import json
import sys

import numpy as np


def load(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def row(d: dict) -> str:
  ev = d["evals"]
  x0 = " → ".join(f"{e['x0_rms']:.4f}" for e in ev)
  body = lambda e: float(np.mean(e["tf"][:-1]))
  return (f"| {d['args']['name']} | `{d['args']['config']}` {d['args']['set'] or '(defaults)'} | {x0} | "
          f"{body(ev[0]):.5f} → {body(ev[-1]):.5f} | {ev[0]['tf'][-1]:.3f} → {ev[-1]['tf'][-1]:.3f} |")


def main(paths):
  runs = [load(p) for p in paths]
  print("| run | config, distill overrides | x0 RMS vs FP at trajectories "
        + ", ".join(str(e["trajectory"]) for e in runs[0]["evals"])
        + " | eps error, positions but the last (start → end) | eps error, last position |")
  print("|---|---|---|---|---|")
  for d in runs:
    print(row(d))


if __name__ == "__main__":
  main(sys.argv[1:])
