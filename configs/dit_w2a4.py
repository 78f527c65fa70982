"""Quantize the embedded FP DiT to 2-bit weights / 4-bit activations with MPQ-DM weights and rotated MoDiff
activations, sample, evaluate, export.

  python main.py --config=configs/dit_w2a4.py --workdir=runs/w2a4                      # MPQ-DM + rotated MoDiff
  python main.py --config=configs/dit_w2a4.py:act=static --workdir=runs/w2a4_static    # wave 1's MPQ-DM W2A4
  python main.py --config=configs/dit_w2a4.py:w=3,a=4,method=uniform --workdir=runs/w3a4_uniform
  python main.py --config=configs/dit_w2a4.py:quick --workdir=/tmp/w2a4_quick          # smoke run, < 3 min
  python main.py --config=configs/dit_w2a4.py:xl2 --workdir=runs/xl2_w2a4               # DiT-XL/2 (README: pods)

Methods (`method=`; every field stays overridable with --config.quant.X / --config.distill.X):
  uniform      plain PTQ: per-channel MSE weights, per-step per-tensor MSE activations, no training
  efficientdm  uniform + LoRA (rank 32) and quantizer distillation on the FP trajectory (EfficientDM)
  omq          efficientdm + SmoothQuant pre-scale and kurtosis mixed precision (MPQ-DM's OMQ)
  trd          efficientdm + time-smoothed relation distillation (MPQ-DM's TRD)
  mpqdm        efficientdm + OMQ + TRD (MPQ-DM)
  vq           additive vector quantization of the weights (AQLM / AQUATIC-Diff; `quant.vq`, configs/dit_vq.py):
               w=M gives M codebooks of 2^8 codewords over groups of 8 inputs (M bits per weight before codebooks)
  vq_pv        vq + PV-tuning on the distillation loop (codebooks, scales and codes; AQUATIC-Diff's stage 2)
Distillation loop (`loop=`, methods that train): fixed (the default except for mpqdm; 50 trajectories along the
quantized model's own DDIM trajectory, the eps MSE on the conditional and unconditional rows apart:
experiments/results/distill_fix.md) | wave1 (mpqdm's default; 150 trajectories, teacher forcing on the FP
trajectory, the MSE of the CFG-combined eps: wave 1's rows).
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
    "vq": dict(omq=False, trd=False, lora=False, vq=True),
    "vq_pv": dict(omq=False, trd=False, lora=False, vq=True, pv=True),
}

# The distillation loop (`loop=`): trajectory fp (teacher forcing) | quant (the student's own DDIM trajectory);
# loss_on guided (eps MSE of the CFG-combined output) | branches (of the cond and uncond rows apart). "wave1" is
# the loop of wave 1's results, "fixed" the remedy of experiments/results/distill_fix.md (EfficientDM-style W3A4:
# 17.89 vs 27.11 on wave1). The default is per method: MPQ-DM keeps wave1, which scores W2A4 (this file's main
# command) 8.67 against 12.78 on the fixed loop and 30.76 as PTQ (experiments/results/vq.md).
LOOPS = {"fixed": dict(trajectories=50, trajectory="quant", loss_on="branches"),
         "wave1": dict(trajectories=150, trajectory="fp", loss_on="guided")}
DEFAULT_LOOP = {"mpqdm": "wave1"}  # method -> loop when `loop=` is not given; others: fixed

ACTS = {"static": ("static", False), "dynamic": ("dynamic", False), "modiff": ("modiff", False),
        "rotate": ("static", True), "rotate_modiff": ("modiff", True)}  # act= -> (quant.act, quant.rotate)


def get_config(arg=None):
  arg = configlib.parse_arg(arg, w=2, a=4, method="mpqdm", act="rotate_modiff", loop="", quick=False, xl2=False)
  arg.loop = arg.loop or DEFAULT_LOOP.get(arg.method, "fixed")
  if arg.method not in METHODS:
    raise ValueError(f"Unknown method {arg.method!r}; choose one of {sorted(METHODS)}.")
  if arg.act not in ACTS:
    raise ValueError(f"Unknown act {arg.act!r}; choose one of {sorted(ACTS)}.")
  if arg.loop not in LOOPS:
    raise ValueError(f"Unknown loop {arg.loop!r}; choose one of {sorted(LOOPS)}.")
  m = METHODS[arg.method]
  c = configlib.ml_collections.ConfigDict()
  c.job = "quantize"
  c.method = arg.method
  c.params = "diffq/assets/dit_fm_ema.npz"
  c.num_devices = 0
  c.distributed = False
  c.quant = dict(w_bits=arg.w, a_bits=arg.a, w_symmetric=False, w_group_size=0, grad="ste",
                 keep_8bit="x_embedder*,t_embedder/*,final_layer/*", smooth=m["omq"], omq=m["omq"],
                 omq_fractions=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5), lora_rank=32 if m["lora"] else 0,
                 act=ACTS[arg.act][0],        # static | dynamic | modiff (see the docstring)
                 rotate=ACTS[arg.act][1],     # block-Hadamard rotation of the body layers' inputs
                 act_granularity="tensor",    # dynamic / modiff ranges: tensor | sample (per row) | token
                 modiff=dict(quantizer="static", compensate=True, warmup_bits=0,
                             late_bits=0, late_from=0),  # late_bits: the differences' bits from step late_from
                 weight="vq" if m.get("vq") else "scalar",  # the body's weight part: scalar | vq
                 vq=dict(num_codebooks=arg.w, codebook_bits=8, group_size=8,  # M x 8-bit codebooks, g = 8
                         layouts="",            # per block layer type, e.g. "adaLN_modulation=1x8g8" (MxBgG)
                         share="type",          # codebooks shared by: none (per layer) | type (across blocks) | all
                         beam_size=1, steps_per_epoch=100, lr=1e-4, max_epochs=100, tolerance=0.01,  # AQLM's fit
                         kmeans_iters=100, kmeans_tol=0.0, kmeans_points=0, seed=0,
                         train=bool(m.get("pv")),  # distillation trains the codebooks and scales (P-step)
                         update_codes=True))    # ... and, when training, re-encodes codes (PV-tuning's V-step)
  # Data-free calibration set: the FP model's own DDIM trajectory (same sampler as evaluation, other seed).
  c.calib = dict(num_images=8, seed=1000, omq_images_per_step=2, act_sample_size=16384,
                 compute_dtype="float32")  # the trajectory's and statistics pass's: float32 | bfloat16
  # MPQ-DM's released recipe except the length (16,000 steps there) and the loop (`loop=`); 0 trajectories = PTQ.
  # PV-tuning (method=vq_pv) runs AQLM's LAMB steps at a third of their size with the eps MSE weighted by each
  # step's effect on x_{t-1}, 8-bit activation quantizers frozen (experiments/results/pv_diag.md).
  pv = bool(m.get("pv"))
  c.distill = dict(images=4, seed=3407, lora_lr_divisor=2500.0,
                   w_quant_lr=1e-6, a_quant_lr=0.0 if pv and arg.a == 8 else 5e-4, weight_decay=0.01,
                   trd_weight=100.0 if m["trd"] else 0.0,
                   trd_window=2, trd_grad="current", checkpoint_every=500, keep_checkpoints=2, log_every=50,
                   # PV-tuning of VQ weights (method=vq_pv): P-step Adam lr, V-step target lr, fraction of code
                   # groups re-encoded per step, its L2 beam, selective momentum invalidation none|boundary|code_change
                   # (vq_lamb: LAMB trust ratio, the lrs are relative steps, as in AQLM's recipe)
                   vq_lr=1e-4, code_lr=3e-3, vq_lamb=True, max_code_change=0.01, code_beam=5, semi="none",
                   # loss_norm none | mean | running | x_prev (per-position eps-MSE weight), grad_clip (0 = off)
                   loss_norm="x_prev" if pv else "none", loss_norm_decay=0.9, grad_clip=0.0,
                   compute_dtype="float32",  # student and teacher: float32 | bfloat16
                   **LOOPS[arg.loop])
  if not (m["lora"] or pv):
    c.distill.trajectories = 0
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
  """DiT-XL/2-256 on ImageNet latents with MPQ-DM's ImageNet sampler (DDIM 20, eta 0, CFG 3.0), 50k
  class-balanced samples as its released evaluation scripts draw, and its distillation length (800 trajectories
  x 20 steps = 16,000 optimiser steps); outputs as configs/sample.py's `xl2_outputs`."""
  c.params = sample_config.XL2_PARAMS
  sample_config.xl2_outputs(c.sample)
  c.sample.cfg_scale = 3.0
  c.sample.num_samples, c.sample.batch_size = 50000, 64
  c.calib.num_images = 8
  if c.distill.trajectories:  # methods that train
    c.distill.trajectories = 800
