"""The evaluator classifier: a small VGG-style CNN for Fashion-MNIST, Flax Linen, NHWC.

Stem conv at 32x32, then one stage of two 3x3 conv-BatchNorm-ReLU layers per remaining width, each stage after a
2x2 max-pool (32 -> 16 -> 8 -> 4 with the default widths), global average pool, linear head. Besides the logits
it exposes the features the sample-quality metrics use, mirroring ADM's Inception evaluator: `pool` (pool_3
analogue, for FD and precision/recall) and `spatial` (the first channels of the 8x8 stage, as ADM keeps the
first 7 channels of mixed_6/conv for sFID).
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

SPATIAL_SIZE = 8


class Classifier(nn.Module):
  """(N, 32, 32, 1) in [-1, 1] -> dict(logits (N, classes), pool (N, widths[-1]),
  spatial (N, 8, 8, spatial_channels))."""
  widths: Sequence[int] = (16, 32, 64, 128)
  spatial_channels: int = 16
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)

    def conv_bn_relu(h, width):
      return nn.relu(norm()(nn.Conv(width, (3, 3), use_bias=False)(h)))

    h = conv_bn_relu(x, self.widths[0])
    spatial = None
    for width in self.widths[1:]:
      h = nn.max_pool(h, (2, 2), strides=(2, 2))
      h = conv_bn_relu(conv_bn_relu(h, width), width)
      if h.shape[1] == SPATIAL_SIZE:
        spatial = h[..., :self.spatial_channels]
    if spatial is None:
      raise ValueError(f"widths {tuple(self.widths)} never reach an {SPATIAL_SIZE}x{SPATIAL_SIZE} stage from a "
                       f"{x.shape[1]}x{x.shape[2]} input; a 32x32 input needs at least 3 widths.")
    pool = jnp.mean(h, axis=(1, 2))
    return dict(logits=nn.Dense(self.num_classes)(pool), pool=pool, spatial=spatial)
