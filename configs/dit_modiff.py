"""MoDiff (Ma et al., ICML 2025): modulated activation quantization on the quantize job, sampled and scored.

  python main.py --config=configs/dit_modiff.py --workdir=runs/modiff_w8a4          # W8A4, the best embedded row
  python main.py --config=configs/dit_modiff.py:w=4,a=4 --workdir=runs/modiff_w4a4
  python main.py --config=configs/dit_modiff.py:xl2 --workdir=runs/xl2_modiff_w8a6  # DiT-XL/2, the paper's Table 8
  python main.py --config=configs/dit_modiff.py:quick --workdir=/tmp/modiff_quick   # smoke run

Each body layer quantizes x_t - x_hat_{t-1} (error-compensated, research/modiff.md §2) after a block-Hadamard
rotation; weights plain per-channel PTQ (`method=`, as configs/dit_w2a4.py). Embedded default: per-step ranges of
the FP increments, 8-bit differences on the last 4 of 20 steps (experiments/results/modiff.md: W8A4 3.69 against
FP 3.49). `xl2`: Table 8's setting ("following PTQ4DiT"): tensor-wise dynamic ranges, no rotation, 50 steps,
10k samples; the paper leaves the sampler and CFG unstated, so DiT's DDPM with CFG 1.5 (PTQ4DiT's) is used.
"""
from configs import dit_w2a4


def get_config(arg=None):
  arg = dit_w2a4.configlib.parse_arg(arg, w=8, a=-1, method="uniform", quick=False, xl2=False)
  if arg.a < 0:
    arg.a = 6 if arg.xl2 else 4
  act = "modiff" if arg.xl2 else "rotate_modiff"
  c = dit_w2a4.get_config(f"w={arg.w},a={arg.a},method={arg.method},act={act}"
                          + (",quick" if arg.quick else "") + (",xl2" if arg.xl2 else ""))
  if arg.xl2:
    c.quant.modiff.quantizer = "dynamic"    # min-max of each call's difference, per tensor
    c.sample.method, c.sample.spacing, c.sample.cfg_scale = "ddpm", "50", 1.5
    c.sample.num_samples = 10000
  else:
    c.quant.modiff.update(quantizer="static", late_bits=8, late_from=16)
  return c
