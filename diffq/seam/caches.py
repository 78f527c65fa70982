"""Output-cache parts: what a layer does on the steps of a plan whose kind reads a cache (`plan.StepKind.cache`).

- `NoCache`: the layer computes in full on every step.
- `ICC` (increment-calibrated caching, Chen et al. CVPR 2025, eq. of research/icc.md §3.2): on a refresh step the
  layer runs in full and stores its output y_c (bias included) and its projected input x_c B in the sampler state
  (collection `cache`, one row per network row); on a read step it returns

      y = y_c + ((x - x_c) B) A = y_c + (x B - x_c B) A,     B (in, r), A (r, out),   B A ~ the layer's weight,

  factorised separately for each of `splits` equal output chunks (q, k, v of a fused qkv; x B is one GEMM
  against the chunks' B side by side). Storing x_c B (splits r wide) rather than x_c (in wide) is the same
  increment with less state to carry and read. Rank 0 is naive caching (y = y_c, FORA-style reuse).
  `state_dtype` 'bfloat16' stores y_c and x_c B in bfloat16 (half the state bytes; read back as float32). The factors `icc_b` (splits, in, r) and `icc_a`
  (splits, r, out/splits) come from a truncated SVD of the weight, plain or channel-aware (`svd`: 'ca' weights
  output/input channels by their mean magnitudes, 'cd' by the magnitudes of their increments between adjacent
  steps; diffq/cache/icc.py).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from diffq.cache import icc
from diffq.seam.variables import Variable

SVDS = ("plain", "ca", "cd")
STATE_DTYPES = ("float32", "bfloat16")
STATE = "cache"  # the variable collection the sampler carries from step to step


@dataclasses.dataclass(frozen=True)
class NoCache:
  type: ClassVar[str] = "none"
  trainable: ClassVar[dict] = {}
  stats: ClassVar[tuple] = ()

  def variables(self, n_in: int, n_out: int) -> dict[str, Variable]:
    return {}

  def reads(self, kind) -> bool:
    return False

  def write(self, layer, x, y, kind, q: dict) -> None:
    pass

  def deployed(self):
    return self


@dataclasses.dataclass(frozen=True)
class ICC:
  type: ClassVar[str] = "icc"
  trainable: ClassVar[dict] = {}
  rank: int = 0
  splits: int = 1
  svd: str = "plain"
  state_dtype: str = "float32"

  def __post_init__(self):
    if self.rank < 0 or self.splits < 1:
      raise ValueError(f"ICC needs rank >= 0 and splits >= 1; got rank={self.rank}, splits={self.splits}.")
    if self.svd not in SVDS:
      raise ValueError(f"Unknown ICC factorisation {self.svd!r}; choose one of {SVDS}.")
    if self.state_dtype not in STATE_DTYPES:
      raise ValueError(f"Unknown ICC state_dtype {self.state_dtype!r}; choose one of {STATE_DTYPES}.")

  @property
  def stats(self) -> tuple[str, ...]:
    if not self.rank or self.svd == "plain":
      return ()
    return ("in_absmean", "out_absmean") if self.svd == "ca" else ("in_delta_absmean", "out_delta_absmean")

  def variables(self, n_in: int, n_out: int) -> dict[str, Variable]:
    if n_out % self.splits:
      raise ValueError(f"ICC splits={self.splits} does not divide the layer's {n_out} outputs.")
    if not self.rank:
      return {}
    return {"icc_b": Variable((self.splits, n_in, self.rank)),
            "icc_a": Variable((self.splits, self.rank, n_out // self.splits))}

  def reads(self, kind) -> bool:
    return kind.cache == "read"

  def write(self, layer, x, y, kind, q: dict) -> None:
    """On refresh steps of a call whose state is mutable (the sampler's), stores y_c and x_c B (rank > 0)."""
    if kind.cache != "refresh" or not layer.is_mutable_collection(STATE):
      return
    layer.variable(STATE, "y", jnp.zeros, y.shape, self.state_dtype).value = y.astype(self.state_dtype)
    if self.rank:
      xb = self._project(x, q["icc_b"])
      layer.variable(STATE, "xb", jnp.zeros, xb.shape, self.state_dtype).value = xb.astype(self.state_dtype)

  def read(self, layer, x, q: dict):
    """y_c + (x B - x_c B) A for the layer's current input x (..., in)."""
    if not layer.has_variable(STATE, "y"):
      raise ValueError(f"Layer {'/'.join(layer.scope.path)} reads its cache on a cached step, but the call has no "
                       "cache state: run cached plans through diffq.sampler.sample with dit.init_state.")
    y = layer.get_variable(STATE, "y").astype(x.dtype)
    if not self.rank:
      return y
    d = self._project(x, q["icc_b"]) - layer.get_variable(STATE, "xb").astype(x.dtype)
    a = q["icc_a"].astype(d.dtype)
    # plain 2-D dots per chunk: a batched einsum over chunks makes XLA emit the output transposed, and the
    # consumers (GELU, the qkv split) then read it strided, which costs more than the low-rank matmuls
    return y + jnp.concatenate([d[..., s, :] @ a[s] for s in range(self.splits)], axis=-1)

  @staticmethod
  def _project(x, b):
    """x (..., in) @ B (splits, in, r) -> (..., splits, r), one GEMM against the chunks' B side by side."""
    splits, n_in, r = b.shape
    b = jnp.transpose(b, (1, 0, 2)).reshape(n_in, splits * r).astype(x.dtype)
    return (x @ b).reshape(*x.shape[:-1], splits, r)

  def calibrate(self, layer) -> dict:
    return icc.factors(layer.matrix(), layer.stats, self.rank, self.splits, self.svd)

  def deployed(self):
    return self


def reuse() -> ICC:
  """Naive caching: the cached output as is (ICC at rank 0)."""
  return ICC(rank=0)


TYPES = {"none": NoCache, "icc": ICC}
