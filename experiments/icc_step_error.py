"""Where caching hurts: per step of the FP DDIM-20 trajectory, the eps error of a cached step whose cache was
refreshed `lag` steps earlier (teacher-forced: both calls see the FP trajectory's inputs), for naive reuse and ICC.

  python experiments/icc_step_error.py [--ranks 0,16] [--lags 1,2] [--images 8] [--out icc_step_error.md]

Error = ||eps_cached - eps_full|| / ||eps_full|| of the CFG-guided eps at step i (mean over images); the
trajectory is the FP sampler's from the calibration seed 1000. Plain-SVD factors. Writes experiments/results/<out>.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import report  # noqa: E402
from diffq import calibrate, plan as plan_lib, sampler  # noqa: E402
from diffq.jobs import icc, sample  # noqa: E402
from diffq.models import dit  # noqa: E402
from diffq.seam import rules  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--ranks", default="0,16")
  ap.add_argument("--lags", default="1,2")
  ap.add_argument("--images", type=int, default=8)
  ap.add_argument("--cfg_scale", type=float, default=3.0)
  ap.add_argument("--params", default="diffq/assets/dit_fm_ema.npz")
  ap.add_argument("--out", default="icc_step_error.md")
  args = ap.parse_args()
  model_cfg, params = sample.load_dit(os.path.join(ROOT, args.params))
  plan = plan_lib.make_plan(1000, "ddim20")
  labels = jnp.arange(args.images) % model_cfg.num_classes
  shape = (model_cfg.input_size, model_cfg.input_size, model_cfg.in_channels)
  xs = jax.jit(lambda v: calibrate.fp_trajectory(dit.model_fn(dit.DiT(config=model_cfg)), v, jax.random.key(1000),
                                                 labels, plan, shape, args.cfg_scale,
                                                 model_cfg.num_classes))({"params": params})
  ts = plan.model_timesteps
  lags = [int(v) for v in args.lags.split(",")]
  rows = {}
  for rank in [int(v) for v in args.ranks.split(",")]:
    table, v = icc.add_caches(model_cfg, {"params": params}, (), dict.fromkeys(rules.ICC_LAYERS, rank), "plain")
    model = dit.DiT(config=model_cfg, specs=table)
    fn = dit.model_fn(model)

    @jax.jit
    def err(x_ref, t_ref, x, t):
      rows_ = 2 * args.images
      state = dit.init_state(model, v, rows_)
      y = labels
      _, state = sampler.guided(fn, v, state, x_ref, t_ref, y, plan_lib.StepContext(0), args.cfg_scale,
                                model_cfg.num_classes)
      cached, _ = sampler.guided(fn, v, state, x, t, y, plan_lib.StepContext(1, plan_lib.CACHED), args.cfg_scale,
                                 model_cfg.num_classes)
      full, _ = sampler.guided(fn, v, state, x, t, y, plan_lib.StepContext(1), args.cfg_scale,
                               model_cfg.num_classes)
      c = shape[-1]
      d = (cached - full)[..., :c].reshape(args.images, -1)
      return jnp.mean(jnp.linalg.norm(d, axis=1) / jnp.linalg.norm(full[..., :c].reshape(args.images, -1), axis=1))

    for lag in lags:
      tfull = lambda i: jnp.full((args.images,), int(ts[i]))
      rows[(rank, lag)] = [float(err(xs[i - lag], tfull(i - lag), xs[i], tfull(i))) if i >= lag else float("nan")
                           for i in range(len(plan.steps))]
  cmd = "python experiments/icc_step_error.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  head = "| rank, lag | " + " | ".join(str(i) for i in range(len(plan.steps))) + " | mean |"
  lines = ["# Relative eps error of a cached step, per step of the FP DDIM-20 trajectory", "",
           f"Command: `{cmd}`. Step 0 is the noisiest; a cached step at i reads the cache of step i - lag "
           f"(rank 0 = naive reuse, plain SVD otherwise); {args.images} images, CFG {args.cfg_scale}, teacher-forced.",
           "", head, "|---" * (len(plan.steps) + 2) + "|"]
  for (rank, lag), e in rows.items():
    lines.append(f"| r{rank}, lag {lag} | " + " | ".join("" if np.isnan(x) else f"{x:.3f}" for x in e)
                 + f" | {np.nanmean(e):.3f} |")
  report.write_markdown(args.out, lines)


if __name__ == "__main__":
  main()
