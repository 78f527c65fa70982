"""Quantize the embedded FP DiT to 2-bit weights / 4-bit activations (MPQ-DM recipe), sample, evaluate.

  python main.py --config=configs/dit_w2a4.py --workdir=runs/w2a4
  python main.py --config=configs/dit_w2a4.py:w=3,a=4,method=uniform --workdir=runs/w3a4_uniform

Methods (the `method=` argument; every field stays overridable with --config.quant.X=...):
  uniform  plain PTQ: per-channel MSE weights, per-step per-tensor MSE activations
  omq      + SmoothQuant pre-scale and kurtosis-driven mixed precision (MPQ-DM's OMQ)
Embedders and the final layer stay W8A8 (`quant.keep_8bit`).
"""
from configs import sample as sample_config
from diffq import configlib

METHODS = {"uniform": dict(smooth=False, omq=False), "omq": dict(smooth=True, omq=True)}


def get_config(arg=None):
  arg = configlib.parse_arg(arg, w=2, a=4, method="omq", quick=False)
  if arg.method not in METHODS:
    raise ValueError(f"Unknown method {arg.method!r}; choose one of {sorted(METHODS)}.")
  c = configlib.ml_collections.ConfigDict()
  c.job = "quantize"
  c.params = "diffq/assets/dit_fm_ema.npz"
  c.num_devices = 0
  c.distributed = False
  c.quant = dict(w_bits=arg.w, a_bits=arg.a, w_symmetric=False, w_group_size=0, lora_rank=0, grad="ste",
                 keep_8bit="x_embedder,t_embedder/*,final_layer/*",
                 omq_fractions=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5), **METHODS[arg.method])
  # Data-free calibration set: the FP model's own DDIM trajectory (same sampler as evaluation, other seed).
  c.calib = dict(num_images=32, seed=1000, omq_images_per_step=2)
  c.sample = sample_config.get_config("quick" if arg.quick else None)
  for k in ("job", "params", "num_devices", "distributed"):
    del c.sample[k]
  return c
