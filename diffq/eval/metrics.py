"""Sample-quality metrics with ADM-evaluator semantics (openai/guided-diffusion `evaluations/evaluator.py`),
computed on host numpy in float64 from any feature extractor's outputs.

On the embedded benchmark the features come from the project's Fashion-MNIST classifier, so the numbers are
classifier-feature metrics (FD, not Inception FID) and are comparable only under the same frozen evaluator.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mu (D,), sigma (D, D)) with np.cov's unbiased (N-1) normalisation, as ADM does."""
  f = np.asarray(features, np.float64).reshape(len(features), -1)
  if len(f) < 2:
    raise ValueError(f"Need at least 2 feature vectors for statistics; got {len(f)}.")
  return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrtm(S1 S2)); ADM's fallback adds eps*I to both covariances when
  sqrtm is not finite, and it refuses results with a significant imaginary part."""
  mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
  s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
  if mu1.shape != mu2.shape or s1.shape != s2.shape:
    raise ValueError(f"Statistics have different shapes: {mu1.shape}/{s1.shape} vs {mu2.shape}/{s2.shape}; "
                     "were they computed with the same feature extractor?")
  diff = mu1 - mu2
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    covmean = linalg.sqrtm(s1.dot(s2))  # scipy >= 1.16 dropped `disp`; non-finite output signals failure
  if not np.isfinite(covmean).all():
    offset = np.eye(s1.shape[0]) * eps
    covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))} in sqrtm(S1 S2).")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
  """exp(E_x KL(p(y|x) || p(y))) per split of `split_size` consecutive rows, averaged over splits (ADM)."""
  logits = np.asarray(logits, np.float64)
  logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
  scores = []
  for start in range(0, len(logp), split_size):
    part = logp[start:start + split_size]
    p = np.exp(part)
    with np.errstate(divide="ignore"):
      log_marginal = np.log(np.mean(p, axis=0, keepdims=True))
    kl = np.where(p > 0, p * (part - np.where(np.isfinite(log_marginal), log_marginal, 0.0)), 0.0)  # 0 log 0 = 0
    scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
  return float(np.mean(scores))


def _pairwise_sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  a2, b2 = np.sum(a * a, axis=1)[:, None], np.sum(b * b, axis=1)[None, :]
  return np.maximum(a2 - 2 * a @ b.T + b2, 0.0)


def _knn_radii(f: np.ndarray, k: int, chunk: int) -> np.ndarray:
  """Squared distance of each row to its k-th nearest other row (index k of the sorted row; index 0 is self)."""
  out = np.empty(len(f))
  for s in range(0, len(f), chunk):
    d = _pairwise_sq_dists(f[s:s + chunk], f)
    out[s:s + chunk] = np.partition(d, k, axis=1)[:, k]
  return out


def _covered(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, chunk: int) -> np.ndarray:
  """For each point, whether it lies inside at least one centre's hypersphere (d^2 <= r^2)."""
  out = np.zeros(len(points), bool)
  for s in range(0, len(points), chunk):
    out[s:s + chunk] = np.any(_pairwise_sq_dists(points[s:s + chunk], centres) <= radii[None, :], axis=1)
  return out


def precision_recall(ref_features: np.ndarray, sample_features: np.ndarray, k: int = 3,
                     chunk: int = 1000) -> tuple[float, float]:
  """Improved precision/recall (Kynkaenniemi et al. 2019) with k-NN manifolds, k=3 as in ADM.

  precision = fraction of samples inside the reference manifold; recall = fraction of references inside the
  sample manifold. Distances are squared Euclidean in float64 (ADM uses fp16 with an fp32 fallback)."""
  ref = np.asarray(ref_features, np.float64).reshape(len(ref_features), -1)
  smp = np.asarray(sample_features, np.float64).reshape(len(sample_features), -1)
  if min(len(ref), len(smp)) <= k:
    raise ValueError(f"Precision/recall with k={k} needs more than {k} points per set.")
  precision = _covered(smp, ref, _knn_radii(ref, k, chunk), chunk).mean()
  recall = _covered(ref, smp, _knn_radii(smp, k, chunk), chunk).mean()
  return float(precision), float(recall)


def kernel_distance(f1: np.ndarray, f2: np.ndarray, num_subsets: int = 100, subset_size: int = 1000,
                    seed: int = 2020) -> tuple[float, float]:
  """KID: unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 over random subsets (torch-fidelity's protocol).

  Returns (mean, std) over subsets; each subset draws `subset_size` rows per side without replacement."""
  f1 = np.asarray(f1, np.float64).reshape(len(f1), -1)
  f2 = np.asarray(f2, np.float64).reshape(len(f2), -1)
  m = min(subset_size, len(f1), len(f2))
  if m < 2:
    raise ValueError("KID needs at least 2 feature vectors per set.")
  d = f1.shape[1]
  rng = np.random.default_rng(seed)
  vals = []
  for _ in range(num_subsets):
    x = f1[rng.choice(len(f1), m, replace=False)]
    y = f2[rng.choice(len(f2), m, replace=False)]
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    vals.append((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                - 2 * kxy.mean())
  return float(np.mean(vals)), float(np.std(vals))


def class_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of samples the classifier assigns to their conditioning label."""
  return float(np.mean(np.argmax(np.asarray(logits), axis=1) == np.asarray(labels)))
