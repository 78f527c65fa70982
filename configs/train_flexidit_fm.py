"""FlexiDiT fine-tuning of the embedded FP DiT: the same blocks at patch 4 (64 tokens, powerful) and 8 (16, weak).

  python main.py --config=configs/train_flexidit_fm.py --workdir=runs/flexidit_fm      # resumable
  python main.py --config=configs/train_flexidit_fm.py:variant=shared --workdir=runs/flexidit_fm_shared
  python main.py --config=configs/train_flexidit_fm.py:tiny --workdir=/tmp/t            # seconds-long smoke run
  python main.py --config=configs/train_flexidit_fm.py:xl2 --workdir=runs/flexidit_xl2  # ImageNet latents, pods

Both variants start from the committed FP model with the patch-8 embedding and de-embedding PI-resized from its
patch-4 ones (diffq/models/flexi.py) plus a random component on what patch 4 cannot see (`flexi.null_init`), and
train DiT's loss plus, on patch-8 steps, the eps MSE to the frozen FP model at patch 4 (the paper's
distillation). `variant=lora` (default; FlexiDiT §3.2's LoRA variant, ../shared/research/flexidit.md §2.6): the
base is frozen, patch 8 gets its own boundary layers, size embedding, affines and rank-16 LoRAs on every block's
qkv/proj/fc1/fc2, and every step is a patch-8 step; the powerful mode is the FP model bit for bit. `variant=shared`
(§3.1's shared parameters): the blocks train at both sizes, patch-4 steps anchored to the FP model. See
diffq/assets/flexidit_fm.md for the runs that led here.
"""
from configs import sample as sample_config, train_dit_fm
from diffq import configlib


def get_config(arg=None):
  arg = configlib.parse_arg(arg, variant="", tiny=False, xl2=False)
  arg.variant = arg.variant or ("shared" if arg.xl2 else "lora")  # the paper's ImageNet setting shares parameters
  if arg.variant not in ("lora", "shared"):
    raise ValueError(f"variant={arg.variant!r}: choose lora (frozen base + patch-8 LoRAs) or shared.")
  c = train_dit_fm.get_config("tiny" if arg.tiny else None)
  c.init = "diffq/assets/dit_fm_ema.npz"  # the plain DiT to start from ("" = DiT's random initialisation)
  c.model.patch_sizes = (8,)              # the weak patch size; the model's own (4) stays the powerful one
  c.model.flexi_tied = False              # patch 8 gets its own boundary layers (PI-initialised): patch 4's stay
  c.flexi = dict(distill=1.0,             # weight of the eps MSE to the frozen init at patch 4 (patch-8 steps)
                 null_init=0.25,          # random start of what patch 8 sees inside 4x4 blocks (flexi.from_plain)
                 weak_lr=1e-3)            # lr of the patch-8 leaves (boundary layers, size embedding, affines, LoRAs)
  c.warmup_steps = 100
  c.ema_decay = 0.999                     # a 1,000-step horizon (see diffq/assets/dit_fm.md)
  if arg.variant == "lora":
    c.model.flexi_lora_rank = 16          # LoRAs on the block linears, used only at patch 8
    c.flexi.freeze_base = True            # every leaf but patch 8's own is frozen
    c.flexi.probs = "0,1"                 # per-step patch-size probabilities, model.patch_sizes_all order (4, 8)
    c.flexi.anchor = 0.0
    c.num_steps = 3000
    c.ema_warmup = True                   # a constant 0.999 keeps 5% of the untrained adapters at 3,000 steps
  else:
    c.flexi.probs = "0.5,0.5"
    c.flexi.anchor = 1.0                  # eps MSE to the frozen init on patch-4 steps (keeps the powerful mode)
    c.num_steps = 4000
    c.lr = 5e-5                           # the shared leaves (lr 3e-4 took the powerful held-out MSE 0.032 -> 0.055)
  if arg.xl2:
    _xl2(c)
  if arg.tiny:
    c.init = ""
    c.flexi.distill = c.flexi.anchor = 0.0
    c.model.hidden_size, c.model.depth, c.model.num_heads = 32, 2, 2
    c.batch_size, c.num_steps, c.log_every, c.checkpoint_every = 16, 6, 2, 3
  return c


def _xl2(c):
  """FlexiDiT-XL/2 at {2, 4} from the official DiT-XL/2-256 on ImageNet SD-VAE latents (configs/encode_latents.py),
  with the paper's Table 4 settings: AdamW lr 1e-4 constant, weight decay 0, EMA 0.9999, batch 256 (DiT's),
  patch sizes drawn uniformly. The step count is not published ("< 5% of pre-training compute"); 100k steps is
  1.4% of DiT-XL/2's 7M. The bootstrapped MMD loss (App. B.1) is not implemented: distillation to the frozen
  init at patch 2 on patch-4 steps and the anchor on patch-2 steps stand in for it."""
  c.init = sample_config.XL2_PARAMS
  c.model = configlib.model_config("DiT-XL/2", patch_sizes=(4,), flexi_tied=False,
                                   flexi_lora_rank=c.model.flexi_lora_rank)
  c.data = dict(kind="latents", dir="imagenet_latents", split="train")  # the encode job's workdir
  c.batch_size, c.num_steps, c.lr, c.weight_decay, c.grad_clip = 256, 100000, 1e-4, 0.0, 0.0
  c.warmup_steps = 0
  c.ema_decay, c.ema_warmup = 0.9999, False
  if not c.flexi.get("freeze_base", False):  # the shared variant: both sizes train, at Table 4's one lr
    c.flexi.probs = "0.5,0.5"
    c.flexi.weak_lr = 1e-4
  c.compute_dtype = "bfloat16"
  c.checkpoint_every = 2000
