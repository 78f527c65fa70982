"""Paired wall-clock of the quantize job's two long stages under different activation parts, in one run.

  python experiments/job_speed.py --variants "act=static" "act=modiff" [--base w=2,a=4,method=mpqdm]
                                  [--set quant.modiff.quantizer=static] [--steps 40] [--repeats 5] [--batch 250]

Each variant is `configs/dit_w2a4.py:<base>,<variant>` with the `--set` overrides. Per variant: a distillation
segment of `--steps` jitted optimiser steps along one trajectory (the job's own step function and batch), and
the compiled sampler drawing `--batch` images with DDIM-20 (the job's sampler on the fake-quant model; values
of the quantizers do not change the work, so they stay at their initial values). Both are compiled and run once,
then timed in turn `--repeats` times, interleaved; the table gives the medians and the median [IQR] of the
per-repeat ratios variant / first variant (a time ratio: above 1 is slower). The job's time is calibration
(seconds) + distillation + sampling + scoring, dominated by the two stages timed here.
Writes experiments/results/<out>.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import report  # noqa: E402
from diffq import calibrate, distill, parallel, plan as plan_lib  # noqa: E402
from diffq.jobs import quantize, sample  # noqa: E402
from diffq.seam import rules  # noqa: E402


def job_config(base: str, variant: str, sets: list[str]):
  c = importlib.import_module("configs.dit_w2a4").get_config(",".join(a for a in (base, variant) if a))
  for item in sets:
    key, value = item.split("=", 1)
    *parents, leaf = key.split(".")
    node = c
    for k in parents:
      node = node[k]
    node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], bool) else value == "True"
  return c


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--variants", nargs="+", required=True)
  ap.add_argument("--base", default="w=2,a=4,method=mpqdm")
  ap.add_argument("--set", nargs="*", default=[], help="key=value config overrides for every variant")
  ap.add_argument("--steps", type=int, default=40)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--batch", type=int, default=250)
  ap.add_argument("--out", default="job_speed.md")
  args = ap.parse_args()
  mesh = parallel.make_mesh(None)
  runs = {}
  for name in args.variants:
    c = job_config(args.base, name, args.set)
    model_cfg, params = sample.load_dit(os.path.join(ROOT, c.params))
    plan = plan_lib.make_plan(1000, c.sample.spacing)
    table = rules.quant_table(c.quant, len(plan.steps))
    quant = calibrate.quant_template(model_cfg, table)
    if not c.distill.trajectories:
      raise SystemExit(f"{name}: the base config distils nothing (method={c.method}); pick a distilled method.")
    d = distill.Distiller(model_cfg, plan, table, quantize.distill_config(c), cfg_scale=c.sample.cfg_scale,
                          eta=c.sample.eta, clip_x0=c.sample.clip_x0)
    state, frozen = jax.device_put(d.init_state(quant), parallel.replicated(mesh))
    step = d.jit_step(mesh, state)
    batch = (frozen, jax.device_put(params, parallel.replicated(mesh)),
             *parallel.shard_batch(d.trajectory_inputs(0), mesh))
    draw = sample.make_sample_fn(model_cfg, plan, c.sample, mesh, table)
    variables = jax.device_put({"params": params, "quant": quant}, parallel.replicated(mesh))
    labels, ids = parallel.shard_batch((np.arange(args.batch, dtype=np.int32) % model_cfg.num_classes,
                                        np.arange(args.batch, dtype=np.int32)), mesh)
    runs[name] = dict(step=step, state=state, batch=batch, draw=draw, v=variables, labels=labels, ids=ids,
                      distill=[], sample=[])

  def distill_segment(run):
    for _ in range(args.steps):
      run["state"], metrics = run["step"](run["state"], *run["batch"])
    jax.block_until_ready(metrics)

  def sample_once(run, r):
    jax.block_until_ready(run["draw"](run["v"], jax.random.key(r), run["labels"], run["ids"]))

  for run in runs.values():  # compile + first run
    distill_segment(run)
    sample_once(run, 0)
  for r in range(args.repeats):
    for name, run in runs.items():
      t0 = time.perf_counter()
      distill_segment(run)
      run["distill"].append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      sample_once(run, r + 1)
      run["sample"].append(time.perf_counter() - t0)
    print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(
        f"{n} distill {x['distill'][-1]:.2f} s sample {x['sample'][-1]:.2f} s" for n, x in runs.items()), flush=True)
  ref = runs[args.variants[0]]
  cmd = "python experiments/job_speed.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  lines = [f"# Quantize-job stage wall-clock: {', '.join(args.variants)}", "",
           f"`configs/dit_w2a4.py:{args.base},<variant>`{' with ' + ' '.join(args.set) if args.set else ''}: "
           f"{args.steps} distillation steps and one DDIM-20 sampler call on {args.batch} images per repeat, "
           f"{args.repeats} interleaved repeats after a compile run, {len(jax.devices())} device(s), "
           f"{os.cpu_count()} CPU cores. Time ratios are variant / `{args.variants[0]}` (above 1 = slower). "
           f"Command: `{cmd}`", "",
           "| variant | distill median s | distill time ratio, median [IQR] | sample median s | "
           "sample time ratio, median [IQR] |", "|---|---|---|---|---|"]
  for name, run in runs.items():
    lines.append(f"| {name} | {np.median(run['distill']):.2f} | "
                 f"{report.paired_speedup(run['distill'], ref['distill'])} | {np.median(run['sample']):.2f} | "
                 f"{report.paired_speedup(run['sample'], ref['sample'])} |")
  report.write_markdown(args.out, lines)


if __name__ == "__main__":
  main()
