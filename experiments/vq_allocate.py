"""Layer-type-aware VQ budgets (LAQ): per block layer type and candidate layout, the model's eps error when only
that type is VQ-quantized (the rest float) along the calibration trajectory, then the greedy allocation
(diffq/quant/allocate.py) that meets an average code-bits budget, printed as a `quant.vq.layouts` override.

  python experiments/vq_allocate.py [--budget 2.0] [--layouts 1x8g8,2x8g8,3x8g8] [--out vq_allocation.md]

Error = mean over steps of ||eps_q - eps_fp||² / ||eps_fp||² of the CFG-guided eps on the calibration set (the
FP trajectory of configs/dit_vq.py's calibration: 8 images, seed 1000), i.e. not the evaluation samples. Bits
count codes, fp16 scales and each type's shared fp16 codebooks.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import dit_vq  # noqa: E402
from experiments import report  # noqa: E402
from diffq import calibrate, parallel, plan as plan_lib, sampler  # noqa: E402
from diffq.jobs import quantize, sample  # noqa: E402
from diffq.models import dit  # noqa: E402
from diffq.quant import allocate, vq  # noqa: E402
from diffq.seam import rules, spec as spec_lib, weights  # noqa: E402

TYPES = ("adaLN_modulation", "attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--budget", type=float, default=2.0, help="average code bits per body weight (overheads apart)")
  ap.add_argument("--layouts", default="1x8g8,2x8g8,3x8g8")
  ap.add_argument("--out", default="vq_allocation.md")
  args = ap.parse_args()
  c = dit_vq.get_config("w=2")
  mesh = parallel.make_mesh(1)
  plan = quantize.check_settings(c, mesh)
  cfg, params = sample.load_dit(os.path.join(ROOT, c.params))
  cal = quantize.calibration_set(c, cfg, {"params": params}, plan, mesh)
  paths = {t: [f"blocks_{b}/{t}" for b in range(cfg.depth)] for t in TYPES}
  stats = calibrate.statistics(cfg, {"params": params}, (), cal, {p: ("in_xtx",) for ps in paths.values() for p in ps})
  flat_params = flax.traverse_util.flatten_dict(params, sep="/")
  kernel = lambda p: flat_params[f"{p}/kernel"]
  fit = rules.vq_fit_settings(c.quant.vq)

  fp = dit.model_fn(dit.DiT(config=cfg))
  steps = jnp.asarray(cal.plan.model_timesteps, jnp.int32)
  guide = lambda fn, v, i: sampler.guided(fn, v, {}, cal.xs[i], jnp.full((cal.xs.shape[1],), steps[i]),
                                          cal.labels, plan_lib.StepContext(i), c.sample.cfg_scale,
                                          cfg.num_classes)[0][..., :cfg.in_channels]
  eps_fp = [jax.jit(guide, static_argnums=0)(fp, {"params": params}, i) for i in range(len(plan.steps))]

  def eps_error(table, quant):
    q = jax.jit(lambda v, i: guide(dit.model_fn(dit.DiT(config=cfg, specs=table)), v, i))
    v = {"params": params, "quant": quant}
    return float(np.mean([jnp.sum((q(v, i) - e) ** 2) / jnp.sum(e ** 2) for i, e in enumerate(eps_fp)]))

  options, rows = {}, []
  for t, ps in paths.items():
    for layout in args.layouts.split(","):
      (m, b, g), = rules.parse_layouts(f"x={layout}").values()
      t0 = time.time()
      fitted, info = vq.quantize_weights([kernel(p) for p in ps], [stats[p]["in_xtx"] for p in ps],
                                         num_codebooks=m, codebook_bits=b, group_size=g, settings=fit)
      spec = spec_lib.LayerSpec(weight=weights.VQ(m, b, g, "type"))
      quant = flax.traverse_util.unflatten_dict(
          {f"{p}/{k}": v for p, w in zip(ps, fitted) for k, v in zip(("vq_codes", "vq_codebooks", "vq_scales"), w)},
          sep="/")
      err = eps_error(((f"blocks_*/{t}", spec),), quant)
      n_in, n_out = kernel(ps[0]).shape
      per = vq.stored_bits(n_in, n_out, m, b, g, shared_by=len(ps))
      bits = len(ps) * sum(per.values())
      code_bits = len(ps) * per["codes"]
      options[t] = options.get(t, []) + [(layout, code_bits, err)]
      rows.append((t, layout, n_in * n_out * len(ps), bits / (n_in * n_out * len(ps)), float(np.mean(info["errors"])),
                   err, time.time() - t0))
      print(rows[-1], flush=True)
  n_body = sum(r[2] for r in rows if r[1] == rows[0][1])
  chosen = allocate.greedy_allocation(options, args.budget * n_body)
  override = ",".join(f"{t}={chosen[t]}" for t in TYPES)
  cmd = " ".join(["python experiments/vq_allocate.py", *map(shlex.quote, sys.argv[1:])])
  lines = ["# VQ bit allocation across layer types (LAQ)", "", f"Command: `{cmd}`. Error: the model's relative eps "
           "error on the calibration trajectory with only that type VQ-quantized (codebooks shared across blocks).",
           "", "| type | layout | weights | stored bits/weight | layer error (H) | eps error | fit s |",
           "|---|---|---|---|---|---|---|"]
  lines += [f"| {t} | {lay} | {n} | {bpw:.3f} | {le:.2e} | {ee:.2e} | {s:.0f} |" for t, lay, n, bpw, le, ee, s in rows]
  code = sum(next(o[1] for o in options[t] if o[0] == chosen[t]) for t in TYPES) / n_body
  lines += ["", f"Greedy allocation at {args.budget} average code bits per body weight ({code:.3f} used): "
            f"`--config.quant.vq.layouts={override}`"]
  report.write_markdown(args.out, lines)


if __name__ == "__main__":
  main()
