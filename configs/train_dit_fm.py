"""Train the embedded FP DiT on Fashion-MNIST (32x32x1, patch 4 -> 64 tokens, 10 classes).

  python main.py --config=configs/train_dit_fm.py --workdir=/tmp/train_fm
  python main.py --config=configs/train_dit_fm.py:tiny --workdir=/tmp/t   # seconds-long smoke run

Recipe: DiT's (hybrid loss, learned sigma, adaLN-Zero, class dropout 0.1, AdamW wd 0, no aug), with a
higher constant LR after a short warm-up and a shorter EMA, because the CPU budget allows ~12k steps
rather than DiT's 400k (see diffq/assets/dit_fm.md).
"""
from diffq import configlib


def get_config(arg=None):
  arg = configlib.parse_arg(arg, tiny=False)
  c = configlib.ml_collections.ConfigDict()
  c.job = "train"
  c.seed = 0
  c.model = configlib.model_config("FM")
  c.data = dict(dir="/usr/share/datasets/fashion-mnist")
  c.diffusion_steps = 1000
  c.batch_size = 128
  c.num_steps = 12000
  c.lr = 3e-4
  c.warmup_steps = 200
  c.weight_decay = 0.0
  c.grad_clip = 1.0
  c.ema_decay = 0.999
  c.compute_dtype = "float32"  # float32 | bfloat16: activations and matmuls (params, grads, optimizer float32)
  c.ema_warmup = False  # decay min(ema_decay, (1 + step) / (10 + step)): the average forgets the init
  c.num_devices = 0  # 0 = all local devices
  c.distributed = False
  c.log_every = 50
  c.checkpoint_every = 250
  c.keep_checkpoints = 2
  # What to do when finished: export EMA params (and the model card inputs) to workdir/ema_params.npz.
  c.export_ema = True
  if arg.tiny:
    c.model.hidden_size, c.model.depth, c.model.num_heads = 32, 2, 2
    c.batch_size, c.num_steps, c.log_every, c.checkpoint_every = 16, 6, 2, 3
  return c
