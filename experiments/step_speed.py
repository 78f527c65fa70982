"""Wall-clock of one network call by step kind (the sampler's per-step cost without the scan): full vs an ICC /
naive-caching cached call, same CFG batch, one run, interleaved repeats, median.

  python experiments/step_speed.py [--ranks 0,8,16] [--batch 100] [--repeats 20] [--out icc_step_speed.md]
  python experiments/step_speed.py --preset DiT-XL/2 --ranks 0,128 --batch 2 --repeats 5   # the paper's width

`--ranks` items are one rank for the four block linears, or per layer type, e.g. `qkv=0/proj=0/fc1=8/fc2=8`
(a reused attention branch is dead on cached steps: this times the MLP side alone); a `+chain` suffix runs the
MLP as one increment through the linearised GELU (icc.mlp='chain'). `--preset` times a
randomly initialised DiT preset instead of the committed model (the cost does not depend on the weights'
values), to see how the ratios change with the layer width.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import report  # noqa: E402
from diffq import plan as plan_lib, sampler  # noqa: E402
from diffq.jobs import icc, sample  # noqa: E402
from diffq.models import dit  # noqa: E402
from diffq.seam import rules  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--ranks", default="0,8,16")
  ap.add_argument("--batch", type=int, default=100)
  ap.add_argument("--repeats", type=int, default=20)
  ap.add_argument("--params", default="diffq/assets/dit_fm_ema.npz")
  ap.add_argument("--preset", default="", help="a dit.preset name, randomly initialised, instead of --params")
  ap.add_argument("--out", default="icc_step_speed.md")
  args = ap.parse_args()
  if args.preset:
    cfg = dit.preset(args.preset)
    params = jax.jit(dit.init_params, static_argnums=0)(cfg, jax.random.key(0))
  else:
    cfg, params = sample.load_dit(os.path.join(ROOT, args.params))
  x = jax.random.normal(jax.random.key(0), (args.batch, cfg.input_size, cfg.input_size, cfg.in_channels))
  t, y = jnp.full((args.batch,), 500), jnp.arange(args.batch) % cfg.num_classes
  calls = {}
  for rank in args.ranks.split(","):
    spec, chain = rank.removesuffix("+chain"), rank.endswith("+chain")
    ranks = dict(item.split("=") for item in spec.split("/")) if "=" in spec else dict.fromkeys(rules.ICC_LAYERS, spec)
    table, v = icc.add_caches(cfg, {"params": params}, (), {k: int(r) for k, r in ranks.items()}, "plain",
                              mlp="chain" if chain else "layers")
    model = dit.DiT(config=cfg, specs=table)
    state = dit.init_state(model, v, 2 * args.batch)
    for kind in (plan_lib.FULL, plan_lib.CACHED):
      fn = jax.jit(lambda v, s, k=kind, m=model: sampler.guided(dit.model_fn(m), v, s, x, t, y,
                                                                plan_lib.StepContext(1, k), 3.0, cfg.num_classes))
      jax.block_until_ready(fn(v, state))
      calls[f"r{rank} {kind.name}"] = (fn, v, state, [])
  plain = jax.jit(lambda p: sampler.guided(dit.model_fn(dit.DiT(config=cfg)), {"params": p}, {}, x, t, y,
                                           plan_lib.StepContext(1), 3.0, cfg.num_classes))
  jax.block_until_ready(plain(params))
  calls = {"fp full (no caches)": (lambda v, s: plain(params), None, None, []), **calls}
  for _ in range(args.repeats):
    for fn, v, s, times in calls.values():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(v, s))
      times.append(time.perf_counter() - t0)
  ref = float(np.median(calls["fp full (no caches)"][3]))
  cmd = "python experiments/step_speed.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  model = args.preset + " (random weights)" if args.preset else args.params
  lines = ["# One network call by step kind", "", f"{model}, batch {args.batch} images (CFG: {2 * args.batch} rows), "
           f"{args.repeats} interleaved repeats after compilation, {os.cpu_count()} CPU cores. Command: `{cmd}`", "",
           "| call | median ms | time vs fp full (medians) | speed-up over fp full, paired median [IQR] |",
           "|---|---|---|---|"]
  fp_times = calls["fp full (no caches)"][3]
  for name, (_, _, _, times) in calls.items():
    lines.append(f"| {name} | {1e3 * np.median(times):.1f} | {np.median(times) / ref:.2f} | "
                 f"{report.paired_speedup(fp_times, times)} |")
  report.write_markdown(args.out, lines)


if __name__ == "__main__":
  main()
