"""ICC's low-rank factors (research/icc.md §4): truncated SVD of a layer's weight, plain or channel-aware.

For W (in, out) (x @ W layout; PyTorch's W_t = W.T) and channel weights r (in,), l (out,), the weighted SVD

    diag(r) W diag(l) = U S V^T,     B = diag(r)^-1 U_:k  (in, k),     A = S_k V_:k^T diag(l)^-1  (k, out)

gives the rank-k A B minimising ||diag(r) (W - B A) diag(l)||_F (r = l = 1: plain SVD). Channel weights
(`channel_weights`) are sqrt of the mean row-normalised channel magnitude over the calibration steps, clamped
below at max / 1000: of the layer's inputs and outputs ('ca', the README's CA-SVD) or of their increments
between adjacent steps ('cd'). With `splits` > 1 each output chunk (q, k, v) is factorised on its own, sharing
the input weights.
"""
from __future__ import annotations

import numpy as np

MAX_RATIO = 1000.0


def channel_weights(stat: np.ndarray, max_ratio: float = MAX_RATIO) -> np.ndarray:
  """(steps, C) per-step magnitudes -> (C,) weights: sqrt(mean over steps), clamped at max / max_ratio."""
  w = np.sqrt(np.mean(np.asarray(stat, np.float64), axis=0))
  return np.maximum(w, w.max() / max_ratio) + 1e-6


def weighted_svd(w: np.ndarray, rank: int, right: np.ndarray | None = None, left: np.ndarray | None = None):
  """(B (in, rank), A (rank, out)) float32 with B A the rank-`rank` weighted approximation of w (in, out)."""
  w = np.asarray(w, np.float64)
  r = np.ones(w.shape[0]) if right is None else np.asarray(right, np.float64)
  l = np.ones(w.shape[1]) if left is None else np.asarray(left, np.float64)
  u, s, vt = np.linalg.svd(r[:, None] * w * l[None, :], full_matrices=False)
  if rank > len(s):
    raise ValueError(f"ICC rank {rank} exceeds the rank {len(s)} of a {w.shape} weight; lower icc.ranks.")
  b = u[:, :rank] / r[:, None]
  a = (s[:rank, None] * vt[:rank]) / l[None, :]
  return b.astype(np.float32), a.astype(np.float32)


def factors(matrix, stats: dict, rank: int, splits: int, svd: str) -> dict:
  """{'icc_b': (splits, in, rank), 'icc_a': (splits, rank, out / splits)} for the layer's (in, out) `matrix`
  ({} at rank 0: naive reuse needs no factors)."""
  if not rank:
    return {}
  w = np.asarray(matrix)
  chunks = np.split(w, splits, axis=1)
  right = left = None
  if svd != "plain":
    prefix = "" if svd == "ca" else "delta_"
    right = channel_weights(stats[f"in_{prefix}absmean"])
    left = [channel_weights(c) for c in np.split(np.asarray(stats[f"out_{prefix}absmean"]), splits, axis=1)]
  pairs = [weighted_svd(c, rank, right, None if left is None else left[i]) for i, c in enumerate(chunks)]
  return {"icc_b": np.stack([b for b, _ in pairs]), "icc_a": np.stack([a for _, a in pairs])}
