"""Quantize the embedded FP DiT to 2-bit weights / 4-bit activations with MPQ-DM weights and rotated MoDiff
activations, sample, evaluate, export.

  python main.py --config=configs/dit_w2a4.py --workdir=runs/w2a4                      # MPQ-DM + rotated MoDiff
  python main.py --config=configs/dit_w2a4.py:act=static --workdir=runs/w2a4_static    # wave 1's MPQ-DM W2A4
  python main.py --config=configs/dit_w2a4.py:w=3,a=4,method=uniform --workdir=runs/w3a4_uniform
  python main.py --config=configs/dit_w2a4.py:quick --workdir=/tmp/w2a4_quick          # smoke run, < 3 min
  python main.py --config=configs/dit_w2a4.py:xl2 --workdir=...                        # DiT-XL/2 set-up (see below)

Methods (`method=`; every field stays overridable with --config.quant.X / --config.distill.X):
  uniform      plain PTQ: per-channel MSE weights, per-step per-tensor MSE activations, no training
  efficientdm  uniform + LoRA (rank 32) and quantizer distillation on the FP trajectory (EfficientDM)
  omq          efficientdm + SmoothQuant pre-scale and kurtosis mixed precision (MPQ-DM's OMQ)
  trd          efficientdm + time-smoothed relation distillation (MPQ-DM's TRD)
  mpqdm        efficientdm + OMQ + TRD (MPQ-DM)
OMQ alone as PTQ: method=omq with --config.distill.trajectories=0. Embedders and the final layer stay W8A8
without LoRA (`quant.keep_8bit`), as in MPQ-DM's boundary rule.

Activations (`act=`, the body layers' input part; `quant.act_granularity` tensor | sample | token):
  static       per-step per-tensor ranges calibrated on the FP trajectory (wave 1)
  dynamic      min-max of each call's input
  modiff       MoDiff: quantize x_t - x_hat_{t-1} (error-compensated reconstruction), first call in
               float; `quant.modiff.quantizer` static (default: per-step ranges of the FP increments) | dynamic
               (min-max per call, the released code's), `.compensate`,
               `.warmup_bits` (0 = float), `.late_bits` / `.late_from` (wider differences on the last steps)
  rotate       static, after a randomised block-Hadamard rotation of the input (W <- R^T W offline; quant.rotate)
  rotate_modiff  (default) modiff after the rotation
"""
from configs import sample as sample_config
from diffq import configlib

METHODS = {
    "uniform": dict(omq=False, trd=False, lora=False),
    "efficientdm": dict(omq=False, trd=False, lora=True),
    "omq": dict(omq=True, trd=False, lora=True),
    "trd": dict(omq=False, trd=True, lora=True),
    "mpqdm": dict(omq=True, trd=True, lora=True),
}

ACTS = {"static": ("static", False), "dynamic": ("dynamic", False), "modiff": ("modiff", False),
        "rotate": ("static", True), "rotate_modiff": ("modiff", True)}  # act= -> (quant.act, quant.rotate)


def get_config(arg=None):
  arg = configlib.parse_arg(arg, w=2, a=4, method="mpqdm", act="rotate_modiff", quick=False, xl2=False)
  if arg.method not in METHODS:
    raise ValueError(f"Unknown method {arg.method!r}; choose one of {sorted(METHODS)}.")
  if arg.act not in ACTS:
    raise ValueError(f"Unknown act {arg.act!r}; choose one of {sorted(ACTS)}.")
  m = METHODS[arg.method]
  c = configlib.ml_collections.ConfigDict()
  c.job = "quantize"
  c.method = arg.method
  c.params = "diffq/assets/dit_fm_ema.npz"
  c.num_devices = 0
  c.distributed = False
  c.quant = dict(w_bits=arg.w, a_bits=arg.a, w_symmetric=False, w_group_size=0, grad="ste",
                 keep_8bit="x_embedder,t_embedder/*,final_layer/*", smooth=m["omq"], omq=m["omq"],
                 omq_fractions=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5), lora_rank=32 if m["lora"] else 0,
                 act=ACTS[arg.act][0],        # static | dynamic | modiff (see the docstring)
                 rotate=ACTS[arg.act][1],     # block-Hadamard rotation of the body layers' inputs
                 act_granularity="tensor",    # dynamic / modiff ranges: tensor | sample (per row) | token
                 modiff=dict(quantizer="static", compensate=True, warmup_bits=0,
                             late_bits=0, late_from=0))  # late_bits: the differences' bits from step late_from
  # Data-free calibration set: the FP model's own DDIM trajectory (same sampler as evaluation, other seed).
  c.calib = dict(num_images=8, seed=1000, omq_images_per_step=2, act_sample_size=16384)
  # MPQ-DM's released recipe except the length (16,000 steps there); 0 trajectories = PTQ only.
  c.distill = dict(trajectories=150 if m["lora"] else 0, images=4, seed=3407, lora_lr_divisor=2500.0,
                   w_quant_lr=1e-6, a_quant_lr=5e-4, weight_decay=0.01, trd_weight=100.0 if m["trd"] else 0.0,
                   trd_window=2, trd_grad="current", checkpoint_every=500, keep_checkpoints=2, log_every=50,
                   # remedies (diffq/distill.py; these values are wave 1's loop): loss_norm none | mean | running |
                   # x_prev, grad_clip (0 = off), trajectory fp (teacher forcing) | quant (the student's own),
                   # loss_on guided (CFG-combined eps) | branches (cond and uncond eps separately)
                   loss_norm="none", loss_norm_decay=0.9, grad_clip=0.0, trajectory="fp", loss_on="guided")
  c.sample = sample_config.get_config("quick" if arg.quick else None)
  for k in ("job", "params", "num_devices", "distributed"):
    del c.sample[k]
  if arg.quick:
    c.calib.num_images = 4
    c.distill.trajectories = min(c.distill.trajectories, 5)
  if arg.xl2:
    _xl2(c)
  return c


def _xl2(c):
  """DiT-XL/2-256 on ImageNet latents (MPQ-DM's ImageNet sampler: DDIM 20, eta 0, CFG 3.0; latents unclipped).
  Needs a converted checkpoint (diffq.io.diffusers_dit) at c.params; samples are VAE latents, so evaluation
  is off (decode and score with the ADM evaluator outside diffq)."""
  c.params = "dit_xl2_256.npz"
  c.sample.cfg_scale, c.sample.clip_x0, c.sample.evaluate = 3.0, False, False
  c.sample.num_samples, c.sample.batch_size = 1000, 8
  c.calib.num_images = 8
  c.distill.trajectories = 800
