"""Why distillation can hurt: the loop's per-position loss / gradient profile and held-out error while it trains.

  python experiments/distill_diag.py --name w3a4_default [--config=dit_w2a4:w=3,a=4,method=efficientdm,act=static] \
      [--set a_quant_lr=0,grad_clip=1] [--trajectories 150] [--eval_every 25] [--images 50]
  python experiments/distill_diag.py --name w3a8_pv --config=dit_vq:w=3,a=8,pv --trajectories 50 --eval_every 10

Runs the quantize job's calibration (VQ fit included) and `diffq.distill` loop in process (a quantize config from
configs/, overrides of config.distill from --set) and records
  * per optimiser step: mse, grad_norm and per learning-rate group gradient / update norms, by trajectory position;
  * every --eval_every trajectories, on held-out images (seed 2000, not the loop's or the calibration's):
    teacher-forced relative eps error on the FP trajectory (`tf`), the same on the quantized model's own
    trajectory against the FP eps at those inputs (`own`), and the free-running x0 RMS vs FP from the same
    noise (`x0_rms`, the fidelity the FID sees).
Writes runs/diag/<name>.json and prints a summary.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from diffq import distill, parallel, sampler  # noqa: E402
from diffq.jobs import quantize, sample  # noqa: E402
from diffq.models import dit  # noqa: E402
from diffq.seam import rules  # noqa: E402
from experiments.quant_error import guided_eps_fn, per_step_eps  # noqa: E402


def parse_set(text: str) -> dict:
  out = {}
  for item in filter(None, text.split(",")):
    k, v = item.split("=")
    try:
      out[k] = json.loads(v)
    except json.JSONDecodeError:
      out[k] = v
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="dit_w2a4:w=3,a=4,method=efficientdm,act=static",
                 help="configs/<module>:<arg> of a distilling quantize config")
  p.add_argument("--name", required=True)
  p.add_argument("--set", default="", help="config.distill overrides, k=v,...")
  p.add_argument("--trajectories", type=int, default=150)
  p.add_argument("--eval_every", type=int, default=25)
  p.add_argument("--images", type=int, default=50)
  p.add_argument("--stop_after", type=int, default=0, help="stop after this many trajectories (0: all), same "
                 "lr schedule")
  args = p.parse_args()
  module, _, config_arg = args.config.partition(":")
  config = importlib.import_module(f"configs.{module}").get_config(config_arg)
  config.distill.trajectories = args.trajectories
  for k, v in parse_set(args.set).items():
    config.distill[k] = v
  mesh = parallel.make_mesh(None)
  plan = quantize.check_settings(config, mesh)
  table = rules.quant_table(config.quant, len(plan.steps))
  model_cfg, params = sample.load_dit(os.path.join(ROOT, config.params))
  calib_dir = os.path.join(ROOT, "runs", "diag", "calib_" + re.sub(r"[^A-Za-z0-9=]+", "_", args.config))
  quant, _ = quantize.calibrated_quant(config, model_cfg, params, table, plan, mesh, calib_dir, {})
  s = config.sample
  d = distill.Distiller(model_cfg, plan, table, quantize.distill_config(config), cfg_scale=s.cfg_scale, eta=s.eta,
                        clip_x0=s.clip_x0)

  # held-out set: FP trajectory, FP eps on it, FP x0
  n = args.images
  labels = jnp.arange(n, dtype=jnp.int32) % model_cfg.num_classes
  ids, key = jnp.arange(n), jax.random.key(2000)
  shape = d.shape
  rows = n * (2 if s.cfg_scale != 1.0 else 1)
  fp_fn, eps_fp, fp_model = guided_eps_fn(model_cfg, ())
  q_fn, eps_q, q_model = guided_eps_fn(model_cfg, table)
  draw = lambda fn, model: jax.jit(lambda v: sampler.sample(
      fn, v, key, labels, ids, plan=plan, shape=shape, method="ddim", cfg_scale=s.cfg_scale,
      null_class=model_cfg.num_classes, clip_x0=s.clip_x0, state=dit.init_state(model, v, rows),
      return_trajectory=True))
  fpv = {"params": params}
  x0_fp, xs_fp = draw(fp_fn, fp_model)(fpv)
  ref_tf = per_step_eps(eps_fp, fp_model, fpv, xs_fp, labels, plan, s.cfg_scale)
  draw_q = draw(q_fn, q_model)
  rel = lambda a, b: np.array([float(jnp.sum((u - v) ** 2) / jnp.sum(v ** 2)) for u, v in zip(a, b)])

  init = jax.device_get(d.init_state(quant)[0]["quant"])

  def drift(train):
    """Per group and leaf name: ||theta - theta_0|| / ||theta_0|| (LoRA B starts at 0: absolute norm)."""
    out = {}
    for k, v in jax.device_get(train).items():
      name = f"{d._groups[k]}/{k.rsplit('/', 1)[1]}"
      a, b = out.get(name, (0.0, 0.0))
      out[name] = (a + float(np.sum((v - init[k]) ** 2)), b + float(np.sum(init[k] ** 2)))
    return {k: float(np.sqrt(a / b)) if b > 0 else float(np.sqrt(a)) for k, (a, b) in out.items()}

  def evaluate(q, train=None):
    v = {"params": params, "quant": q}
    tf = rel(per_step_eps(eps_q, q_model, v, xs_fp, labels, plan, s.cfg_scale), ref_tf)
    x0_q, xs_q = draw_q(v)
    own = rel(per_step_eps(eps_q, q_model, v, xs_q, labels, plan, s.cfg_scale),
              per_step_eps(eps_fp, fp_model, fpv, xs_q, labels, plan, s.cfg_scale))
    return dict(tf=tf.tolist(), own=own.tolist(), x0_rms=float(jnp.sqrt(jnp.mean((x0_q - x0_fp) ** 2))),
                drift=drift(train) if train is not None else {})

  state, frozen = d.init_state(quant)
  rep = parallel.replicated(mesh)
  state, frozen, params_r = jax.device_put((state, frozen, params), rep)
  step_fn = d.jit_step(mesh, state)
  evals = [dict(trajectory=0, **evaluate(d.merged_quant(state, frozen)))]
  print(f"traj 0: x0_rms {evals[-1]['x0_rms']:.4f} tf {np.mean(evals[-1]['tf']):.4f} "
        f"own {np.mean(evals[-1]['own']):.4f}", flush=True)
  print(f"  tf by pos {np.array(evals[-1]['tf']).round(3)}\n  own by pos {np.array(evals[-1]['own']).round(3)}")
  steps, t0, batch = [], time.time(), None
  path = os.path.join(ROOT, "runs", "diag", f"{args.name}.json")

  def write(evals, steps, **extra):
    with open(path, "w") as f:
      json.dump(dict(args=vars(args), distill=dict(quantize.distill_config(config).__dict__), evals=evals,
                     steps=steps, **extra), f)

  for step in range(d.num_steps):
    j, pos = divmod(step, len(plan.steps))
    if pos == 0:
      batch = parallel.shard_batch(d.trajectory_inputs(j), mesh)
    state, m = step_fn(state, frozen, params_r, *batch)
    steps.append({k: float(v) for k, v in jax.device_get(m).items()})
    if pos == len(plan.steps) - 1 and (j + 1) % args.eval_every == 0:
      evals.append(dict(trajectory=j + 1, **evaluate(d.merged_quant(state, frozen), state["quant"])))
      e = evals[-1]
      print(f"traj {j + 1}: x0_rms {e['x0_rms']:.4f} tf {np.mean(e['tf']):.4f} own {np.mean(e['own']):.4f} "
            f"({time.time() - t0:.0f} s)", flush=True)
      print(f"  tf by pos {np.array(e['tf']).round(3)}\n  own by pos {np.array(e['own']).round(3)}", flush=True)
      print(f"  drift {e['drift']}", flush=True)
      write(evals, steps)
      if args.stop_after and j + 1 >= args.stop_after:
        break
  S = len(plan.steps)
  prof = lambda key, part: np.array([s_[key] for s_ in steps])[:len(steps) // S * S].reshape(-1, S)[part].mean(0)
  keys = sorted(steps[0])
  summary = {f"{k}_{name}": prof(k, part).tolist() for k in keys
             for name, part in (("first10", slice(0, 10)), ("last10", slice(-10, None)))}
  write(evals, steps, profile=summary)
  np.set_printoptions(precision=3, linewidth=200)
  for k in ("mse", "grad_norm", "grad_norm_lora", "grad_norm_act_quant", "grad_norm_weight_quant",
            "update_norm_lora", "update_norm_act_quant", "update_norm_weight_quant"):
    if f"{k}_first10" in summary:
      print(f"{k} by position (first 10 traj): {np.array(summary[f'{k}_first10'])}")
      print(f"{k} by position (last 10 traj):  {np.array(summary[f'{k}_last10'])}")
  for e in evals:
    print(f"traj {e['trajectory']:4d}: x0_rms {e['x0_rms']:.4f}  tf by pos {np.array(e['tf'])}")
    print(f"           own by pos {np.array(e['own'])}")


if __name__ == "__main__":
  main()
