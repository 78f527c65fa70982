"""Class-conditional sampling from a DiT export -> samples.npz (ADM format), a PNG grid, metrics.json.

  python main.py --config=configs/sample.py --workdir=/tmp/sample     # experiments/PROTOCOL.md sample set
  python main.py --config=configs/sample.py:xl2 --workdir=runs/xl2    # DiT-XL/2-256 + SD-VAE (README: DiT-XL/2)
"""
from diffq import configlib


def get_config(arg=None):
  arg = configlib.parse_arg(arg, quick=False, xl2=False)
  c = configlib.ml_collections.ConfigDict()
  c.job = "sample"
  c.seed = 0
  c.params = "diffq/assets/dit_fm_ema.npz"  # a diffq numpy export with a dit_params manifest
  c.vae = ""                               # latent models: the VAE export samples are decoded with (SD-VAE)
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
  c.compute_dtype = "float32"              # float32 | bfloat16 (activations and matmuls; params, sums float32)
  c.execution = "float"                    # float | integer: a quantized export's layers as int8 matmuls
  c.method = "ddim"                        # ddim | ddpm
  c.eta = 0.0
  c.clip_x0 = True                         # ADM clip_denoised: right for pixel data (DiT's latents: False)
  c.cfg_scale = 3.0                        # the protocol CFG: lowest FID of experiments/results/fp_cfg.md
  c.cfg_channels = 0                       # guided eps channels, the first N (0 = all; DiT's sampler: 3 of 4)
  c.num_devices = 0
  c.distributed = False
  c.grid_per_class = 10
  c.grid_classes = ""                      # classes in grid.png, "a,b,c" ("" = all; ImageNet: a few)
  c.evaluate = True                        # score in-process (configs/evaluate.py semantics)
  c.eval = configlib.eval_config()
  if arg.quick:
    c.num_samples, c.batch_size = 100, 100
  if arg.xl2:
    xl2(c)
  return c


XL2_PARAMS = "dit_xl2_256.npz"   # configs/export_dit.py of DiT-XL-2-256x256.pt
XL2_VAE = "sd_vae_ft_ema.npz"     # configs/export_dit.py of stabilityai/sd-vae-ft-ema


def xl2_outputs(c):
  """The DiT-XL/2 settings every method shares (on a sample config): SD-VAE decoding, latents unclipped, CFG on
  3 of the 4 latent channels as DiT's released sampler, DiT's sample.py grid classes, no in-process scoring (the
  ADM evaluator scores samples.npz; diffq has no ImageNet reference statistics)."""
  c.vae = XL2_VAE
  c.clip_x0, c.cfg_channels, c.evaluate = False, 3, False
  c.grid_classes = "207,360,387,974,88,979,417,279"
  c.grid_per_class = 8


def xl2(c):
  """DiT-XL/2-256 on ImageNet latents with the DiT paper's FID-50K settings: 250 DDPM steps, CFG 1.5, 50k
  class-balanced samples (`xl2_outputs`)."""
  c.params = XL2_PARAMS
  xl2_outputs(c)
  c.method, c.spacing, c.cfg_scale = "ddpm", "250", 1.5
  c.num_samples, c.batch_size = 50000, 256         # class-balanced: 50 per class
