"""Analytic compute accounting for DiT: MACs per layer, per network call, per image for a step plan; BitOPs.

MACs count multiply-accumulates of matmuls only (every seam Linear plus the two attention products per block);
norms, activations and softmax are ignored, as in the DiT paper's Gflops. BitOPs = MACs x w_bits x a_bits.

Each step of a plan is counted by its kind under the layers' specs: on a step whose kind reads caches, an ICC
layer costs its low-rank increment, tokens x rank x (splits x in + out); a rank-0 (reuse) layer costs nothing,
and neither does the work only it consumed (a reused attn/proj makes its block's qkv and attention products
dead, a reused mlp/fc2 its fc1; the compiled sampler drops them too). On a refresh (full) step an ICC layer of
rank r > 0 also projects its input for the cache, tokens x rank x splits x in. A chained MLP (ICC through the
GELU) costs tokens x (r1 x in + r1 x r2 + r2 x out) on a cached step, and its refresh step computes
M_t = A1 diag(g) B2 (tokens x r1 x hidden x r2) instead of fc2's input projection.
"""
from __future__ import annotations

import flax

from diffq.models import dit, flexi
from diffq.models.dit import DiTConfig
from diffq.quant import rotation
from diffq.plan import FULL, StepKind, StepPlan
from diffq.seam import caches, spec as spec_lib

ATTENTION_PRODUCTS = ("attn/qk", "attn/av")
LORA_LAYERS = ("attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2")  # the block linears with FlexiDiT adapters
FEEDS = {"attn/proj": ("attn/qkv", "attn/qk", "attn/av"), "mlp/fc2": ("mlp/fc1",)}  # inputs only they consume


def dit_layer_macs(cfg: DiTConfig, patch_size: int = 0) -> dict[str, int]:
  """MACs of one forward pass for one image at `patch_size` (0: the model's own), keyed by layer path (seam
  Linears + 'blocks_i/attn/qk|av'); a FlexiDiT call at a further size runs that size's boundary layers (and
  LoRAs)."""
  t, d, p = cfg.tokens(patch_size), cfg.hidden_size, cfg.patch(patch_size)
  h = int(d * cfg.mlp_ratio)
  embed, deembed = flexi.boundary_paths(cfg, p)
  macs = {embed: t * p * p * cfg.in_channels * d, "t_embedder/mlp_0": 256 * d, "t_embedder/mlp_2": d * d}
  for i in range(cfg.depth):
    b = f"blocks_{i}/"
    macs.update({b + "adaLN_modulation": d * 6 * d, b + "attn/qkv": t * d * 3 * d, b + "attn/qk": t * t * d,
                 b + "attn/av": t * t * d, b + "attn/proj": t * d * d, b + "mlp/fc1": t * d * h,
                 b + "mlp/fc2": t * h * d})
  macs.update({"final_layer/adaLN_modulation": d * 2 * d, deembed: t * d * p * p * cfg.out_channels})
  rank = dict(cfg.adapters).get(p, 0)  # FlexiDiT's LoRA variant, unmerged: t (in + out) r more per linear
  for path in (f"blocks_{i}/{name}" for i in range(cfg.depth) for name in LORA_LAYERS) if rank else ():
    macs[path] += t * rank * sum(_layer_shape(cfg, path))
  return macs


def step_layer_macs(cfg: DiTConfig, kind: StepKind = FULL, table: spec_lib.SpecTable = ()) -> dict[str, int]:
  """`dit_layer_macs` of one network call of step kind `kind` under the spec table `table`."""
  macs = dit_layer_macs(cfg, kind.patch_size)
  out = dict(macs)
  for path in macs:
    part = spec_lib.resolve(path, table).cache
    if not isinstance(part, caches.ICC):
      continue
    n_in, n_out = _layer_shape(cfg, path)
    t, r = cfg.tokens(kind.patch_size), part.rank
    if part.chain == "last":  # r1 = the chain's fc1 rank; fc2's in = the hidden width
      r1 = spec_lib.resolve(path[:-len("fc2")] + "fc1", table).cache.rank
      out[path] = macs[path] + t * r1 * n_in * r if kind.cache != "read" else t * r * (r1 + n_out)
    elif kind.cache != "read":
      out[path] += t * r * part.splits * n_in
    elif part.chain == "first":
      out[path] = t * r * n_in
    else:
      out[path] = t * r * (part.splits * n_in + n_out)
      if not part.rank:
        block, name = path.rsplit("/", 2)[0], "/".join(path.rsplit("/", 2)[1:])
        out.update({f"{block}/{dead}": 0 for dead in FEEDS.get(name, ())})
  return out


def _layer_shape(cfg: DiTConfig, path: str) -> tuple[int, int]:
  d, h = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
  shapes = {"attn/qkv": (d, 3 * d), "attn/proj": (d, d), "mlp/fc1": (d, h), "mlp/fc2": (h, d)}
  name = "/".join(path.rsplit("/", 2)[1:])
  if name not in shapes:
    raise ValueError(f"No cached-step cost model for layer {path}: ICC caches the block linears "
                     f"{sorted(shapes)}.")
  return shapes[name]


def macs_per_call(cfg: DiTConfig, kind: StepKind = FULL, table: spec_lib.SpecTable = ()) -> int:
  return sum(step_layer_macs(cfg, kind, table).values())


def guidance_calls(kind: StepKind, cfg_scale: float) -> tuple[StepKind, ...]:
  """The network calls (each of one row per image) of a step of `kind`: one without guidance, two under it (a
  'weak_guide' step's second at its guide patch size)."""
  if cfg_scale == 1.0:
    return (kind,)
  if kind.cfg == "weak_guide":
    return kind, kind.guide_call()
  return kind, kind


def macs_per_image(cfg: DiTConfig, plan: StepPlan, cfg_scale: float = 1.0, table: spec_lib.SpecTable = ()) -> int:
  """Network MACs to draw one image under `plan`, each step counted by its kind under `table` (`guidance_calls`:
  guidance doubles the batch, FlexiDiT's weak guidance adds one call at the weak size)."""
  calls = [c for k in plan.step_kinds for c in guidance_calls(k, cfg_scale)]
  per_kind = {k: macs_per_call(cfg, k, table) for k in set(calls)}
  return sum(per_kind[k] for k in calls)


ROTATION_ADD_BITOPS = 32  # one float32 addition of a rotation's fast Walsh-Hadamard transform


def bitops_per_image(cfg: DiTConfig, plan: StepPlan, cfg_scale: float, table: spec_lib.SpecTable,
                     quant: dict | None = None, by_part: bool = False):
  """BitOPs to draw one image: every step's MACs (by its kind) x weight bits x that step's activation bits, per
  layer. Weight bits are the weight part's stored bits per weight (per-channel OMQ bits from `quant`, else its
  nominal bits; float = 32); activation bits come from the input part per step (MoDiff: the warm-up on the first
  step of each plan segment, the difference's bits after). Attention products run in float (32 x 32). A rotated
  layer that computes adds its input's fast Walsh-Hadamard transform, rotation.adds_per_token float additions
  per token at ROTATION_ADD_BITOPS each. `by_part`: {'linear', 'attention', 'rotation'} instead of the total."""
  shapes = {k[:-len("/kernel")]: v.shape for k, v in flax.traverse_util.flatten_dict(
      dit.variable_shapes(cfg)["params"], sep="/").items() if k.endswith("/kernel")}
  flat_quant = flax.traverse_util.flatten_dict(quant or {}, sep="/")
  firsts = {start for start, _ in plan.segments}
  specs = {path: spec_lib.resolve(path, table) for path in shapes}
  w_bits, rotation_bitops = {}, {}  # per layer: stored bits per weight; one input row's FWHT BitOPs (rotated)
  for path, (n_in, n_out) in shapes.items():
    spec = specs[path]
    q = {k[len(path) + 1:]: v for k, v in flat_quant.items() if k.rsplit("/", 1)[0] == path}
    if getattr(spec.weight, "mixed", False) and "w_bits" not in q:
      raise ValueError(f"Layer {path} has per-channel (OMQ) weight bits: pass its quant collection to count BitOPs.")
    w_bits[path] = spec.weight.stored_bits(q, n_in, n_out) / (n_in * n_out)
    if spec.rotate:
      rotation_bitops[path] = rotation.adds_per_token(n_in) * ROTATION_ADD_BITOPS
  full = {p: dit_layer_macs(cfg, p) for p in {k.patch_size for k in plan.step_kinds}
          | {k.guide_patch_size for k in plan.step_kinds if k.cfg == "weak_guide"}}
  parts = dict(linear=0.0, attention=0.0, rotation=0.0)
  for i, step_kind in enumerate(plan.step_kinds):
    for kind in guidance_calls(step_kind, cfg_scale):
      for path, m in step_layer_macs(cfg, kind, table).items():
        if path.endswith(ATTENTION_PRODUCTS):
          parts["attention"] += m * 32 * 32
          continue
        spec = specs[path]
        parts["linear"] += m * w_bits[path] * spec.input.step_bits(i in firsts, i)
        if path in rotation_bitops and m and not spec.cache.reads(kind):
          parts["rotation"] += rotation_bitops[path] * full[kind.patch_size][path] // (shapes[path][0] *
                                                                                      shapes[path][1])
  return parts if by_part else sum(parts.values())


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
