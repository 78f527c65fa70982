"""Export a model as a diffq numpy export: a training workdir's latest EMA, a DiT export, a diffusers
DiTTransformer2DModel or AutoencoderKL directory, or an official facebookresearch/DiT .pt checkpoint.

  python main.py --config=configs/export_dit.py --config.source=runs/train_fm \
      --config.dest=diffq/assets/dit_fm_ema.npz --workdir=runs/export
  python main.py --config=configs/export_dit.py --config.source=DiT-XL-2-256x256.pt \
      --config.dest=dit_xl2_256.npz --workdir=runs/export_xl2                    # needs torch (weights_only)
  python main.py --config=configs/export_dit.py --config.source=sd-vae-ft-ema \
      --config.dest=sd_vae_ft_ema.npz --workdir=runs/export_vae
  python main.py --config=configs/export_dit.py --config.source=random:DiT-XL/2 --config.overrides=depth=4 \
      --config.dest=xl2_depth4_random.npz --workdir=runs/export_random     # random weights: pipeline checks
  python main.py --config=configs/export_dit.py --config.source=random:vae \
      --config.overrides="block_out_channels=(32,32),norm_num_groups=8" --config.dest=vae_random.npz --workdir=...
"""
from diffq import configlib


def get_config(arg=None):
  configlib.parse_arg(arg)
  c = configlib.ml_collections.ConfigDict()
  c.job = "export_dit"
  c.source = ""
  c.dest = ""
  c.num_heads = 0  # a .pt of a non-official width: its head count (not stored in the weights; 0 = by width)
  c.overrides = ""  # random: sources: DiTConfig / VAEConfig fields, "depth=4,num_classes=10"
  c.seed = 0        # random: sources
  return c
