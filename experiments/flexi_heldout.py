"""Held-out eps MSE of a FlexiDiT training run at each patch size, against the FP model: a cheap monitor of both
modes while fine-tuning (no sampling).

  python experiments/flexi_heldout.py runs/flexidit_fm [--images 512] [--raw]

The first `--images` Fashion-MNIST test images, one fixed t ~ U{0..999} and noise each (seed 0); prints the mean
eps MSE and that of the t < 100 images (where the weak mode's missing detail shows) for the FP model at patch 4,
the run's latest EMA params at every patch size and, with --raw, its latest raw (un-averaged) params.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from diffq import data, plan as plan_lib  # noqa: E402
from diffq.diffusion import gaussian  # noqa: E402
from diffq.jobs import loop, sample  # noqa: E402
from diffq.models import dit, flexi  # noqa: E402


def eps_mse(cfg, params, patch: int, x, y, t, noise, schedule) -> tuple[float, float]:
  """(mean eps MSE, mean over the images with t < 100) of `params` at `patch`."""
  kind = plan_lib.KINDS[plan_lib.at_patch("full", 0 if patch == cfg.patch_size else patch)]
  xt = gaussian.q_sample(schedule, x, t, noise)
  out = jax.jit(lambda p: dit.DiT(config=cfg).apply({"params": p}, xt, t, y, ctx=plan_lib.StepContext(kind=kind)))(
      params)
  per_image = np.asarray(jnp.mean((out[..., :x.shape[-1]] - noise) ** 2, axis=(1, 2, 3)))
  return float(per_image.mean()), float(per_image[np.asarray(t) < 100].mean())


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("workdir")
  ap.add_argument("--images", type=int, default=512)
  ap.add_argument("--raw", action="store_true")
  ap.add_argument("--fp", default=os.path.join(ROOT, "diffq/assets/dit_fm_ema.npz"))
  args = ap.parse_args()
  images, labels = data.load("test", "/usr/share/datasets/fashion-mnist")
  x, y = jnp.asarray(images[:args.images]), jnp.asarray(labels[:args.images])
  rng = np.random.default_rng(0)
  t = jnp.asarray(rng.integers(0, 1000, args.images))
  noise = jnp.asarray(rng.standard_normal(x.shape).astype(np.float32))
  schedule = gaussian.Schedule.from_betas(gaussian.linear_betas(1000))
  fp_cfg, fp = sample.load_dit(args.fp)
  cfg, ema, step = sample.load_training_run(args.workdir)
  rows = [("FP", fp_cfg.patch_size, eps_mse(fp_cfg, fp, fp_cfg.patch_size, x, y, t, noise, schedule))]
  rows += [("EMA", p, eps_mse(cfg, ema, p, x, y, t, noise, schedule)) for p in cfg.patch_sizes_all]
  if args.raw:
    state, _ = loop.restore_latest(loop.open_readonly(args.workdir), set_aside=False)
    raw = jax.device_get(flexi.tie(state["params"], cfg))
    rows += [("raw", p, eps_mse(cfg, raw, p, x, y, t, noise, schedule)) for p in cfg.patch_sizes_all]
  print(f"{args.workdir} at step {step}, {args.images} test images")
  print("| params | patch | eps MSE | eps MSE, t < 100 |\n|---|---|---|---|")
  for name, p, (m, low) in rows:
    print(f"| {name} | {p} | {m:.4f} | {low:.4f} |")


if __name__ == "__main__":
  main()
