"""What a seam part declares about each of its variables (created by `Linear` in the part's collection)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Variable:
  """shape/dtype; filled with `fill`, or drawn by `init` (a flax initializer, fed the 'params' rng)."""
  shape: tuple[int, ...]
  dtype: Any = jnp.float32
  fill: float = 0.0
  init: Callable | None = None
  collection: str = "quant"
