"""Does distillation shrink the quantized model's outputs (MSE-optimal under noisy activations)?

  python experiments/guidance_gain.py --runs runs/w3a4_uniform_n1k,runs/w3a4_edm_t50 [--images 50]

For each run's exported `quantized.npz`, on the FP model's DDIM-20 trajectory of held-out images (seed 2000), per
sampling position: the least-squares gain of the quantized model's guidance direction (cond - uncond eps) on the
FP one, <d_q, d_fp> / |d_fp|^2 (1 = guidance kept; < 1 = weaker effective CFG), the same gain of the guided eps,
and the relative error of the guided eps split into the part along the FP output (gain error) and the rest.
Prints a table (positions 0 = noisiest).
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

from diffq import plan as plan_lib, sampler  # noqa: E402
from diffq.io import quantized  # noqa: E402
from diffq.jobs import sample  # noqa: E402
from diffq.models import dit  # noqa: E402
from experiments.quant_error import FP_PARAMS  # noqa: E402


def branches(model_cfg, table):
  """jitted (variables, x, t, y, step) -> (cond eps, uncond eps) of one CFG network batch."""
  model = dit.DiT(config=model_cfg, specs=tuple(table))

  def fn(v, x, t, y, step):
    out = model.apply(v, *sampler.cfg_batch(x, t, y, model_cfg.num_classes), ctx=plan_lib.StepContext(step))
    c, u = jnp.split(out[..., :model_cfg.in_channels], 2)
    return c, u
  return jax.jit(fn)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--runs", required=True)
  p.add_argument("--images", type=int, default=50)
  p.add_argument("--cfg_scale", type=float, default=3.0)
  args = p.parse_args()
  model_cfg, params = sample.load_dit(os.path.join(ROOT, FP_PARAMS))
  plan = plan_lib.make_plan(1000, "ddim20")
  shape = (model_cfg.input_size, model_cfg.input_size, model_cfg.in_channels)
  n = args.images
  labels = jnp.arange(n, dtype=jnp.int32) % model_cfg.num_classes
  fp_model = dit.DiT(config=model_cfg)
  _, xs = jax.jit(lambda v: sampler.sample(
      dit.model_fn(fp_model), v, jax.random.key(2000), labels, jnp.arange(n), plan=plan, shape=shape,
      method="ddim", cfg_scale=args.cfg_scale, null_class=model_cfg.num_classes, clip_x0=True,
      return_trajectory=True))({"params": params})
  fp = branches(model_cfg, ())
  ts = [jnp.full((n,), int(t), jnp.int32) for t in plan.model_timesteps]
  ref = [fp({"params": params}, xs[i], ts[i], labels, i) for i in range(len(ts))]
  s = args.cfg_scale
  np.set_printoptions(precision=3, linewidth=220)
  for r in filter(None, args.runs.split(",")):
    qcfg, variables, table = quantized.import_quantized(os.path.join(r, "quantized.npz"))
    q = branches(qcfg, table)
    dir_gain, out_gain, err_along, err_rest = [], [], [], []
    for i in range(len(ts)):
      (cq, uq), (cf, uf) = q(variables, xs[i], ts[i], labels, i), ref[i]
      dq, df = cq - uq, cf - uf
      gq, gf = uq + s * dq, uf + s * df
      dir_gain.append(float(jnp.sum(dq * df) / jnp.sum(df ** 2)))
      b = float(jnp.sum(gq * gf) / jnp.sum(gf ** 2))
      out_gain.append(b)
      e = gq - gf
      along = (b - 1.0) * gf
      err_along.append(float(jnp.sum(along ** 2) / jnp.sum(gf ** 2)))
      err_rest.append(float(jnp.sum((e - along) ** 2) / jnp.sum(gf ** 2)))
    name = os.path.basename(os.path.normpath(r))
    print(f"{name}\n  guidance-direction gain {np.array(dir_gain)}\n  guided-eps gain         {np.array(out_gain)}"
          f"\n  rel err along FP        {np.array(err_along)}\n  rel err rest            {np.array(err_rest)}",
          flush=True)


if __name__ == "__main__":
  main()
