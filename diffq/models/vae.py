"""The latent autoencoder of Stable Diffusion (diffusers `AutoencoderKL`, the SD-VAE DiT samples in), Flax, NHWC.

    encode(config, params, x)  x (N, H, W, 3) in [-1, 1] -> z (N, H/f, W/f, latent_channels), the posterior mean
    decode(config, params, z)  z (N, H/f, W/f, latent_channels) -> x (N, H, W, 3), f = 2 ** (levels - 1)

Both take unscaled latents, as diffusers' `encode(x).latent_dist.mean` / `decode(z)` do: a DiT trained on SD-VAE
latents sees z * scaling_factor (0.18215), so `decode(config, params, z_dit / config.scaling_factor)`.
Module names mirror diffusers' (`down_blocks_0/resnets_1/conv1` for `down_blocks.0.resnets.1.conv1`), so the
converter (diffq/io/diffusers_vae.py) is a rename plus layout transposes. Architecture (diffusers
`models/autoencoders/vae.py`, `resnet.py`, `attention_processor.py`): ResNet blocks GroupNorm-SiLU-conv3x3 twice
with a 1x1 shortcut where channels change; downsampling a stride-2 3x3 conv after zero padding right and bottom;
upsampling nearest 2x then a 3x3 conv; a mid block resnet-attention-resnet with one-head self-attention over all
pixels behind a GroupNorm; GroupNorm eps 1e-6 throughout.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Static architecture of an AutoencoderKL (hashable); defaults are SD-VAE's (sd-vae-ft-ema / -mse)."""
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(f"block_out_channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}.")

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)


def _conv(features: int, name: str, kernel: int = 3, stride: int = 1, padding=None) -> nn.Conv:
  pad = ((kernel // 2,) * 2,) * 2 if padding is None else padding
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=pad, name=name)


def _norm(groups: int, name: str) -> nn.GroupNorm:
  # Two-pass variance: torch's GroupNorm is not E[x^2] - E[x]^2, which loses digits on large activations.
  return nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False, name=name)


class ResnetBlock(nn.Module):
  """x + conv(silu(norm(conv(silu(norm(x)))))), the shortcut a 1x1 conv where the channel count changes."""
  features: int
  groups: int

  @nn.compact
  def __call__(self, x):
    h = _conv(self.features, "conv1")(nn.silu(_norm(self.groups, "norm1")(x)))
    h = _conv(self.features, "conv2")(nn.silu(_norm(self.groups, "norm2")(h)))
    if x.shape[-1] != self.features:
      x = _conv(self.features, "conv_shortcut", kernel=1)(x)
    return x + h


class Attention(nn.Module):
  """x + out(softmax(q k^T / sqrt(C)) v) over the H*W pixels, q, k, v linear maps of GroupNorm(x); one head."""
  groups: int

  @nn.compact
  def __call__(self, x):
    n, h, w, c = x.shape
    t = _norm(self.groups, "group_norm")(x).reshape(n, h * w, c)
    q, k, v = (nn.Dense(c, name=f"to_{s}")(t) for s in "qkv")
    a = jax.nn.softmax(jnp.einsum("nqc,nkc->nqk", q, k) / jnp.sqrt(c).astype(q.dtype), axis=-1)
    return x + nn.Dense(c, name="to_out_0")(jnp.einsum("nqk,nkc->nqc", a, v)).reshape(n, h, w, c)


class Downsample(nn.Module):
  """Zero-pad right and bottom by one, then a stride-2 3x3 conv (diffusers Downsample2D, padding=0)."""
  features: int

  @nn.compact
  def __call__(self, x):
    return _conv(self.features, "conv", stride=2, padding=((0, 1), (0, 1)))(x)


class Upsample(nn.Module):
  """Nearest-neighbour 2x, then a 3x3 conv (diffusers Upsample2D)."""
  features: int

  @nn.compact
  def __call__(self, x):
    return _conv(self.features, "conv")(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Level(nn.Module):
  """One resolution of the encoder (DownEncoderBlock2D) or decoder (UpDecoderBlock2D): ResNet blocks, then the
  change of resolution (`resample`: "down", "up" or "")."""
  features: int
  groups: int
  num_layers: int
  resample: str

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = ResnetBlock(self.features, self.groups, name=f"resnets_{j}")(x)
    if self.resample == "down":
      x = Downsample(self.features, name="downsamplers_0")(x)
    elif self.resample == "up":
      x = Upsample(self.features, name="upsamplers_0")(x)
    return x


class MidBlock(nn.Module):
  groups: int
  attention: bool

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = ResnetBlock(c, self.groups, name="resnets_0")(x)
    if self.attention:
      x = Attention(self.groups, name="attentions_0")(x)
    return ResnetBlock(c, self.groups, name="resnets_1")(x)


class Encoder(nn.Module):
  """(N, H, W, in) -> (N, H/f, W/f, 2 * latent): mean and log-variance of the diagonal Gaussian posterior."""
  config: VAEConfig

  @nn.compact
  def __call__(self, x):
    cfg, g = self.config, self.config.norm_num_groups
    x = _conv(cfg.block_out_channels[0], "conv_in")(x)
    last = len(cfg.block_out_channels) - 1
    for i, ch in enumerate(cfg.block_out_channels):
      x = Level(ch, g, cfg.layers_per_block, "down" if i < last else "", name=f"down_blocks_{i}")(x)
    x = MidBlock(g, cfg.mid_block_add_attention, name="mid_block")(x)
    return _conv(2 * cfg.latent_channels, "conv_out")(nn.silu(_norm(g, "conv_norm_out")(x)))


class Decoder(nn.Module):
  """(N, h, w, latent) -> (N, h*f, w*f, out)."""
  config: VAEConfig

  @nn.compact
  def __call__(self, z):
    cfg, g = self.config, self.config.norm_num_groups
    chans = cfg.block_out_channels[::-1]
    x = _conv(chans[0], "conv_in")(z)
    x = MidBlock(g, cfg.mid_block_add_attention, name="mid_block")(x)
    for i, ch in enumerate(chans):
      x = Level(ch, g, cfg.layers_per_block + 1, "up" if i < len(chans) - 1 else "", name=f"up_blocks_{i}")(x)
    return _conv(cfg.out_channels, "conv_out")(nn.silu(_norm(g, "conv_norm_out")(x)))


class AutoencoderKL(nn.Module):
  """Holds the parameter tree: encoder, decoder and the 1x1 (post_)quant_conv between them."""
  config: VAEConfig

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    if cfg.use_quant_conv:
      self.quant_conv = _conv(2 * cfg.latent_channels, "quant_conv", kernel=1)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = _conv(cfg.latent_channels, "post_quant_conv", kernel=1)

  def encode(self, x):
    moments = self.encoder(x)
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    return moments[..., :self.config.latent_channels]  # the posterior mean (log-variance is the rest)

  def decode(self, z):
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x):
    return self.decode(self.encode(x))


def encode(config: VAEConfig, params, x: jax.Array) -> jax.Array:
  """Images (N, H, W, C) in [-1, 1] -> unscaled posterior-mean latents (N, H/f, W/f, latent_channels)."""
  return AutoencoderKL(config).apply({"params": params}, x, method=AutoencoderKL.encode)


def decode(config: VAEConfig, params, z: jax.Array) -> jax.Array:
  """Unscaled latents (N, h, w, latent_channels) -> images (N, h*f, w*f, C), nominally in [-1, 1]."""
  return AutoencoderKL(config).apply({"params": params}, z, method=AutoencoderKL.decode)


def init_params(config: VAEConfig, rng: jax.Array) -> dict:
  """Random params (flax's default initialisers), for pipeline checks without a checkpoint."""
  f = config.downsample_factor
  return AutoencoderKL(config).init(rng, jnp.zeros((1, f, f, config.in_channels)))["params"]


def variable_shapes(config: VAEConfig) -> dict:
  """The parameter tree's shapes (jax.ShapeDtypeStruct leaves), without computing it."""
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
