"""FlexiDiT sampling: weak (patch 8, 16 tokens) steps first, powerful (patch 4, 64 tokens) steps last.

  python main.py --config=configs/dit_flexi.py --workdir=runs/flexi_t10             # 10 of 20 DDIM steps weak
  python main.py --config=configs/dit_flexi.py:t_weak=14,t_weak_guide=16 --workdir=runs/flexi_t14_g16
  python main.py --config=configs/dit_flexi.py:t_weak=0 --workdir=runs/flexi_powerful   # the powerful mode only
  python main.py --config=configs/dit_flexi.py:quick --workdir=/tmp/flexi_quick     # smoke run

The model is the committed FlexiDiT fine-tune of the FP model (diffq/assets/flexidit_fm.md). Under the
experiments/PROTOCOL.md sampler (DDIM 20, CFG 3, N = 5000), the first `t_weak` steps run both guidance branches
at patch 8; steps t_weak..t_weak_guide-1 guide the powerful conditional prediction by the weak one (FlexiDiT §3.4,
scale s2 = 1 - (1 - s1) / 2.5). metrics.json has gmacs_per_image of the plan (diffq/eval/flops.py).
"""
from configs import sample as sample_config
from diffq import configlib


def get_config(arg=None):
  arg = configlib.parse_arg(arg, t_weak=10, t_weak_guide=-1, quick=False)
  c = sample_config.get_config("quick" if arg.quick else None)
  c.params = "diffq/assets/flexidit_fm_ema.npz"  # a FlexiDiT export (model.patch_sizes = (8,))
  c.weak_patch = 8
  c.t_weak = arg.t_weak                          # of the 20 steps, the first t_weak run at patch 8
  c.t_weak_guide = arg.t_weak_guide              # -1: = t_weak (no weak-guided powerful steps)
  return c
