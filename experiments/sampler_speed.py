"""Wall-clock of the compiled sampler alone: full DDIM vs ICC / naive caching / fewer-step DDIM / FlexiDiT, one run.

  python experiments/sampler_speed.py [--variants fp,p2_r16,p3_r16,p2_r0,ddim11] [--batch 250] [--repeats 7]
                                      [--params diffq/assets/dit_fm_ema.npz] [--out icc_speed.md]

A variant is `fp` (DDIM-20, every step full), `pP_rR` (ICC, period P, rank R on the four block linears; r0 = naive
reuse), `<F/C pattern>_rR` (ICC on that static pattern of the 20 steps), either with `_rA-M` instead of `_rR`
(rank A on the attention linears, M on the MLP's), a `_bf16` suffix (the cache state in bfloat16) and a `_chain`
suffix (the MLP as one increment through the linearised GELU), `ddimN` (full DDIM with N steps), `weakT` or
`weakT_gG` (a FlexiDiT --params: the first T of the 20 steps at its weak patch size, the guidance branch weak up to
step G; `fp` is then its powerful mode), or
`q:<workdir>` (a quantize job's re-imported export `<workdir>/quantized.npz` on DDIM-20, the model its job samples);
any of them with `@bfloat16` appended runs the network in that compute dtype (`sample.compute_dtype`), and a
`q:` variant with `@integer` runs its layers as int8 matmuls (`sample.execution`); `--params` may be any
export, e.g. a `random:` one of configs/export_dit.py at XL/2 widths.
Every variant is jitted and run once (compilation) before timing,
then all variants are timed in turn `--repeats` times on the same batch (interleaved, so machine noise hits them
alike); the table reports the median, the ratio to `fp`'s median, and the median (with quartiles) of the
per-repeat ratios fp_i / variant_i, which pairs runs done back to back (the machine's slow spells cancel).
Factors are plain-SVD (the SVD variant does not change the cost). Writes experiments/results/<out>.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import report  # noqa: E402
from diffq import parallel, plan as plan_lib  # noqa: E402
from diffq.eval import flops  # noqa: E402
from diffq.io import quantized  # noqa: E402
from diffq.jobs import icc, sample  # noqa: E402
from diffq.seam import rules  # noqa: E402
from configs import sample as sample_config  # noqa: E402


def variant(name: str, model_cfg, params):
  """(plan, spec table, variables) of a variant name."""
  if name == "fp" or name.startswith("ddim"):
    spacing = "ddim20" if name == "fp" else name
    return plan_lib.make_plan(1000, spacing), (), {"params": params}
  m = re.fullmatch(r"weak(\d+)(?:_g(\d+))?", name)
  if m:
    if not model_cfg.patch_sizes:
      raise SystemExit(f"Variant {name} needs a FlexiDiT --params (a model with patch_sizes).")
    return (plan_lib.make_plan(1000, "ddim20", weak_patch=model_cfg.patch_sizes[0], t_weak=int(m.group(1)),
                               t_weak_guide=int(m.group(2)) if m.group(2) else None), (), {"params": params})
  if name.startswith("q:"):
    path = os.path.join(name[2:], "quantized.npz")
    if not os.path.exists(path):
      raise SystemExit(f"{path} not found: q:<workdir> needs a finished quantize job's workdir.")
    q_cfg, variables, table = quantized.import_quantized(path)
    if q_cfg != model_cfg:
      raise SystemExit(f"{path} holds a different model than --params.")
    return plan_lib.make_plan(1000, "ddim20"), table, variables
  m = re.fullmatch(r"(p\d+|[FC]+)_r(\d+)(?:-(\d+))?(_bf16)?(_chain)?", name)
  if not m:
    raise SystemExit(f"Unknown variant {name!r}: use fp, ddimN, weakT[_gG], or pP / an F/C pattern with _rR or "
                     "_rA-M, then optionally _bf16, then optionally _chain (see the docstring).")
  schedule, attn, mlp = m.group(1), int(m.group(2)), int(m.group(3) or m.group(2))
  pattern = f"period:{schedule[1:]}" if schedule.startswith("p") else schedule
  ranks = dict(qkv=attn, proj=attn, fc1=mlp, fc2=mlp)
  table, variables = icc.add_caches(model_cfg, {"params": params}, (), ranks, "plain",
                                    state_dtype="bfloat16" if m.group(4) else "float32",
                                    mlp="chain" if m.group(5) else "layers")
  return plan_lib.make_plan(1000, "ddim20", pattern=pattern), table, variables


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--variants", default="fp,p2_r16,p3_r16,p2_r0,ddim11")
  ap.add_argument("--batch", type=int, default=250)
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--params", default="diffq/assets/dit_fm_ema.npz")
  ap.add_argument("--out", default="icc_speed.md")
  args = ap.parse_args()
  names = [v for v in args.variants.split(",") if v]
  if "fp" not in names:
    raise SystemExit("--variants must include fp (the reference of every ratio).")
  model_cfg, params = sample.load_dit(os.path.join(ROOT, args.params))
  conf = sample_config.get_config()
  mesh = parallel.make_mesh(None)
  labels, ids = parallel.shard_batch((np.arange(args.batch, dtype=np.int32) % model_cfg.num_classes,
                                      np.arange(args.batch, dtype=np.int32)), mesh)
  runs = {}
  for name in names:
    base, *options = name.split("@")
    bad = set(options) - {"bfloat16", "float32", "integer"}
    if bad:
      raise SystemExit(f"Unknown variant options {sorted(bad)} in {name!r}: use @bfloat16 and/or @integer.")
    plan, table, variables = variant(base, model_cfg, params)
    conf.compute_dtype = "bfloat16" if "bfloat16" in options else "float32"
    conf.execution = "integer" if "integer" in options else "float"
    table, _ = sample.execution_specs(conf, model_cfg, table)
    fn = sample.make_sample_fn(model_cfg, plan, conf, mesh, table)
    variables = jax.device_put(variables, parallel.replicated(mesh))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(variables, jax.random.key(0), labels, ids))
    gmacs = flops.macs_per_image(model_cfg, plan, conf.cfg_scale, table) / 1e9
    runs[name] = dict(fn=fn, v=variables, times=[], compile=time.perf_counter() - t0, gmacs=gmacs)
    print(f"{name}: compiled + first run {runs[name]['compile']:.1f} s, {gmacs:.3f} GMACs/image", flush=True)
  for r in range(args.repeats):
    for name, run in runs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(run["fn"](run["v"], jax.random.key(r + 1), labels, ids))
      run["times"].append(time.perf_counter() - t0)
    print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{n} {x['times'][-1]:.2f} s" for n, x in runs.items()),
          flush=True)
  fp = float(np.median(runs["fp"]["times"]))
  cmd = "python experiments/sampler_speed.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  lines = [f"# Sampler wall-clock: {', '.join(names)}", "",
           f"Compiled sampler alone (no scoring, no host transfer beyond the result), batch {args.batch} images "
           f"(CFG 3: {2 * args.batch} network rows), {len(jax.devices())} device(s), {os.cpu_count()} CPU cores; "
           f"{args.repeats} interleaved repeats after a compile run. Command: `{cmd}`", "",
           "| variant | GMACs/image | MACs vs fp | median s | min s | max s | speed-up vs fp (medians) | "
           "paired speed-up vs fp, median [IQR] |",
           "|---|---|---|---|---|---|---|---|"]
  for name, run in runs.items():
    t = np.array(run["times"])
    lines.append(f"| {name} | {run['gmacs']:.3f} | {run['gmacs'] / runs['fp']['gmacs']:.3f} | {np.median(t):.2f} | "
                 f"{t.min():.2f} | {t.max():.2f} | {fp / np.median(t):.2f}x | "
                 f"{report.paired_speedup(runs['fp']['times'], t)} |")
  report.write_markdown(args.out, lines)


if __name__ == "__main__":
  main()
