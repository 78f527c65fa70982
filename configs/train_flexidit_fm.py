"""FlexiDiT fine-tuning of the embedded FP DiT: the same blocks at patch 4 (64 tokens, powerful) and 8 (16, weak).

  python main.py --config=configs/train_flexidit_fm.py --workdir=runs/flexidit_fm      # resumable
  python main.py --config=configs/train_flexidit_fm.py:tiny --workdir=/tmp/t            # seconds-long smoke run

Recipe (FlexiDiT §3.1, shared parameters, ../shared/research/flexidit.md): start from the committed FP model with
the patch-8 embedding and de-embedding PI-resized from its patch-4 ones (diffq/models/flexi.py: the patch-4
forward is unchanged), then DiT's loss at a patch size drawn per step, plus on patch-8 steps the eps MSE to
the frozen FP model at patch 4 (the paper's distillation), and on patch-4 steps the same MSE as an anchor; the
paper's lr 1e-4, no weight decay; the patch-8 embedding starts with a random component on what patch 4 cannot
see (`flexi.null_init`; see diffq/assets/flexidit_fm.md for the runs that led here).
"""
from configs import train_dit_fm
from diffq import configlib


def get_config(arg=None):
  arg = configlib.parse_arg(arg, tiny=False)
  c = train_dit_fm.get_config("tiny" if arg.tiny else None)
  c.init = "diffq/assets/dit_fm_ema.npz"  # the plain DiT to start from ("" = DiT's random initialisation)
  c.model.patch_sizes = (8,)              # the weak patch size; the model's own (4) stays the powerful one
  c.model.flexi_tied = False              # patch 8 gets its own boundary layers (PI-initialised): patch 4's stay
  c.flexi = dict(probs="0.5,0.5",         # per-step patch-size probabilities, model.patch_sizes_all order (4, 8)
                 distill=1.0,             # weight of the eps MSE to the frozen init at patch 4 (patch-8 steps)
                 anchor=1.0,              # ... on patch-4 steps (keeps the powerful mode at the FP model's)
                 null_init=0.25,          # random start of what patch 8 sees inside 4x4 blocks (flexi.from_plain)
                 weak_lr=1e-3)            # lr of the patch-8 leaves (boundary layers, size embedding, affines)
  c.num_steps = 4000
  c.lr = 5e-5                             # the shared leaves (lr 3e-4 took the powerful held-out MSE 0.032 -> 0.055)
  c.warmup_steps = 100
  c.ema_decay = 0.999                     # a 1,000-step horizon (see diffq/assets/dit_fm.md)
  if arg.tiny:
    c.init = ""
    c.flexi.distill = c.flexi.anchor = 0.0
    c.model.hidden_size, c.model.depth, c.model.num_heads = 32, 2, 2
    c.batch_size, c.num_steps, c.log_every, c.checkpoint_every = 16, 6, 2, 3
  return c
