"""What MoDiff and the rotation buy a per-tensor quantizer: input and step-increment ranges along the FP trajectory.

  python experiments/modiff_ranges.py [--images 8] [--seed 1000] [--out modiff_ranges]

On the FP model's DDIM-20 trajectory at the protocol CFG (the calibration set's images and seed by default), per
block linear type (qkv, proj, fc1, fc2; averaged over the blocks) and step: the per-tensor range of the input x_i
(max - min), of its increment x_i - x_{i-1} (what MoDiff quantizes) relative to it, and the same after the
randomised block-Hadamard rotation (diffq/quant/rotation.py). A 4-bit per-tensor quantizer's step is range / 15,
so the ratio is the factor by which MoDiff shrinks it at that step. Writes experiments/results/<out>.md.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from diffq import calibrate, plan as plan_lib  # noqa: E402
from diffq.jobs import sample  # noqa: E402
from diffq.models import dit  # noqa: E402
from diffq.quant import rotation  # noqa: E402

LAYERS = ("attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2")
STEPS = (1, 5, 10, 15, 17, 18, 19)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--images", type=int, default=8)
  parser.add_argument("--seed", type=int, default=1000)
  parser.add_argument("--cfg_scale", type=float, default=3.0)
  parser.add_argument("--out", default="modiff_ranges")
  args = parser.parse_args()
  cfg, params = sample.load_dit(os.path.join(ROOT, "diffq/assets/dit_fm_ema.npz"))
  plan = plan_lib.make_plan(1000, "ddim20")
  labels = jnp.arange(args.images, dtype=jnp.int32) % cfg.num_classes
  xs = calibrate.fp_trajectory(dit.model_fn(dit.DiT(config=cfg)), {"params": params}, jax.random.key(args.seed),
                               labels, plan, (cfg.input_size, cfg.input_size, cfg.in_channels), args.cfg_scale,
                               cfg.num_classes)
  cal = calibrate.CalibrationSet(xs, labels, plan, args.cfg_scale, cfg.num_classes)
  paths = [f"blocks_{b}/{layer}" for b in range(cfg.depth) for layer in LAYERS]
  req = {p: ("in_min", "in_max", "in_delta_min", "in_delta_max") for p in paths}
  rotate = lambda a: rotation.rotate(a, rotation.random_signs(a.shape[-1]))
  passes = {"x": calibrate.statistics(cfg, {"params": params}, (), cal, req),
            "xR": calibrate.statistics(cfg, {"params": params}, (), cal, req, transforms={p: rotate for p in paths})}

  def ranges(st):
    x = np.asarray(st["in_max"].max(1) - st["in_min"].min(1))            # (S,)
    d = np.asarray(st["in_delta_max"].max(1) - st["in_delta_min"].min(1))  # (S - 1,): increments into steps 1..
    return x, np.concatenate([[np.nan], d])

  lines = ["# Input and increment ranges along the FP trajectory", "",
           f"Produced by: `python experiments/modiff_ranges.py --images {args.images} --seed {args.seed} "
           f"--out {args.out}`", "",
           "Per block linear type (mean over the blocks): `x range` is the per-tensor input range max - min at "
           "steps 0 / 10 / 19 (step 0 = noisiest); `delta / x` at step i is the range of x_i - x_{i-1} over the "
           "range of x_i, the factor by which MoDiff shrinks a per-tensor quantizer's step there; `R` rows are "
           "of the rotated input (x R), `R / plain` the rotation's range shrink.", "",
           "| layer | input | x range 0 / 10 / 19 | " + " | ".join(f"delta / x step {i}" for i in STEPS) + " |",
           "|---|---|---|" + "---|" * len(STEPS)]
  for layer in LAYERS:
    per = {}
    for tag, stats in passes.items():
      x, d = [np.mean(np.stack(v), 0) for v in zip(*[ranges(stats[p]) for p in paths if p.endswith(layer)])]
      per[tag] = x
      lines.append(f"| {layer} | {tag} | " + " / ".join(f"{x[i]:.2f}" for i in (0, 10, 19)) + " | "
                   + " | ".join(f"{d[i] / x[i]:.3f}" for i in STEPS) + " |")
    shrink = per["xR"] / per["x"]
    lines.append(f"| {layer} | R / plain | " + " / ".join(f"{shrink[i]:.2f}" for i in (0, 10, 19)) + " | "
                 + " | " * (len(STEPS) - 1) + " |")
  out = os.path.join(ROOT, "experiments", "results", f"{args.out}.md")
  with open(out, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
