"""CPU time of a VQ layer's three forms on the embedded DiT's body layer shapes, one run, interleaved repeats:
the dense matmul with the kernel decoded once (what sampling runs), decode-then-matmul on every call (what
training runs), and the LUT path (vq.lut_matmul: per-token tables of input-codeword products, gathered per
output; no multiply per weight), with the analytic FLOPs of each (vq.lut_flops).

  python experiments/vq_lut_speed.py [--codebooks 2] [--bits 8] [--group 8] [--batch 100] [--repeats 20]

Rows are tokens of one sampling call (batch images x 2 for CFG x 64 tokens; adaLN runs once per row). The cost
does not depend on the codes' values, so the codes are random.
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
from diffq.jobs import sample  # noqa: E402
from diffq.quant import vq  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--codebooks", type=int, default=2)
  ap.add_argument("--bits", type=int, default=8)
  ap.add_argument("--group", type=int, default=8)
  ap.add_argument("--batch", type=int, default=100)
  ap.add_argument("--repeats", type=int, default=20)
  ap.add_argument("--params", default="diffq/assets/dit_fm_ema.npz")
  ap.add_argument("--out", default="vq_lut_speed.md")
  args = ap.parse_args()
  cfg, _ = sample.load_dit(os.path.join(ROOT, args.params))
  d, tokens = cfg.hidden_size, 2 * args.batch * cfg.grid_size ** 2
  layers = {"adaLN_modulation": (d, 6 * d, 2 * args.batch), "attn/qkv": (d, 3 * d, tokens),
            "attn/proj": (d, d, tokens), "mlp/fc1": (d, 4 * d, tokens), "mlp/fc2": (4 * d, d, tokens)}
  rng = np.random.default_rng(0)
  lines = ["# VQ layer forms on CPU", "", f"{args.codebooks}x{args.bits}-bit codebooks, group {args.group}, the "
           f"embedded DiT's body layers (hidden {d}), batch {args.batch} images (CFG rows x tokens), "
           f"{args.repeats} interleaved repeats after compilation, {os.cpu_count()} CPU cores. Command: "
           f"`python experiments/vq_lut_speed.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}`", "",
           "| layer (in -> out) | rows | dense ms | decode+matmul vs dense | LUT vs dense | LUT == dense (max abs) "
           "| LUT flops / dense flops |", "|---|---|---|---|---|---|---|"]
  for name, (n_in, n_out, rows) in layers.items():
    w = vq.VQWeight(jnp.asarray(rng.integers(0, 2 ** args.bits, (n_out, n_in // args.group, args.codebooks)),
                                jnp.int32),
                    jnp.asarray(rng.normal(size=(args.codebooks, 2 ** args.bits, args.group)), jnp.float32),
                    jnp.asarray(rng.uniform(0.5, 1.5, n_out), jnp.float32))
    x = jnp.asarray(rng.normal(size=(rows, n_in)), jnp.float32)
    kernel = vq.dequantize(w)
    forms = {"dense": jax.jit(lambda x, w, k=kernel: x @ k), "decode": jax.jit(lambda x, w: x @ vq.dequantize(w)),
             "lut": jax.jit(vq.lut_matmul)}
    outs = {k: jax.block_until_ready(f(x, w)) for k, f in forms.items()}
    times = {k: [] for k in forms}
    for _ in range(args.repeats):
      for k, f in forms.items():
        t0 = time.perf_counter()
        jax.block_until_ready(f(x, w))
        times[k].append(time.perf_counter() - t0)
    f = vq.lut_flops(n_in, n_out, args.codebooks, args.bits, args.group)
    lines.append(f"| {name} ({n_in} -> {n_out}) | {rows} | {1e3 * np.median(times['dense']):.2f} | "
                 f"{time_ratio(times['dense'], times['decode'])} | {time_ratio(times['dense'], times['lut'])} | "
                 f"{float(jnp.max(jnp.abs(outs['lut'] - outs['dense']))):.1e} | "
                 f"{(f['table'] + f['gather']) / f['dense']:.2f} |")
  lines += ["", "Ratios are time / dense time, the median of per-repeat ratios [quartiles] (pairs ran back to back).",
            "LUT flops per row: 2 in M K (the table) + out (in / g) M (gathered adds); dense 2 in out."]
  report.write_markdown(args.out, lines)


def time_ratio(ref_times, times) -> str:
  """'median [q25, q75]' of t_i / ref_i over interleaved repeats i (each pair ran back to back)."""
  q25, q50, q75 = np.percentile(np.asarray(times) / np.asarray(ref_times), [25, 50, 75])
  return f"{q50:.2f}x [{q25:.2f}, {q75:.2f}]"


if __name__ == "__main__":
  main()
