"""Where a quantized model departs from FP: per-step noise-prediction error along the FP trajectory.

  python experiments/quant_error.py --runs runs/sweeps/quant_grid/w8a8_uniform,... [--images 16] [--out NAME]

For each run's exported `quantized.npz` (re-imported exactly as the quantize job samples from it):
  * teacher-forced error per sampling step i: ||eps_q(x_i) - eps_fp(x_i)||^2 / ||eps_fp(x_i)||^2 of the CFG-guided
    eps on the FP model's own DDIM inputs x_i (one new seed, class-balanced images), in step order (MoDiff's
    state runs along that trajectory);
  * the same with activations left in float (`a_bits` = 0 in every layer): the weight-only share of the error;
  * free-running error: RMS pixel difference of x_0 sampled by the quantized and the FP model from the same noise;
  * per layer group (`--groups`): the teacher-forced error with that group's activations left in float, i.e. how
    much of the error its activation quantizers cause.
Writes experiments/results/<out>.md (tables) and <out>.png (per-step curves).
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from diffq import plan as plan_lib, sampler  # noqa: E402
from diffq.jobs import sample  # noqa: E402
from diffq.io import npz  # noqa: E402
from diffq.io import quantized  # noqa: E402
from diffq.models import dit  # noqa: E402
from diffq.seam import inputs, spec as spec_lib  # noqa: E402

FP_PARAMS = "diffq/assets/dit_fm_ema.npz"
GROUPS = ("x_embedder,t_embedder/*,*/adaLN_modulation,*/attn/qkv,*/attn/proj,*/mlp/fc1,*/mlp/fc2,"
          "final_layer/linear")


def weight_only(table):
  """The same spec table with float activations everywhere."""
  return tuple((pattern, s.replace(input=inputs.Float())) for pattern, s in table)


def float_acts_in(table, pattern: str, layer_paths):
  """The same spec table with float activations in the layers matching `pattern` (each keeps its weights)."""
  hits = [p for p in layer_paths if fnmatch.fnmatchcase(p, pattern)]
  if not hits:
    raise SystemExit(f"--groups pattern {pattern!r} matches no layer; layers look like {layer_paths[:4]}.")
  return tuple((p, spec_lib.resolve(p, table).replace(input=inputs.Float())) for p in hits) + tuple(table)


def guided_eps_fn(model_cfg, table):
  """(model_fn, jitted (variables, state, x, t, y, step, cfg) -> (guided eps, state), model)."""
  model = dit.DiT(config=model_cfg, specs=tuple(table))
  model_fn = dit.model_fn(model)

  def eps(v, state, x, t, y, step, cfg):
    out, state = sampler.guided(model_fn, v, state, x, t, y, plan_lib.StepContext(step), cfg, model_cfg.num_classes)
    return out[..., :model_cfg.in_channels], state
  return model_fn, jax.jit(eps, static_argnums=6), model


def per_step_eps(eps_fn, model, variables, xs, labels, plan, cfg_scale) -> list[jax.Array]:
  """Guided eps of every step on the FP trajectory's inputs xs (S, N, H, W, C), in step order: a stateful
  model (MoDiff) carries its state along that trajectory from zeros."""
  state = dit.init_state(model, variables, labels.shape[0] * (2 if cfg_scale != 1.0 else 1))
  out = []
  for i, t in enumerate(plan.model_timesteps):
    e, state = eps_fn(variables, state, xs[i], jnp.full((labels.shape[0],), int(t), jnp.int32), labels, i,
                      cfg_scale)
    out.append(e)
  return out


def per_step_error(eps_fn, model, variables, ref_eps, xs, labels, plan, cfg_scale) -> np.ndarray:
  """(S,) relative squared error of eps_fn's guided eps against the FP model's `ref_eps` at each step."""
  return np.array([float(jnp.sum((a - b) ** 2) / jnp.sum(b ** 2)) for a, b in
                   zip(per_step_eps(eps_fn, model, variables, xs, labels, plan, cfg_scale), ref_eps)])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--runs", required=True, help="comma-separated quantize-job workdirs (with quantized.npz)")
  parser.add_argument("--images", type=int, default=16)
  parser.add_argument("--seed", type=int, default=2000, help="differs from calibration (1000) and evaluation (0)")
  parser.add_argument("--cfg_scale", type=float, default=3.0, help="the protocol CFG")
  parser.add_argument("--groups", default=GROUPS, help="comma-separated layer patterns ('' to skip)")
  parser.add_argument("--out", default="quant_error")
  args = parser.parse_args()
  runs = [r for r in args.runs.split(",") if r]
  for r in runs:
    if not os.path.exists(os.path.join(r, "quantized.npz")):
      raise SystemExit(f"{r}/quantized.npz not found: pass workdirs of finished quantize jobs "
                       "(python main.py --config=configs/dit_w2a4.py --workdir=...).")
  model_cfg, params = sample.load_dit(os.path.join(ROOT, FP_PARAMS))
  plan = plan_lib.make_plan(1000, "ddim20")
  shape = (model_cfg.input_size, model_cfg.input_size, model_cfg.in_channels)
  labels = jnp.arange(args.images, dtype=jnp.int32) % model_cfg.num_classes
  ids = jnp.arange(args.images)
  key = jax.random.key(args.seed)
  fp_fn, eps_fp, fp_model = guided_eps_fn(model_cfg, ())
  net_rows = args.images * (2 if args.cfg_scale != 1.0 else 1)
  draw = lambda fn, model, v: jax.jit(lambda v: sampler.sample(
      fn, v, key, labels, ids, plan=plan, shape=shape, method="ddim", cfg_scale=args.cfg_scale,
      null_class=model_cfg.num_classes, clip_x0=True, state=dit.init_state(model, v, net_rows),
      return_trajectory=True))(v)
  x0_fp, xs = draw(fp_fn, fp_model, {"params": params})
  ref_eps = per_step_eps(eps_fp, fp_model, {"params": params}, xs, labels, plan, args.cfg_scale)  # every run's
  error = lambda cfg, table, variables: per_step_error(*guided_eps_fn(cfg, table)[1:], variables, ref_eps, xs,
                                                       labels, plan, args.cfg_scale)
  groups = [g for g in args.groups.split(",") if g]
  curves, rows, group_rows = {}, [], []
  for r in runs:
    qcfg, variables, table = quantized.import_quantized(os.path.join(r, "quantized.npz"))
    name = os.path.basename(os.path.normpath(r))
    e_full, e_w = error(qcfg, table, variables), error(qcfg, weight_only(table), variables)
    fn, _, model = guided_eps_fn(qcfg, table)
    x0_q, _ = draw(fn, model, variables)
    rms = float(jnp.sqrt(jnp.mean((x0_q - x0_fp) ** 2)))
    curves[name] = (e_full, e_w)
    rows.append((name, e_full.mean(), e_w.mean(), e_full[:5].mean(), e_full[-5:].mean(), rms))
    layer_paths = sorted({k.rsplit("/", 1)[0] for k in npz.flatten(variables["quant"])})
    group_rows.append((name, *[error(qcfg, float_acts_in(table, g, layer_paths), variables).mean() for g in groups]))
    print(f"{name}: eps rel err {e_full.mean():.4g} (weights only {e_w.mean():.4g}), x0 RMS diff {rms:.4g}",
          flush=True)
  lines = ["# Quantization error along the FP trajectory", "",
           f"Produced by: `python experiments/quant_error.py --runs {args.runs} --images {args.images} "
           f"--seed {args.seed} --out {args.out}" + (f" --groups '{args.groups}'" if args.groups != GROUPS else "")
           + "`", "",
           "Relative squared error of the CFG-guided eps (teacher-forced on the FP DDIM-20 inputs, averaged over "
           "steps); `weights only` keeps activations in float; `x0 RMS` is the free-running pixel difference "
           "(range [-1, 1]) from the same noise.", "",
           "| run | eps rel err | weights only | first 5 steps | last 5 steps | x0 RMS |", "|---|---|---|---|---|---|"]
  lines += [f"| {n} | " + " | ".join(f"{v:.4g}" for v in vals) + " |" for n, *vals in rows]
  if groups:
    lines += ["", "eps rel err with float activations in one layer group (compare with `eps rel err` above):", "",
              "| run | " + " | ".join(f"`{g}`" for g in groups) + " |", "|---|" + "---|" * len(groups)]
    lines += [f"| {n} | " + " | ".join(f"{v:.4g}" for v in vals) + " |" for n, *vals in group_rows]
  out_dir = os.path.join(ROOT, "experiments", "results")
  with open(os.path.join(out_dir, f"{args.out}.md"), "w") as f:
    f.write("\n".join(lines) + "\n")

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for i, (name, (e_full, e_w)) in enumerate(curves.items()):
    color = f"C{i}"
    ax.plot(e_full, "o-", color=color, ms=3, label=name)
    ax.plot(e_w, "--", color=color, lw=1, label=f"{name} (weights only)")
  ax.set_yscale("log")
  ax.set_xlabel("sampling step (0 = noisiest)")
  ax.set_ylabel("relative squared eps error")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, f"{args.out}.png"), dpi=120)
  print("\n".join(lines))


if __name__ == "__main__":
  main()
