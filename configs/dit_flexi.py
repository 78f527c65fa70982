"""FlexiDiT sampling: weak (patch 8, 16 tokens) steps first, powerful (patch 4, 64 tokens) steps last.

  python main.py --config=configs/dit_flexi.py --workdir=runs/flexi_t10             # 10 of 20 DDIM steps weak
  python main.py --config=configs/dit_flexi.py:t_weak=14,t_weak_guide=16 --workdir=runs/flexi_t14_g16
  python main.py --config=configs/dit_flexi.py:t_weak=0 --workdir=runs/flexi_powerful   # the powerful mode only
  python main.py --config=configs/dit_flexi.py:quick --workdir=/tmp/flexi_quick     # smoke run
  python main.py --config=configs/dit_flexi.py:xl2 --workdir=runs/xl2_flexi         # FlexiDiT XL/2 (patch 4 weak)

The model is the committed FlexiDiT fine-tune of the FP model (diffq/assets/flexidit_fm.md). Under the
experiments/PROTOCOL.md sampler (DDIM 20, CFG 3, N = 5000), the first `t_weak` steps run both guidance branches
at patch 8; steps t_weak..t_weak_guide-1 guide the powerful conditional prediction by the weak one (FlexiDiT §3.4,
scale s2 = 1 - (1 - s1) / 2.5). metrics.json has gmacs_per_image of the plan (diffq/eval/flops.py).
"""
from configs import sample as sample_config
from diffq import configlib

# DiT-XL/2 (`xl2`: configs/sample.py:xl2's DDPM-250, CFG 1.5): the first 120 of the 250 steps at patch 4, i.e.
# the powerful model for the last 130 in both branches, the paper's "130/130" point at 63.8% of the MACs (its
# FID 2.25 at ~64%; tests/test_flexi.py checks the fraction).
XL2_T_WEAK = 120


def get_config(arg=None):
  arg = configlib.parse_arg(arg, t_weak=-1, t_weak_guide=-1, quick=False, xl2=False)
  if arg.t_weak < 0:
    arg.t_weak = XL2_T_WEAK if arg.xl2 else 10
  c = sample_config.get_config(",".join(k for k in ("quick", "xl2") if arg[k]))
  c.params = "flexidit_xl2_256.npz" if arg.xl2 else "diffq/assets/flexidit_fm_ema.npz"  # model.patch_sizes
  c.weak_patch = 4 if arg.xl2 else 8
  c.t_weak = arg.t_weak                          # the first t_weak steps run at weak_patch
  c.t_weak_guide = arg.t_weak_guide              # -1: = t_weak (no weak-guided powerful steps)
  return c
