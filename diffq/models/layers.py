"""The one seam every DiT matmul goes through.

`Linear` is a dense layer whose behaviour is chosen by a static `LayerPolicy`.
Policies are resolved from the layer's path (e.g. ``blocks_3/attn/qkv``) by
`resolve_policy`, so quantization and caching can change any layer by config
without touching the DiT code. This module only knows the float policy; later
methods register their own kinds.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

KINDS = ("float",)


@dataclasses.dataclass(frozen=True)
class LayerPolicy:
  """Static per-layer behaviour. `kind` selects the matmul implementation."""
  kind: str = "float"

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Unknown layer policy kind {self.kind!r}; expected one of {KINDS}.")


FLOAT = LayerPolicy()

# A policy table: ((glob pattern over layer path, LayerPolicy), ...); first match wins.
PolicyTable = Sequence[tuple[str, LayerPolicy]]


def resolve_policy(path: str, table: PolicyTable) -> LayerPolicy:
  for pattern, policy in table:
    if fnmatch.fnmatchcase(path, pattern):
      return policy
  return FLOAT


def check_policy_table(table: PolicyTable, layer_paths: Sequence[str]) -> None:
  """Raises if a pattern matches no layer (a typo would silently do nothing)."""
  for pattern, _ in table:
    if not any(fnmatch.fnmatchcase(p, pattern) for p in layer_paths):
      raise ValueError(
          f"Layer pattern {pattern!r} matches no layer of the model. Known layers look like: "
          f"{', '.join(list(layer_paths)[:6])}, ... Fix the pattern in the config.")


class Linear(nn.Module):
  """y = x @ kernel + bias, kernel (in, out); behaviour set by `policy`."""
  features: int
  policy: LayerPolicy = FLOAT
  use_bias: bool = True
  kernel_init: nn.initializers.Initializer = nn.initializers.xavier_uniform()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    y = jnp.dot(x, kernel.astype(x.dtype))
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(x.dtype)
    return y
