"""Sweep harness: run (config, overrides) pairs into separate workdirs, collect metrics, draw Pareto plots.

  python experiments/sweep.py experiments/sweeps/fp_cfg.py [--runs_root=runs/sweeps] [--only=name,...]

A sweep file defines `NAME` (results stem), `RUNS` (list of dicts: name, config, overrides, and optionally
`workdir`: a run directory relative to the runs root, to share an identical run with another sweep; `labels`: a
dict of fields the sweep itself knows, e.g. the method and setting, added to the run's row), `COLUMNS` (metrics.json
keys or labels for the table) and optionally `PARETO` ((x_key, y_key) pairs; `PARETO_GROUP`: a label that colours
the points) and `LINES` (dicts x, y, group and
optionally reference, a run name drawn as a horizontal line, and log_y: y against a categorical x, one line per
group) and `PIVOTS` (dicts rows, cols, value: a value-by-label table added to the .md). Results go to
experiments/results/<NAME>.md/.csv (each row with the exact command that produced it), <NAME>_<y>_vs_<x>.png and
<NAME>_<y>_by_<group>.png.

Each finished run's metrics.json is also archived to experiments/results/<NAME>/<run>.json, which is committed:
run directories (samples, checkpoints) stay out of git, so on a fresh clone the archive is what keeps finished
rows in the table and keeps them from being recomputed. A run is finished when either file exists, so an
interrupted sweep resumes where it stopped; delete both to re-run one.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results")
sys.path.insert(0, ROOT)

from diffq.io import npz  # noqa: E402


def load_sweep(path: str):
  spec = importlib.util.spec_from_file_location("sweep_spec", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for attr in ("NAME", "RUNS", "COLUMNS"):
    if not hasattr(module, attr):
      raise SystemExit(f"{path} must define {attr} (see experiments/sweep.py docstring).")
  names = [r["name"] for r in module.RUNS]
  if len(set(names)) != len(names):
    raise SystemExit(f"{path}: run names must be unique.")
  return module


def run_dir(sweep, run: dict, runs_root: str) -> str:
  return os.path.join(runs_root, run.get("workdir", os.path.join(sweep.NAME, run["name"])))


def archived_metrics(sweep, run: dict) -> str:
  return os.path.join(RESULTS, sweep.NAME, f"{run['name']}.json")


def load_metrics(sweep, run: dict, runs_root: str) -> dict | None:
  """The run's metrics: its run directory's metrics.json, else the committed archive, else None."""
  for path in (os.path.join(run_dir(sweep, run, runs_root), "metrics.json"), archived_metrics(sweep, run)):
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)
  return None


def archive_metrics(sweep, run: dict, runs_root: str) -> None:
  """Copy a finished run's metrics.json into the committed archive (atomically)."""
  src = os.path.join(run_dir(sweep, run, runs_root), "metrics.json")
  npz.atomic_write(archived_metrics(sweep, run), lambda tmp: shutil.copyfile(src, tmp))


def command(run: dict, workdir: str) -> list[str]:
  return ["python", "main.py", f"--config={run['config']}", f"--workdir={workdir}",
          *[f"--config.{k}={v}" for k, v in run.get("overrides", {}).items()]]


def run_all(sweep, runs_root: str, only: set[str] | None) -> None:
  todo = [r for r in sweep.RUNS if not only or r["name"] in only]
  t0, done = time.time(), 0
  for i, run in enumerate(todo):
    workdir = run_dir(sweep, run, runs_root)
    if load_metrics(sweep, run, runs_root) is not None:
      print(f"[{i + 1}/{len(todo)}] {run['name']}: done, skipping", flush=True)
      continue
    cmd = command(run, workdir)
    print(f"[{i + 1}/{len(todo)}] {run['name']}: {shlex.join(cmd)}", flush=True)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "log.txt"), "w") as log:
      rc = subprocess.call([sys.executable, *cmd[1:]], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:
      raise SystemExit(f"Run {run['name']} failed (exit {rc}); see {workdir}/log.txt. Re-run the sweep to resume.")
    archive_metrics(sweep, run, runs_root)
    done += 1
    rate = (time.time() - t0) / done
    left = sum(1 for r in todo[i + 1:] if load_metrics(sweep, r, runs_root) is None)
    print(f"    finished in {rate:.0f}s/run on average; ETA {left * rate / 60:.1f} min", flush=True)


def collect(sweep, runs_root: str) -> list[dict]:
  """One row per finished run; run directories' metrics not yet in the archive are archived on the way."""
  rows = []
  for run in sweep.RUNS:
    if os.path.exists(os.path.join(run_dir(sweep, run, runs_root), "metrics.json")):
      archive_metrics(sweep, run, runs_root)
    metrics = load_metrics(sweep, run, runs_root)
    if metrics is not None:
      labels = run.get("labels", {})
      fields = {**metrics, **labels}
      rows.append({"name": run["name"], **labels, **{c: fields.get(c) for c in sweep.COLUMNS},
                   "command": shlex.join(command(run, os.path.relpath(
                       run_dir(sweep, run, runs_root), ROOT)))})
  return rows


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return "" if v is None else str(v)


def write_tables(sweep, rows: list[dict]) -> None:
  os.makedirs(RESULTS, exist_ok=True)
  cols = ["name", *sweep.COLUMNS]
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=[*cols, "command"], lineterminator="\n", extrasaction="ignore")
  writer.writeheader()
  writer.writerows(rows)
  with open(os.path.join(RESULTS, f"{sweep.NAME}.csv"), "w") as f:
    f.write(buf.getvalue())
  lines = [f"# {sweep.NAME}", "", (sweep.__doc__ or "").strip(), "",
           "Regenerate: `python experiments/sweep.py " + os.path.relpath(sweep.__file__, ROOT) + "`", "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
  for spec in getattr(sweep, "PIVOTS", ()):
    lines += ["", *pivot_table(rows, spec["rows"], spec["cols"], spec["value"])]
  lines += ["", "Commands:", ""] + [f"- {r['name']}: `{r['command']}`" for r in rows]
  with open(os.path.join(RESULTS, f"{sweep.NAME}.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def pivot_table(rows: list[dict], row_key: str, col_key: str, value: str) -> list[str]:
  """Markdown table of `value` with one row per `row_key` label and one column per `col_key` label (sweep order);
  runs without both labels are left out, missing cells are blank."""
  cells = {(r[row_key], r[col_key]): r.get(value) for r in rows if r.get(row_key) and r.get(col_key)}
  row_labels = list(dict.fromkeys(k[0] for k in cells))
  col_labels = list(dict.fromkeys(k[1] for k in cells))
  out = [f"{value} by {row_key} and {col_key}:", "", f"| {row_key} | " + " | ".join(map(str, col_labels)) + " |",
         "|---|" + "---|" * len(col_labels)]
  out += [f"| {a} | " + " | ".join(_fmt(cells.get((a, b))) for b in col_labels) + " |" for a in row_labels]
  return out


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
  """Indices of points not dominated in (lower x, lower y), sorted by x."""
  order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
  front, best = [], float("inf")
  for i in order:
    if points[i][1] < best:
      front.append(i)
      best = points[i][1]
  return front


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def draw_pareto(sweep, rows: list[dict]) -> None:
  plt = _pyplot()
  for x_key, y_key in getattr(sweep, "PARETO", ()):
    pts = [(r[x_key], r[y_key], r["name"]) for r in rows if r.get(x_key) is not None and r.get(y_key) is not None]
    if not pts:
      continue
    fig, ax = plt.subplots(figsize=(10, 5.5))
    group = getattr(sweep, "PARETO_GROUP", None)
    by_name = {r["name"]: r.get(group) for r in rows}
    for g in dict.fromkeys(by_name[p[2]] for p in pts):
      ax.scatter([p[0] for p in pts if by_name[p[2]] == g], [p[1] for p in pts if by_name[p[2]] == g],
                 label=None if g is None else str(g))
    for x, y, name in pts:
      ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = [pts[i] for i in pareto_front([(p[0], p[1]) for p in pts])]
    ax.plot([p[0] for p in front], [p[1] for p in front], "r--", lw=1, label="Pareto front")
    ax.set_xlabel(x_key)
    ax.set_ylabel(y_key)
    ax.set_title(f"{sweep.NAME}: {y_key} vs {x_key}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # outside: it never hides points
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, f"{sweep.NAME}_{y_key}_vs_{x_key}.png"), dpi=120)
    plt.close(fig)


def draw_lines(sweep, rows: list[dict]) -> None:
  plt = _pyplot()
  for spec in getattr(sweep, "LINES", ()):
    x_key, y_key, group_key = spec["x"], spec["y"], spec["group"]
    pts = [r for r in rows if r.get(x_key) is not None and r.get(y_key) is not None and r.get(group_key)]
    if not pts:
      continue
    xs = list(dict.fromkeys(r[x_key] for r in pts))  # categorical, in sweep order
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for group in dict.fromkeys(r[group_key] for r in pts):
      ys = {r[x_key]: r[y_key] for r in pts if r[group_key] == group}
      ax.plot(range(len(xs)), [ys.get(x, float("nan")) for x in xs], "o-", label=str(group))  # gaps break
    ref = next((r for r in rows if r["name"] == spec.get("reference") and r.get(y_key) is not None), None)
    if ref is not None:
      ax.axhline(ref[y_key], color="k", ls="--", lw=1, label=ref["name"])
    ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    if spec.get("log_y"):
      ax.set_yscale("log")
    ax.set_xlabel(x_key)
    ax.set_ylabel(y_key)
    ax.set_title(f"{sweep.NAME}: {y_key} by {group_key}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, f"{sweep.NAME}_{y_key}_by_{group_key}.png"), dpi=120)
    plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("sweep")
  parser.add_argument("--runs_root", default=os.path.join(ROOT, "runs", "sweeps"))
  parser.add_argument("--only", default="", help="comma-separated run names")
  parser.add_argument("--collect_only", action="store_true")
  args = parser.parse_args()
  sweep = load_sweep(args.sweep)
  if not args.collect_only:
    run_all(sweep, args.runs_root, set(filter(None, args.only.split(","))))
  rows = collect(sweep, args.runs_root)
  write_tables(sweep, rows)
  draw_pareto(sweep, rows)
  draw_lines(sweep, rows)
  print(f"{len(rows)}/{len(sweep.RUNS)} runs collected into {RESULTS}/{sweep.NAME}.md")


if __name__ == "__main__":
  main()
