"""Config -> static policy table for the seam layers (which layer gets which quantizer)."""
from __future__ import annotations

from diffq.models import layers


def policy_table(qcfg, num_steps: int) -> tuple[tuple[str, layers.LayerPolicy], ...]:
  """Layers matching `qcfg.keep_8bit` patterns: W8A8 per-channel, no smoothing/OMQ/LoRA (MPQ-DM's boundary rule);
  every other seam Linear: W`w_bits`A`a_bits` with the configured options. Activation quantizers are per
  sampling step (`num_steps` entries)."""
  if qcfg.omq and qcfg.w_group_size:
    raise ValueError("quant.omq assigns bits per output channel and cannot be combined with quant.w_group_size; "
                     "set one of them to its default (omq=False or w_group_size=0).")
  boundary = layers.LayerPolicy(kind="fakequant", w_bits=8, a_bits=8, a_steps=num_steps, grad=qcfg.grad)
  body = layers.LayerPolicy(kind="fakequant", w_bits=qcfg.w_bits, a_bits=qcfg.a_bits, a_steps=num_steps,
                            w_symmetric=qcfg.w_symmetric, w_group_size=qcfg.w_group_size, mixed_bits=qcfg.omq,
                            smooth=qcfg.smooth, lora_rank=qcfg.lora_rank, grad=qcfg.grad)
  patterns = [p for p in qcfg.keep_8bit.split(",") if p]
  return tuple((p, boundary) for p in patterns) + (("*", body),)
