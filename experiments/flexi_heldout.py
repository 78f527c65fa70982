"""Held-out eps error of a FlexiDiT at each patch size, against the FP model: a cheap monitor of both modes while
fine-tuning, and where along the sampler the weak mode's error lies (no sampling).

  python experiments/flexi_heldout.py runs/flexidit_fm [--images 512] [--raw]
  python experiments/flexi_heldout.py diffq/assets/flexidit_fm_ema.npz --by_step [--images 256]

The first `--images` Fashion-MNIST test images, one fixed t ~ U{0..999} and noise each (seed 0); prints the mean
eps MSE and that of the t < 100 images (where the weak mode's missing detail shows) for the FP model at patch 4,
the run's latest EMA params (or the export's) at every patch size and, with --raw, a run's latest raw
(un-averaged) params. --by_step instead noises the images to each DDIM-20 step's t and prints, per patch size,
the MSE of the conditional and of the CFG-3 guided eps to the FP model's, beside the FP guided eps's MSE to the
true noise (the scale an error should be read against).
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


def predict_eps(cfg, params, patch: int, xt, t, y):
  """eps (N, H, W, C) of `params` at `patch`."""
  kind = plan_lib.KINDS[plan_lib.at_patch("full", 0 if patch == cfg.patch_size else patch)]
  out = jax.jit(lambda p: dit.DiT(config=cfg).apply({"params": p}, xt, t, y, ctx=plan_lib.StepContext(kind=kind)))(
      params)
  return out[..., :xt.shape[-1]]


def eps_mse(cfg, params, patch: int, x, y, t, noise, schedule) -> tuple[float, float]:
  """(mean eps MSE, mean over the images with t < 100) of `params` at `patch`."""
  eps = predict_eps(cfg, params, patch, gaussian.q_sample(schedule, x, t, noise), t, y)
  per_image = np.asarray(jnp.mean((eps - noise) ** 2, axis=(1, 2, 3)))
  return float(per_image.mean()), float(per_image[np.asarray(t) < 100].mean())


def by_step(models, x, y, noise, schedule, cfg_scale: float = 3.0) -> None:
  """Per DDIM-20 step: the FP guided eps's MSE to the noise; per (name, patch) of `models`, the MSE to the FP
  model's conditional / guided eps."""
  (fp_cfg, fp), rest = models[0][2:], models[1:]
  null = jnp.full_like(y, fp_cfg.num_classes)

  def cond_guided(cfg, params, p, xt, t):
    c, u = predict_eps(cfg, params, p, xt, t, y), predict_eps(cfg, params, p, xt, t, null)
    return c, u + cfg_scale * (c - u)

  mse = lambda a, b: float(jnp.mean((a - b) ** 2))
  print("| step | t | FP guided vs noise | " + " | ".join(f"{n} p{p} cond / guided vs FP" for n, p, _, _ in rest) +
        " |\n|---|---|---|" + "---|" * len(rest))
  for i, tm in enumerate(plan_lib.make_plan(schedule.num_steps, "ddim20").model_timesteps):
    t = jnp.full((x.shape[0],), int(tm))
    xt = gaussian.q_sample(schedule, x, t, noise)
    c0, g0 = cond_guided(fp_cfg, fp, fp_cfg.patch_size, xt, t)
    cells = []
    for _, p, cfg, params in rest:
      c, g = cond_guided(cfg, params, p, xt, t)
      cells.append(f"{mse(c, c0):.5f} / {mse(g, g0):.5f}")
    print(f"| {i} | {int(tm)} | {mse(g0, noise):.4f} | " + " | ".join(cells) + " |")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("source", help="a training workdir or a FlexiDiT export (.npz)")
  ap.add_argument("--images", type=int, default=512)
  ap.add_argument("--raw", action="store_true")
  ap.add_argument("--by_step", action="store_true")
  ap.add_argument("--fp", default=os.path.join(ROOT, "diffq/assets/dit_fm_ema.npz"))
  args = ap.parse_args()
  images, labels = data.load("test", "/usr/share/datasets/fashion-mnist")
  x, y = jnp.asarray(images[:args.images]), jnp.asarray(labels[:args.images])
  rng = np.random.default_rng(0)
  t = jnp.asarray(rng.integers(0, 1000, args.images))
  noise = jnp.asarray(rng.standard_normal(x.shape).astype(np.float32))
  schedule = gaussian.Schedule.from_betas(gaussian.linear_betas(1000))
  fp_cfg, fp = sample.load_dit(args.fp)
  if args.source.endswith(".npz"):
    (cfg, ema), what = sample.load_dit(args.source), "export"
  else:
    cfg, ema, step = sample.load_training_run(args.source)
    what = f"EMA at step {step}"
  models = [("FP", fp_cfg.patch_size, fp_cfg, fp)] + [("EMA", p, cfg, ema) for p in cfg.patch_sizes_all]
  if args.raw:
    state, _ = loop.restore_latest(loop.open_readonly(args.source), set_aside=False)
    raw = jax.device_get(flexi.tie(state["params"], cfg))
    models += [("raw", p, cfg, raw) for p in cfg.patch_sizes_all]
  print(f"{args.source} ({what}), {args.images} test images")
  if args.by_step:
    by_step(models, x, y, noise, schedule)
    return
  print("| params | patch | eps MSE | eps MSE, t < 100 |\n|---|---|---|---|")
  for name, p, c, params in models:
    m, low = eps_mse(c, params, p, x, y, t, noise, schedule)
    print(f"| {name} | {p} | {m:.4f} | {low:.4f} |")


if __name__ == "__main__":
  main()
