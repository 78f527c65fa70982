"""Analytic compute accounting for DiT: MACs per layer, per network call, per image for a step plan; BitOPs.

MACs count multiply-accumulates of matmuls only (every seam Linear plus the two attention products per block);
norms, activations and softmax are ignored, as in the DiT paper's Gflops. BitOPs = MACs x w_bits x a_bits.
"""
from __future__ import annotations

from diffq.models.dit import DiTConfig
from diffq.plan import StepPlan

ATTENTION_PRODUCTS = ("attn/qk", "attn/av")


def dit_layer_macs(cfg: DiTConfig) -> dict[str, int]:
  """MACs of one forward pass for one image, keyed by layer path (seam Linears + 'blocks_i/attn/qk|av')."""
  t, d, p = cfg.num_tokens, cfg.hidden_size, cfg.patch_size
  h = int(d * cfg.mlp_ratio)
  macs = {"x_embedder": t * p * p * cfg.in_channels * d, "t_embedder/mlp_0": 256 * d, "t_embedder/mlp_2": d * d}
  for i in range(cfg.depth):
    b = f"blocks_{i}/"
    macs.update({b + "adaLN_modulation": d * 6 * d, b + "attn/qkv": t * d * 3 * d, b + "attn/qk": t * t * d,
                 b + "attn/av": t * t * d, b + "attn/proj": t * d * d, b + "mlp/fc1": t * d * h,
                 b + "mlp/fc2": t * h * d})
  macs.update({"final_layer/adaLN_modulation": d * 2 * d, "final_layer/linear": t * d * p * p * cfg.out_channels})
  return macs


def macs_per_call(cfg: DiTConfig) -> int:
  return sum(dit_layer_macs(cfg).values())


def macs_per_image(cfg: DiTConfig, plan: StepPlan, cfg_scale: float = 1.0) -> int:
  """Network MACs to draw one image under `plan`, each step counted by its kind; guidance (scale != 1) doubles
  the batch. Only 'refresh' kinds (full network calls) have a cost model yet: a cached kind's cost depends on
  the layer parts it runs, which the caching methods define."""
  cached = sorted({k.name for k in plan.step_kinds if k.cache != "refresh"})
  if cached:
    raise ValueError(f"No MACs model for the cached step kinds {cached} yet.")
  return macs_per_call(cfg) * len(plan.steps) * (2 if cfg_scale != 1.0 else 1)


def bitops_per_call(cfg: DiTConfig, w_bits: dict[str, float] | None = None, a_bits: dict[str, float] | None = None,
                    default_bits: float = 32) -> float:
  """Sum over layers of MACs x weight bits x activation bits (attention products: a_bits x a_bits)."""
  w_bits, a_bits = w_bits or {}, a_bits or {}
  total = 0.0
  for path, m in dit_layer_macs(cfg).items():
    a = a_bits.get(path, default_bits)
    w = a if path.endswith(ATTENTION_PRODUCTS) else w_bits.get(path, default_bits)
    total += m * w * a
  return total
