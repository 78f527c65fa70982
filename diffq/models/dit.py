"""Diffusion Transformer (Peebles & Xie 2023), Flax Linen, NHWC.

Architecturally identical to facebookresearch/DiT `models.py`: stride-p patch
embedding, fixed 2-D sin-cos positions, sinusoidal timestep embedder + MLP,
label embedder with a null class (index `num_classes`) and label dropout,
adaLN-Zero blocks (6 modulation vectors), fused-qkv attention, 4x GELU(tanh)
MLP, adaLN final layer, learned sigma (2C outputs).

Every matmul (including the patch embedding, written as the equivalent matmul
over flattened (p, q, c) patches) is a `layers.Linear`, whose parts come from
the static spec table (diffq/seam/spec.py) resolved against the layer path.
"""
from __future__ import annotations

import dataclasses
from typing import Callable
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffq import plan
from diffq.models import flexi, layers
from diffq.seam import caches, inputs, spec as spec_lib


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """Static architecture description (hashable)."""
  input_size: int = 32
  patch_size: int = 2
  in_channels: int = 4
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  class_dropout_prob: float = 0.1
  learn_sigma: bool = True
  # Timestep-embedding frequency shift: 0 = original DiT, 1 = diffusers' Timesteps(downscale_freq_shift=1).
  freq_shift: int = 0
  # Eps of the pre-MLP LayerNorm: 1e-6 in original DiT, 1e-5 (norm_eps) in diffusers.
  mlp_norm_eps: float = 1e-6
  # FlexiDiT: further patch sizes the same blocks run at (diffq/models/flexi.py), e.g. (8,) for a patch-4 model;
  # () = a plain DiT.
  patch_sizes: tuple[int, ...] = ()
  # FlexiDiT boundary layers: True = every size's embedding / de-embedding is a resize of the largest size's (the
  # paper's shared variant, flexi.tie); False = each size has its own (the LoRA variant's new layers).
  flexi_tied: bool = True
  # FlexiDiT's LoRA variant: rank of a LoRA on every block's qkv, proj, fc1 and fc2, active only at the further
  # patch sizes (the model's own forward is the plain one, bit for bit); 0 = none (the shared variant).
  flexi_lora_rank: int = 0

  def __post_init__(self):
    object.__setattr__(self, "patch_sizes", tuple(int(p) for p in self.patch_sizes))
    for p in self.patch_sizes_all:
      if p < 1 or self.input_size % p:
        raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {p}.")
    if len(set(self.patch_sizes_all)) != len(self.patch_sizes_all):
      raise ValueError(f"patch_sizes {self.patch_sizes} must be distinct and differ from patch_size "
                       f"{self.patch_size}.")
    if self.flexi_lora_rank and not self.patch_sizes:
      raise ValueError(f"flexi_lora_rank={self.flexi_lora_rank} adds LoRAs for the further patch sizes; set "
                       "patch_sizes too (e.g. (8,)) or flexi_lora_rank=0.")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}.")
    if self.hidden_size % 4:
      raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of 4 for 2-D sin-cos positions.")

  @property
  def out_channels(self) -> int:
    return self.in_channels * 2 if self.learn_sigma else self.in_channels

  def record(self) -> dict:
    """The fields as a dict, without the FlexiDiT fields a model does not use (stage records from before them
    match)."""
    d = dataclasses.asdict(self)
    if not self.patch_sizes:
      del d["patch_sizes"], d["flexi_tied"], d["flexi_lora_rank"]
    elif not self.flexi_lora_rank:
      del d["flexi_lora_rank"]
    return d

  @property
  def patch_sizes_all(self) -> tuple[int, ...]:
    """The model's own patch size, then the further (FlexiDiT) ones."""
    return (self.patch_size, *self.patch_sizes)

  def patch(self, p: int = 0) -> int:
    """The patch size a call at step-kind patch size `p` runs at (0: the model's own); raises if unsupported."""
    if p and p not in self.patch_sizes_all:
      raise ValueError(f"This DiT runs at patch sizes {self.patch_sizes_all}; a plan step asks for {p}. Use a "
                       "FlexiDiT checkpoint with that size (model.patch_sizes) or drop the weak steps (t_weak=0).")
    return p or self.patch_size

  @property
  def adapters(self) -> tuple[tuple[int, int], ...]:
    """(patch size, LoRA rank) of the block linears' per-size LoRAs (`flexi_lora_rank`)."""
    return tuple((p, self.flexi_lora_rank) for p in self.patch_sizes) if self.flexi_lora_rank else ()

  @property
  def grid_size(self) -> int:
    return self.input_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    return self.grid_size ** 2

  def tokens(self, p: int = 0) -> int:
    """Token count of a call at patch size `p` (0: the model's own)."""
    return (self.input_size // self.patch(p)) ** 2


def sincos_pos_embed_2d(dim: int, grid_size: int, scale: float = 1.0) -> np.ndarray:
  """(grid_size**2, dim) fixed positions, MAE convention: first half encodes the column (w) index. `scale`:
  token i sits at coordinate i * scale (FlexiDiT's weak grids, in units of the powerful grid: scale p / p_pow,
  top-left aligned as PixArt's base_size)."""
  def one_d(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  coords = np.arange(grid_size, dtype=np.float64) * scale
  grid_w, grid_h = np.meshgrid(coords, coords)  # each (h, w); token order is row-major (h, w)
  return np.concatenate([one_d(dim // 2, grid_w), one_d(dim // 2, grid_h)], axis=1).astype(np.float32)


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10000.0, freq_shift: int = 0):
  """(N,) -> (N, dim): [cos(t w_i), sin(t w_i)], w_i = exp(-ln(max_period) i / (dim/2 - freq_shift))."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def patchify(x: jax.Array, p: int) -> jax.Array:
  """(N, H, W, C) -> (N, (H/p)(W/p), p*p*C), features ordered (p, q, c)."""
  n, h, w, c = x.shape
  x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: jax.Array, p: int, c: int) -> jax.Array:
  """(N, T, p*p*C) -> (N, H, W, C), inverse of `patchify`."""
  n, t, _ = x.shape
  g = int(math.isqrt(t))
  x = x.reshape(n, g, g, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, g * p, g * p, c)


COMPUTE_DTYPES = ("float32", "bfloat16")


def check_compute_dtype(dtype: str, flag: str) -> None:
  if dtype not in COMPUTE_DTYPES:
    raise ValueError(f"compute_dtype {dtype!r}: choose one of {COMPUTE_DTYPES}. Set {flag}.")


def _modulate(x, shift, scale):
  return x * (1 + scale[:, None]) + shift[:, None]


class _SpecScope(nn.Module):
  """Base for modules that create seam layers: `self.linear(name, ...)` resolves the layer's spec by path and
  gives the layer the module's `adapters` (FlexiDiT's per-size LoRAs; set on the attention and the MLP)."""
  specs: spec_lib.SpecTable = ()
  adapters: tuple[tuple[int, int], ...] = ()
  dtype: str = "float32"  # compute dtype: activations and matmul operands (params and accumulation stay float32)

  def linear(self, name: str, features: int, **kw) -> layers.Linear:
    path = "/".join((*self.scope.path, name))
    return layers.Linear(features, spec=spec_lib.resolve(path, self.specs), adapters=self.adapters, name=name,
                         dtype=self.dtype, **kw)

  def norm(self, eps: float, name: str) -> nn.LayerNorm:
    """Parameter-free LayerNorm; statistics in float32, output in the compute dtype."""
    return nn.LayerNorm(epsilon=eps, use_scale=False, use_bias=False, dtype=self.dtype, name=name)


class Attention(_SpecScope):
  num_heads: int = 1

  @nn.compact
  def __call__(self, x, ctx):
    n, t, d = x.shape
    h = self.num_heads
    qkv = self.linear("qkv", 3 * d)(x, ctx).reshape(n, t, 3, h, d // h)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(d // h)
    attn = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
    out = jnp.einsum("nhqk,nkhd->nqhd", attn, v, preferred_element_type=jnp.float32).astype(x.dtype).reshape(n, t, d)
    return self.linear("proj", d)(out, ctx)


class DiTBlock(_SpecScope):
  num_heads: int = 1
  mlp_ratio: float = 4.0
  mlp_norm_eps: float = 1e-6
  lora: tuple[tuple[int, int], ...] = ()  # the attention's and MLP's adapters (adaLN has none)

  @nn.compact
  def __call__(self, x, c, ctx):
    d = x.shape[-1]
    mod = self.linear("adaLN_modulation", 6 * d, kernel_init=nn.initializers.zeros)(nn.silu(c), ctx)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    norm1, norm2 = self.norm(1e-6, "norm1"), self.norm(self.mlp_norm_eps, "norm2")
    attn = Attention(num_heads=self.num_heads, specs=self.specs, adapters=self.lora, dtype=self.dtype, name="attn")
    x = x + gate_msa[:, None] * attn(_modulate(norm1(x), shift_msa, scale_msa), ctx)
    h = _modulate(norm2(x), shift_mlp, scale_mlp)
    h = MLP(hidden=int(d * self.mlp_ratio), specs=self.specs, adapters=self.lora, dtype=self.dtype,
            name="mlp")(h, ctx)
    return x + gate_mlp[:, None] * h


class MLP(_SpecScope):
  hidden: int = 0

  @nn.compact
  def __call__(self, x, ctx):
    fc1, fc2 = self.linear("fc1", self.hidden), self.linear("fc2", x.shape[-1])
    chained = caches.chained(fc1.spec.cache, fc2.spec.cache)  # ICC through the GELU (seam/caches.py)
    if chained and ctx.kind.cache == "read":
      return caches.chain_read(self, x).astype(x.dtype)
    y1 = fc1(x, ctx)
    y = fc2(_gelu(y1), ctx)
    if chained:
      caches.chain_write(self, y1, _gelu, ctx.kind, fc2.spec.cache.state_dtype)
    return y


def _gelu(x):
  return nn.gelu(x, approximate=True)


class TimestepEmbedder(_SpecScope):
  hidden_size: int = 0
  freq_dim: int = 256
  freq_shift: int = 0

  @nn.compact
  def __call__(self, t, ctx):
    init = nn.initializers.normal(0.02)
    h = timestep_embedding(t, self.freq_dim, freq_shift=self.freq_shift)
    h = nn.silu(self.linear("mlp_0", self.hidden_size, kernel_init=init)(h, ctx))
    return self.linear("mlp_2", self.hidden_size, kernel_init=init)(h, ctx)


class LabelEmbedder(nn.Module):
  """Table of num_classes + 1 rows; row `num_classes` is the null (unconditional) class."""
  num_classes: int
  hidden_size: int
  dropout_prob: float

  @nn.compact
  def __call__(self, y, train: bool = False):
    if train and self.dropout_prob > 0:
      drop = jax.random.bernoulli(self.make_rng("label_dropout"), self.dropout_prob, y.shape)
      y = jnp.where(drop, self.num_classes, y)
    table = nn.Embed(self.num_classes + 1, self.hidden_size, embedding_init=nn.initializers.normal(0.02),
                     name="embedding_table")
    return table(y)


class FinalLayer(_SpecScope):
  """adaLN final norm and linear; a FlexiDiT has one linear per patch size (`linear_p{p}` beside the model's
  own `linear`) and, for the further sizes, a per-size affine of the final norm (identity at init)."""
  channels: int = 0
  patch_sizes: tuple[int, ...] = ()  # the model's own first

  @nn.compact
  def __call__(self, x, c, ctx, p: int):
    d = x.shape[-1]
    shift, scale = jnp.split(
        self.linear("adaLN_modulation", 2 * d, kernel_init=nn.initializers.zeros)(nn.silu(c), ctx), 2, axis=-1)
    x = self.norm(1e-6, "norm_final")(x)
    if p != self.patch_sizes[0]:
      x = _PatchAffine(name=f"norm_final_p{p}")(x)
    x = _modulate(x, shift, scale)
    sizes = self.patch_sizes if self.is_initializing() else (p,)
    outs = {q: self._linear(q)(x if q == p else x[:, :1], ctx) for q in sizes}
    if self.is_initializing():
      for q in self.patch_sizes[1:]:
        _PatchAffine(name=f"norm_final_p{q}")(x[:, :1])
    return outs[p]

  def _linear(self, q):
    return self.linear("linear" + flexi.layer_suffix(q, self.patch_sizes[0]), q * q * self.channels,
                       kernel_init=nn.initializers.zeros)


class _PatchAffine(nn.Module):
  """x * g + b per channel (g = 1, b = 0 at init): FlexiDiT's patch-size-dependent norm affine."""

  @nn.compact
  def __call__(self, x):
    g = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    return (x * g + self.param("bias", nn.initializers.zeros, (x.shape[-1],))).astype(x.dtype)


class DiT(_SpecScope):
  """x (N, H, W, C) float, t (N,) original timestep indices, y (N,) int labels -> (N, H, W, out_channels).

  `ctx` is the sampling step's `plan.StepContext` (default: step 0, a full step); layers whose parts keep
  per-step state (activation quantizers calibrated per step, caches) select it by `ctx.index`, never by a counter.
  """
  config: DiTConfig = DiTConfig()

  @nn.compact
  def __call__(self, x, t, y, train: bool = False, ctx: plan.StepContext | None = None):
    cfg = self.config
    ctx = plan.StepContext() if ctx is None else ctx
    if x.shape[1:] != (cfg.input_size, cfg.input_size, cfg.in_channels):
      raise ValueError(f"DiT expects inputs of shape (N, {cfg.input_size}, {cfg.input_size}, {cfg.in_channels}) "
                       f"(NHWC); got {x.shape}. Resize/pad the data or pick a config with matching input_size.")
    p, d = cfg.patch(ctx.kind.patch_size), cfg.hidden_size
    tokens = self._embed(x, p, ctx)
    c = TimestepEmbedder(hidden_size=d, freq_shift=cfg.freq_shift, specs=self.specs, dtype=self.dtype,
                         name="t_embedder")(t, ctx)
    c = c + LabelEmbedder(cfg.num_classes, d, cfg.class_dropout_prob, name="y_embedder")(y, train).astype(c.dtype)
    for i in range(cfg.depth):
      tokens = DiTBlock(num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, mlp_norm_eps=cfg.mlp_norm_eps,
                        specs=self.specs, lora=cfg.adapters, dtype=self.dtype, name=f"blocks_{i}")(tokens, c, ctx)
    out = FinalLayer(channels=cfg.out_channels, patch_sizes=cfg.patch_sizes_all, specs=self.specs,
                     dtype=self.dtype, name="final_layer")(tokens, c, ctx, p)
    return unpatchify(out, p, cfg.out_channels).astype(jnp.float32)

  def _embed(self, x, p, ctx):
    """(N, T_p, D) tokens at patch size p: its patch embedding + positions at p / p_pow spacing; a further
    (FlexiDiT) size adds its patch-size embedding and affine. Initialisation creates every size's layers."""
    cfg, d = self.config, self.config.hidden_size
    for q in (cfg.patch_sizes_all if self.is_initializing() else (p,)):
      xq = patchify(x, q)
      h = self.linear("x_embedder" + flexi.layer_suffix(q, cfg.patch_size), d)(xq if q == p else xq[:, :1], ctx)
      if q == p:
        pos = sincos_pos_embed_2d(d, cfg.input_size // q, q / cfg.patch_size)
        tokens = h + jnp.asarray(pos, h.dtype)[None]
    if p != cfg.patch_size:
      tokens = _PatchAffine(name=f"patch_affine_p{p}")(
          tokens + self.param(f"patch_embed_p{p}", nn.initializers.zeros, (d,)).astype(tokens.dtype))
    if self.is_initializing():
      for q in (q for q in cfg.patch_sizes if q != p):
        _PatchAffine(name=f"patch_affine_p{q}")(self.param(f"patch_embed_p{q}", nn.initializers.zeros, (d,)))
    return tokens


STATE_COLLECTIONS = (caches.STATE, inputs.STATE)  # variable collections a DiT carries from one sampling step to the next


def model_fn(model: DiT) -> Callable:
  """The sampler's contract for `model`: fn(variables, state, x, t, y, ctx) -> (out, state), where `state` holds
  the model's state collections (mutable during the call) and `variables` every other collection."""
  def fn(variables, state, x, t, y, ctx):
    if not state:
      return model.apply(variables, x, t, y, ctx=ctx), state
    out, new = model.apply({**variables, **state}, x, t, y, ctx=ctx, mutable=list(state))
    return out, dict(new)
  return fn


def init_state(model: DiT, variables, rows: int, patch_size: int = 0) -> dict:
  """Zeros of the state collections `model` writes on a full step at `patch_size` (0: its own), for `rows`
  network rows (2 per image under guidance); {} for a model that keeps none. Shapes come from jax.eval_shape:
  nothing runs."""
  cfg = model.config
  x = jnp.zeros((rows, cfg.input_size, cfg.input_size, cfg.in_channels))
  t = jnp.zeros((rows,), jnp.int32)
  ctx = plan.StepContext(kind=plan.StepKind("full", patch_size=patch_size))
  _, shapes = jax.eval_shape(lambda v: model.apply(v, x, t, t, ctx=ctx, mutable=list(STATE_COLLECTIONS)),
                             variables)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), dict(shapes))


def init_states(model: DiT, variables, rows: int, step_plan: plan.StepPlan) -> dict:
  """`init_state` of the model's own patch size for a one-size plan; {patch size: init_state} for a plan with
  several (FlexiDiT's weak steps), one per segment size."""
  sizes = sorted({k.patch_size for k in step_plan.step_kinds})
  if sizes == [0]:
    return init_state(model, variables, rows)
  return {p: init_state(model, variables, rows, p) for p in sizes}


def init_params(config: DiTConfig, rng: jax.Array) -> dict:
  """Params with DiT's initialisation (xavier linears, zero biases, adaLN-Zero, N(0, .02) embedders).

  The patch embedding's xavier bound uses the flattened conv fan-in (p*p*C, D), which is what DiT does.
  """
  x = jnp.zeros((1, config.input_size, config.input_size, config.in_channels))
  params = DiT(config=config).init(rng, x, jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))["params"]
  return flexi.tie(params, config)


def variable_shapes(config: DiTConfig, specs: spec_lib.SpecTable = ()) -> dict:
  """{collection: tree of jax.ShapeDtypeStruct} of a DiT under `specs` (sampler state collections excluded),
  without allocating anything."""
  x = jnp.zeros((1, config.input_size, config.input_size, config.in_channels))
  model = DiT(config=config, specs=tuple(specs))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, jnp.zeros((1,), jnp.int32),
                                             jnp.zeros((1,), jnp.int32)))
  return {k: v for k, v in shapes.items() if k not in STATE_COLLECTIONS}


def layer_paths(config: DiTConfig) -> list[str]:
  """Paths of every seam Linear of the DiT (e.g. 'blocks_0/attn/qkv'), the names spec rules match."""
  flat = flax.traverse_util.flatten_dict(variable_shapes(config)["params"])
  return sorted({"/".join(k[:-1]) for k in flat if k[-1] == "kernel"})


PRESETS = {
    **{f"DiT-{name}/{p}": dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=p)
       for name, (depth, hidden, heads) in {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16),
                                            "XL": (28, 1152, 16)}.items() for p in (2, 4, 8)},
}


def preset(name: str, **overrides) -> DiTConfig:
  """DiT-{S,B,L,XL}/{2,4,8} (ImageNet-256 latents: 32x32x4, 1000 classes) or 'FM' (the embedded model)."""
  if name == "FM":
    kw = dict(EMBEDDED)
  elif name in PRESETS:
    kw = dict(PRESETS[name])
  else:
    raise ValueError(f"Unknown DiT preset {name!r}; choose one of {sorted(PRESETS) + ['FM']}.")
  kw.update(overrides)
  return DiTConfig(**kw)


# The embedded Fashion-MNIST model (32x32x1, 10 classes, patch 4 -> 64 tokens).
EMBEDDED = dict(input_size=32, patch_size=4, in_channels=1, hidden_size=128, depth=6, num_heads=4, num_classes=10)
