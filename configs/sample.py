"""Class-conditional sampling from a DiT export -> samples.npz (ADM format), a PNG grid, metrics.json.

  python main.py --config=configs/sample.py --workdir=/tmp/sample     # experiments/PROTOCOL.md sample set
"""
from diffq import configlib


def get_config(arg=None):
  arg = configlib.parse_arg(arg, quick=False)
  c = configlib.ml_collections.ConfigDict()
  c.job = "sample"
  c.seed = 0
  c.params = "diffq/assets/dit_fm_ema.npz"  # a diffq numpy export with a dit_params manifest
  c.num_samples = 5000                     # the protocol N; class-balanced: labels = arange(N) % num_classes
  c.batch_size = 250
  c.diffusion_steps = 1000
  c.spacing = "ddim20"                     # respacing: "ddimN", "N" or "a,b,c" section counts
  c.cache_pattern = ""                     # step kinds: "" all full, "period:p" or F/C per step (cached models)
  # FlexiDiT (models with patch_sizes): the first t_weak steps at weak_patch, both guidance branches; the guidance
  # branch alone stays weak up to step t_weak_guide (-1: = t_weak), guiding the powerful conditional prediction.
  c.t_weak = 0
  c.t_weak_guide = -1
  c.weak_patch = 0                         # the weak steps' patch size (one of the model's patch_sizes)
  c.method = "ddim"                        # ddim | ddpm
  c.eta = 0.0
  c.clip_x0 = True                         # ADM clip_denoised: right for pixel data (DiT's latents: False)
  c.cfg_scale = 3.0                        # the protocol CFG: lowest FID of experiments/results/fp_cfg.md
  c.num_devices = 0
  c.distributed = False
  c.grid_per_class = 10
  c.evaluate = True                        # score in-process (configs/evaluate.py semantics)
  c.eval = configlib.eval_config()
  if arg.quick:
    c.num_samples, c.batch_size = 100, 100
  return c
