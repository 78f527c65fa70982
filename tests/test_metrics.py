import numpy as np
import pytest
from scipy import linalg

from diffq.eval import metrics


def gaussian_set(rng, mu, std, n):
  return mu + std * rng.standard_normal((n, len(mu)))


def test_fd_of_a_set_with_itself_is_zero():
  f = np.random.default_rng(0).standard_normal((500, 8))
  mu, s = metrics.feature_stats(f)
  assert abs(metrics.frechet_distance(mu, s, mu, s)) < 1e-8


def test_fd_of_gaussian_samples_matches_closed_form():
  """Diagonal Gaussians: FD = |mu1 - mu2|^2 + sum (sd1 - sd2)^2."""
  rng = np.random.default_rng(1)
  mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([0.5, 1.0, -1.0, 0.0])
  sd1, sd2 = np.array([1.0, 2.0, 0.5, 1.0]), np.array([1.5, 1.0, 0.5, 2.0])
  exact = np.sum((mu1 - mu2) ** 2) + np.sum((sd1 - sd2) ** 2)
  est = metrics.frechet_distance(*metrics.feature_stats(gaussian_set(rng, mu1, sd1, 200000)),
                                 *metrics.feature_stats(gaussian_set(rng, mu2, sd2, 200000)))
  assert est == pytest.approx(exact, rel=0.02)


def test_fd_matches_full_covariance_formula():
  rng = np.random.default_rng(2)
  a, b = rng.standard_normal((6, 6)), rng.standard_normal((6, 6))
  s1, s2 = a @ a.T + np.eye(6), b @ b.T + np.eye(6)
  mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
  r = linalg.sqrtm(s1)  # Tr sqrtm(S1 S2) = Tr sqrtm(R S2 R), R = S1^(1/2)
  ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.linalg.eigvalsh(r @ s2 @ r)))
  assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9)


def test_fd_shape_mismatch_is_a_clear_error():
  with pytest.raises(ValueError, match="same feature extractor"):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_bounds():
  assert metrics.inception_score(np.zeros((100, 10))) == pytest.approx(1.0)
  confident = np.full((1000, 10), -1e4)
  confident[np.arange(1000), np.arange(1000) % 10] = 0.0
  assert metrics.inception_score(confident) == pytest.approx(10.0, rel=1e-6)
  # splits: each split of 10 one-class rows scores 1
  assert metrics.inception_score(confident[np.argsort(np.arange(1000) % 10, kind="stable")], split_size=100) \
      == pytest.approx(1.0)


def test_precision_recall_identical_and_disjoint_sets():
  f = np.random.default_rng(3).standard_normal((300, 5))
  assert metrics.precision_recall(f, f) == (1.0, 1.0)
  p, r = metrics.precision_recall(f, f + 100.0)
  assert p == 0.0 and r == 0.0


def test_precision_recall_match_brute_force():
  rng = np.random.default_rng(4)
  ref, smp = rng.standard_normal((120, 3)), 0.5 + rng.standard_normal((90, 3))
  d = lambda a, b: ((a[:, None] - b[None]) ** 2).sum(-1)
  r_ref, r_smp = np.sort(d(ref, ref), 1)[:, 3], np.sort(d(smp, smp), 1)[:, 3]
  p = np.mean([(d(s[None], ref)[0] <= r_ref).any() for s in smp])
  r = np.mean([(d(x[None], smp)[0] <= r_smp).any() for x in ref])
  assert metrics.precision_recall(ref, smp, chunk=37) == pytest.approx((p, r))


def test_kid_is_unbiased_on_equal_distributions():
  rng = np.random.default_rng(5)
  means = [metrics.kernel_distance(rng.standard_normal((400, 6)), rng.standard_normal((400, 6)),
                                   num_subsets=20, subset_size=200, seed=s)[0] for s in range(10)]
  # E[MMD^2_unbiased] = 0: the mean over independent draws is within its standard error of 0
  assert abs(np.mean(means)) < 3 * np.std(means) / np.sqrt(len(means)) + 1e-12
  shifted = metrics.kernel_distance(rng.standard_normal((400, 6)), 1 + rng.standard_normal((400, 6)),
                                    num_subsets=5, subset_size=200)[0]
  assert shifted > 10 * np.std(means)


def test_class_accuracy():
  logits = np.eye(10)[[1, 2, 3, 3]]
  assert metrics.class_accuracy(logits, [1, 2, 3, 4]) == 0.75
