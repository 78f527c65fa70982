"""Output-cache parts: what a layer does on the steps of a plan whose kind reads a cache (`plan.StepKind.cache`).

- `NoCache`: the layer computes in full on every step.
- `ICC` (increment-calibrated caching, Chen et al. CVPR 2025, eq. of research/icc.md §3.2): on a refresh step the
  layer runs in full and stores its output y_c (bias included) and its projected input x_c B in the sampler state
  (collection `cache`, one row per network row); on a read step it returns

      y = y_c + ((x - x_c) B) A = y_c + (x B - x_c B) A,     B (in, r), A (r, out),   B A ~ the layer's weight,

  factorised separately for each of `splits` equal output chunks (q, k, v of a fused qkv; x B is one GEMM
  against the chunks' B side by side). Storing x_c B (splits r wide) rather than x_c (in wide) is the same
  increment with less state to carry and read. Rank 0 is naive caching (y = y_c, FORA-style reuse).
  `state_dtype` 'bfloat16' stores y_c and x_c B in bfloat16 (half the state bytes; read back as float32).
  The factors `icc_b` (splits, in, r) and `icc_a` (splits, r, out/splits) come from a truncated SVD of the
  weight, plain or channel-aware (`svd`: 'ca' weights output/input channels by their mean magnitudes, 'cd' by
  the magnitudes of their increments between adjacent steps; diffq/cache/icc.py).
- ICC through an activation (`chain`, set on the MLP's fc1 'first' and fc2 'last'): on cached steps the MLP
  does not rebuild its 4C-wide hidden layer; with GELU linearised at the refresh point,

      y2 = y2_c + ((x B1 - x_c B1) M_t) A2,     M_t = A1 diag(GELU'(y1_c)) B2   (r1 x r2, per token),

  the first-order increment of the whole MLP through both layers' factors (at full rank: the MLP's Jacobian
  step from x_c). fc1 stores x_c B1, fc2 stores y2_c, the MLP stores M_t (`chain_write`). It pays where
  r1 r2 is small against the hidden width (state r1 r2 per token; M_t costs tokens x r1 x hidden x r2 MACs
  per refresh): r = 8 at hidden 512 here, not the paper's r = 128 at DiT-XL/2's 4608.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from diffq.cache import icc
from diffq.seam.variables import Variable

SVDS = ("plain", "ca", "cd")
STATE_DTYPES = ("float32", "bfloat16")
CHAIN_ROLES = ("", "first", "last")  # ICC.chain: not chained, or the first / last layer of a chained MLP
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
  chain: str = ""

  def __post_init__(self):
    if self.rank < 0 or self.splits < 1:
      raise ValueError(f"ICC needs rank >= 0 and splits >= 1; got rank={self.rank}, splits={self.splits}.")
    if self.svd not in SVDS:
      raise ValueError(f"Unknown ICC factorisation {self.svd!r}; choose one of {SVDS}.")
    if self.state_dtype not in STATE_DTYPES:
      raise ValueError(f"Unknown ICC state_dtype {self.state_dtype!r}; choose one of {STATE_DTYPES}.")
    if self.chain not in CHAIN_ROLES:
      raise ValueError(f"Unknown ICC chain role {self.chain!r}; choose one of {CHAIN_ROLES}.")
    if self.chain and (not self.rank or self.splits != 1):
      raise ValueError(f"A chained ICC layer needs rank > 0 and one output split; got rank={self.rank}, "
                       f"splits={self.splits}.")

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
    if self.chain != "first":
      layer.variable(STATE, "y", jnp.zeros, y.shape, self.state_dtype).value = y.astype(self.state_dtype)
    if self.rank and self.chain != "last":
      xb = self._project(x, q["icc_b"])
      layer.variable(STATE, "xb", jnp.zeros, xb.shape, self.state_dtype).value = xb.astype(self.state_dtype)

  def read(self, layer, x, q: dict):
    """y_c + (x B - x_c B) A for the layer's current input x (..., in)."""
    if self.chain:
      raise ValueError(f"Layer {'/'.join(layer.scope.path)} is part of a chained MLP cache: its MLP reads the "
                       "chain (caches.chain_read) and the layer is not called on cached steps.")
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


def chained(first, last) -> bool:
  """Whether an MLP with these fc1 / fc2 cache parts runs ICC through its activation (a half-set chain is an
  error)."""
  roles = (getattr(first, "chain", ""), getattr(last, "chain", ""))
  if roles == ("", ""):
    return False
  if roles != ("first", "last"):
    raise ValueError(f"A chained MLP cache needs ICC(chain='first') on fc1 and ICC(chain='last') on fc2; got "
                     f"{first} and {last}. Set icc.mlp for both layers (seam.rules.icc_rules).")
  return True


def chain_write(mlp, y1, activation, kind, state_dtype: str) -> None:
  """On refresh steps: M_t = A1 diag(activation'(y1_c)) B2 (..., r1, r2) of the MLP's hidden pre-activation
  y1 (..., hidden), stored in the MLP's own state (`mlp` is the flax module of fc1 and fc2)."""
  if kind.cache != "refresh" or not mlp.is_mutable_collection(STATE):
    return
  q = mlp.variables["quant"]
  _, g = jax.jvp(activation, (y1,), (jnp.ones_like(y1),))  # elementwise activation: its derivative at y1
  a1, b2 = q["fc1"]["icc_a"][0].astype(g.dtype), q["fc2"]["icc_b"][0].astype(g.dtype)
  w = a1.T[:, :, None] * b2[:, None, :]  # (hidden, r1, r2): M_t = sum_h g_th A1[:, h] B2[h, :], one GEMM
  m = (g @ w.reshape(w.shape[0], -1)).reshape(*g.shape[:-1], *w.shape[1:])
  mlp.variable(STATE, "m", jnp.zeros, m.shape, state_dtype).value = m.astype(state_dtype)


def chain_read(mlp, x):
  """y2_c + ((x B1 - x_c B1) M_t) A2 for the MLP's input x (..., in)."""
  q, st = mlp.variables["quant"], mlp.variables.get(STATE, {})
  if "m" not in st:
    raise ValueError(f"MLP {'/'.join(mlp.scope.path)} reads its chained cache, but the call has no cache state: "
                     "run cached plans through diffq.sampler.sample with dit.init_state.")
  b1, a2 = q["fc1"]["icc_b"][0].astype(x.dtype), q["fc2"]["icc_a"][0].astype(x.dtype)
  d = x @ b1 - st["fc1"]["xb"][..., 0, :].astype(x.dtype)
  return st["fc2"]["y"].astype(x.dtype) + jnp.einsum("...r,...rs->...s", d, st["m"].astype(x.dtype)) @ a2


def reuse() -> ICC:
  """Naive caching: the cached output as is (ICC at rank 0)."""
  return ICC(rank=0)


TYPES = {"none": NoCache, "icc": ICC}
