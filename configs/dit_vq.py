"""Additive vector quantization of the embedded DiT's weights (AQLM's layer fit, as AQUATIC-Diff's stage 1),
sampled from the re-imported export and scored.

  python main.py --config=configs/dit_vq.py --workdir=runs/vq_w2a8                    # W2A8: 2x8-bit codebooks, g=8
  python main.py --config=configs/dit_vq.py:w=3 --workdir=runs/vq_w3a8                # 3 codebooks
  python main.py --config=configs/dit_vq.py:w=2,a=4,act=rotate_modiff --workdir=runs/vq_w2a4   # + rotated MoDiff
  python main.py --config=configs/dit_vq.py:pv --workdir=runs/vq_w2a8_pv             # + PV-tuning
  python main.py --config=configs/dit_vq.py:quick --workdir=/tmp/vq_quick             # smoke run
  python main.py --config=configs/dit_vq.py:xl2,pv --workdir=runs/xl2_vq_w2a8_pv      # DiT-XL/2

Every body layer's weight (W x 8 bits per group of 8 inputs, codebooks shared per layer type across blocks:
`quant.vq.share`) is fitted to its output error on the FP trajectory, tr(ΔW H ΔWᵀ) with H = XᵀX, by residual
k-means, then Adam on codebooks and scales alternating with a beam search over the codes (`quant.vq`: beam_size,
steps_per_epoch, lr, max_epochs, tolerance). Embedders and the final layer stay W8A8 (`quant.keep_8bit`). The
activation part is that of configs/dit_w2a4.py (`act=`); A8 defaults to the static per-step quantizer.
`pv` fine-tunes on the distillation loop (diffq/distill.py): LAMB-scaled Adam on codebooks and scales, and after
every update the 1% of code groups farthest from their straight-through targets re-encoded (`distill.vq_lr`,
`code_lr`, `max_code_change`, `code_beam`, `semi`); its eps MSE is weighted per step by d x_{t-1} / d eps
(`distill.loss_norm=x_prev`) and 8-bit activation quantizers stay frozen (experiments/results/pv_diag.md);
`loop=` as in configs/dit_w2a4.py.
"""
from configs import dit_w2a4


def get_config(arg=None):
  arg = dit_w2a4.configlib.parse_arg(arg, w=2, a=8, act="static", pv=False, loop="fixed", quick=False, xl2=False)
  method = "vq_pv" if arg.pv else "vq"
  c = dit_w2a4.get_config(f"w={arg.w},a={arg.a},method={method},act={arg.act},loop={arg.loop}"
                          + (",quick" if arg.quick else "") + (",xl2" if arg.xl2 else ""))
  if arg.quick:
    c.quant.vq.max_epochs = 3
  if arg.xl2:  # AQUATIC-Diff's sampler (LDM-4 ImageNet: DDIM 20, eta 0, CFG 3.0, 50k; EfficientDM's scripts)
    c.distill.trajectories = 160 if arg.pv else 0  # 3,200 steps, "5x fewer than EfficientDM" (research/vq_diffusion.md)
  return c
