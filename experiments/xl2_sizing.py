"""DiT-XL/2 jobs sized from the code, before launching on a pod: params, MACs, memory per image and per device.

  python experiments/xl2_sizing.py [--hbm_gib 16] [--batch 256] [--out xl2_sizing.md]

For DiT-XL/2 at 256 (32x32x4 latents) and 512 (64x64x4), and each method's plan as its `:xl2` config samples it
(README: "Every method on DiT-XL/2"; the plans, spec tables and CFG scales are read from the configs), prints:

- params and stored weight bytes (nominal: the spec table's bits per weight; OMQ's per-channel bits average to
  the body's w_bits; VQ: M codebooks of 8 bits per 8 inputs, codebooks not counted);
- GMACs per full network call and per image (diffq/eval/flops.py, every step by its kind, CFG's two rows);
- sampler state per image: the ICC caches / MoDiff reconstructions the scan carries (jax.eval_shape of
  dit.init_states over the method's spec table: nothing is allocated);
- peak activations per image of one network call under CFG (2 rows): a block's live tensors in float32,
  tokens x (D residual + 3D qkv + 4D MLP hidden + D output) + heads x tokens^2 attention, analytic;
- SD-VAE decode per image: the full-resolution tensors live at once (the last upsampler's 256-channel input and
  output, the first 128-channel ResNet output; float32) + its mid-block attention ((H/8 W/8)^2), analytic;
- calibration per device: the FP trajectory of calib.num_images (8) images, every step's latents, plus the
  statistics the spec table's parts ask for (per layer: in x in for XᵀX, 3 x in per step for min/max ranges),
  float32;
- distillation per device per image: the activations kept for the backward pass of one call (2 rows): depth x
  tokens x 14 D floats (the block's inputs, norms, qkv, attention output, MLP hidden twice) + depth x heads x
  tokens^2 attention probabilities, plus once per device the trainable leaves' weights, grads and two Adam
  moments (LoRA rank 32 on the body, quantizer scales);
- devices needed at --hbm_gib for a --batch of images per step of the sampler: params + VAE (replicated, data
  parallel) plus batch / devices x per-image memory must fit.

Analytic figures are labelled as such; they are what to check against a profile on the first real run.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys

import flax
import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import dit_flexi, dit_icc, dit_modiff, dit_vq, dit_w2a4, sample as sample_config  # noqa: E402
from diffq import plan as plan_lib  # noqa: E402
from diffq.eval import flops  # noqa: E402
from diffq.jobs import sample  # noqa: E402
from diffq.models import dit, vae  # noqa: E402
from diffq.seam import rules, spec as spec_lib  # noqa: E402
from experiments import report  # noqa: E402

MB = 2 ** 20
CALIB_IMAGES = 8
LORA_RANK = 32


def method_plans(cfg: dit.DiTConfig):
  """(name, model config, spec table, plan, cfg scale) of every method's XL/2 sampler, from its `:xl2` config."""
  fp, w2a4, modiff = sample_config.get_config("xl2"), dit_w2a4.get_config("xl2"), dit_modiff.get_config("xl2")
  vq, icc, flexi = dit_vq.get_config("xl2,pv"), dit_icc.get_config("xl2"), dit_flexi.get_config("xl2")
  quant = lambda c: rules.quant_table(c.quant, len(sample.make_plan(c.sample).steps))
  icc_table = spec_lib.with_parts((), dit.layer_paths(cfg), rules.icc_rules(dict(icc.icc.ranks), icc.icc.svd),
                                  "cache")
  flexi_cfg = dit.DiTConfig(**{**cfg.__dict__, "patch_sizes": (flexi.weak_patch,)})
  bits = lambda c: f"W{c.quant.w_bits}A{c.quant.a_bits}"
  rows = [("FP (sample.py:xl2)", cfg, (), fp),
          (f"MPQ-DM {bits(w2a4)} + rotated MoDiff", cfg, quant(w2a4), w2a4.sample),
          (f"MoDiff {bits(modiff)} dynamic", cfg, quant(modiff), modiff.sample),
          (f"VQ {bits(vq)} (AQLM {vq.quant.vq.num_codebooks}x8, g8)", cfg, quant(vq), vq.sample),
          (f"ICC r{icc.icc.ranks.qkv}, {icc.sample.cache_pattern}", cfg, icc_table, icc.sample),
          (f"FlexiDiT {{2, {flexi.weak_patch}}}, {flexi.t_weak} weak", flexi_cfg, (), flexi)]
  return [(name, c, table, sample.make_plan(s), s.cfg_scale) for name, c, table, s in rows]


@functools.lru_cache(maxsize=None)
def param_shapes(cfg: dit.DiTConfig) -> dict:
  return flax.traverse_util.flatten_dict(dit.variable_shapes(cfg)["params"], sep="/")


def weight_bytes(cfg: dit.DiTConfig, table) -> float:
  """Stored bytes of every kernel at its spec's nominal bits (float 32), plus the float label table and biases."""
  total = 0.0
  for key, s in param_shapes(cfg).items():
    n = math.prod(s.shape)
    if not key.endswith("/kernel"):
      total += 4 * n
      continue
    w = spec_lib.resolve(key[:-len("/kernel")], table).weight
    bits = getattr(w, "bits", None)
    if hasattr(w, "num_codebooks"):
      bits = w.num_codebooks * w.codebook_bits / w.group_size
    total += n * (bits if bits else 32) / 8
  return total


def state_bytes(cfg, table, step_plan, cfg_scale) -> int:
  variables = dit.variable_shapes(cfg, table)
  rows = 2 if cfg_scale != 1.0 else 1
  states = jax.eval_shape(lambda v: dit.init_states(dit.DiT(config=cfg, specs=tuple(table)), v, rows, step_plan),
                          variables)
  return int(sum(math.prod(s.shape) * s.dtype.itemsize for s in jax.tree.leaves(states)))


def activation_bytes(cfg: dit.DiTConfig, rows: int) -> int:
  t, d, h = cfg.num_tokens, cfg.hidden_size, cfg.num_heads
  return 4 * rows * (t * (d + 3 * d + int(cfg.mlp_ratio * d) + d) + h * t * t)


def vae_decode_bytes(vcfg: vae.VAEConfig, latent: int) -> int:
  """The last upsampler's input and output (block_out_channels[1] each) and the first full-resolution ResNet's
  output (block_out_channels[0]) are live at once at full resolution; + the mid-block attention matrix."""
  hw = (latent * vcfg.downsample_factor) ** 2
  c = vcfg.block_out_channels
  return 4 * ((2 * c[min(1, len(c) - 1)] + c[0]) * hw + latent ** 4)


def calibration_bytes(cfg: dit.DiTConfig, table, steps: int) -> int:
  traj = 4 * CALIB_IMAGES * (steps + 1) * cfg.input_size ** 2 * cfg.in_channels
  stats = 0
  kernels = {k[:-len("/kernel")]: v.shape for k, v in param_shapes(cfg).items() if k.endswith("/kernel")}
  for path, (n_in, _) in kernels.items():
    s = spec_lib.resolve(path, table)
    names = set(s.input.stats) | set(s.weight.stats) | set(s.cache.stats)
    stats += 4 * (n_in * n_in * ("in_xtx" in names) + 3 * n_in * steps * bool(names - {"in_xtx"}))
  return traj + stats


def distill_bytes(cfg: dit.DiTConfig) -> tuple[int, int]:
  """(per image: activations kept for one call's backward, 2 rows; per device: trainable leaves x 4 copies)."""
  t, d, h = cfg.num_tokens, cfg.hidden_size, cfg.num_heads
  per_image = 4 * 2 * cfg.depth * (14 * t * d + h * t * t)
  lora = cfg.depth * LORA_RANK * (d + 3 * d + d + d + d + 4 * d + 4 * d + d + 6 * d + d)
  return per_image, 4 * 4 * lora


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--hbm_gib", type=float, default=16.0)
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--out", default="xl2_sizing.md")
  args = ap.parse_args()
  vcfg = vae.VAEConfig()
  vae_params = sum(math.prod(s.shape) for s in jax.tree.leaves(vae.variable_shapes(vcfg)))
  hbm = args.hbm_gib * 2 ** 30
  cmd = " ".join(["python experiments/xl2_sizing.py", *sys.argv[1:]])
  lines = [f"# DiT-XL/2 sizing from the code (`{cmd}`)", "",
           f"SD-VAE: {vae_params / 1e6:.2f} M params ({4 * vae_params / MB:.0f} MB float32). Devices: data "
           f"parallel, params replicated, a sampler batch of {args.batch} images at {args.hbm_gib:g} GiB HBM.",
           ""]
  for res in (256, 512):
    cfg = dit.preset("DiT-XL/2", input_size=res // 8)
    n_params = sum(math.prod(s.shape) for s in param_shapes(cfg).values())
    act = activation_bytes(cfg, 2)
    dec = vae_decode_bytes(vcfg, cfg.input_size)
    d_img, d_dev = distill_bytes(cfg)
    lines += [f"## {res}x{res} ({cfg.num_tokens} tokens, {n_params / 1e6:.1f} M params)", "",
              f"Per image, analytic: peak activations of one CFG call {act / MB:.1f} MB; SD-VAE decode "
              f"{dec / MB:.1f} MB; distillation backward {d_img / MB:.0f} MB (+ {d_dev / MB:.0f} MB per device of "
              "LoRA weights, grads and Adam moments).", "",
              "| method | weight MB | GMACs / call | GMACs / image | state MB / image | calibration MB / device | "
              "sampler devices |", "|---|---|---|---|---|---|---|"]
    for name, mcfg, table, step_plan, scale in method_plans(cfg):
      w = weight_bytes(mcfg, table)
      state = state_bytes(mcfg, table, step_plan, scale)
      per_image = act + state + dec
      fixed = w + 4 * vae_params
      devices = math.ceil(args.batch * per_image / (hbm - fixed)) if hbm > fixed else float("inf")
      lines.append(f"| {name} | {w / MB:.0f} | {flops.macs_per_call(mcfg) / 1e9:.1f} | "
                   f"{flops.macs_per_image(mcfg, step_plan, scale, table) / 1e9:.0f} | {state / MB:.1f} | "
                   f"{calibration_bytes(mcfg, table, len(step_plan.step_kinds)) / MB:.0f} | {devices} |")
    lines.append("")
  report.write_markdown(args.out, lines)
  print("\n".join(lines))


if __name__ == "__main__":
  main()
