"""Export a DiT as a diffq numpy export: the latest EMA of a training workdir, or any DiT export.

  python main.py --config=configs/export_dit.py --config.source=runs/train_fm \
      --config.dest=diffq/assets/dit_fm_ema.npz --workdir=runs/export
"""
from diffq import configlib


def get_config(arg=None):
  configlib.parse_arg(arg)
  c = configlib.ml_collections.ConfigDict()
  c.job = "export_dit"
  c.source = ""
  c.dest = ""
  return c
