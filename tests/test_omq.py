import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffq.quant import omq, ops
from diffq.seam import weights


def test_kurtosis_matches_scipy_with_bessel_std():
  w = np.random.default_rng(0).standard_t(4, size=(50, 7))
  n = w.shape[0]
  # scipy's biased kurtosis uses the population std; MPQ-DM divides by the Bessel-corrected std
  ref = stats.kurtosis(w, axis=0, fisher=False, bias=True) * ((n - 1) / n) ** 2
  np.testing.assert_allclose(omq.kurtosis(jnp.asarray(w)), ref, rtol=1e-4)


@pytest.mark.parametrize("n_bits,k", [(2, 0), (2, 3), (3, 5), (4, 1)])
def test_allocation_keeps_average_exactly(n_bits, k):
  kurt = jnp.asarray(np.random.default_rng(k).normal(size=10))
  bits = np.asarray(omq.omq_bit_allocation(kurt, n_bits, k))[0]
  assert bits.sum() == n_bits * 10 and set(bits) <= {n_bits - 1, n_bits, n_bits + 1}
  order = np.argsort(np.asarray(kurt))
  assert np.all(bits[order[-k:]] == n_bits + 1) if k else np.all(bits == n_bits)
  assert np.all(bits[order[:k]] == n_bits - 1) if k else True


def test_k0_reproduces_uniform_per_channel_quantization():
  w = jnp.asarray(np.random.default_rng(1).normal(size=(16, 8)), jnp.float32)
  bits = omq.omq_bit_allocation(omq.kurtosis(w), 3, 0)
  s_mixed, z_mixed = weights.weight_ranges(w, weights.Scalar(3, mixed=True),
                                             bits=bits)
  s_uni, z_uni = weights.weight_ranges(w, weights.Scalar(3))
  np.testing.assert_array_equal(ops.fake_quant(w, s_mixed, z_mixed, ops.qmax_of(bits)),
                                ops.fake_quant(w, s_uni, z_uni, ops.qmax_of(3)))


def test_search_picks_the_lowest_error_fraction():
  rng = np.random.default_rng(2)
  w = rng.normal(size=(32, 20)).astype(np.float32)
  w[:, :3] = rng.standard_t(1.5, size=(32, 3))  # heavy-tailed (outlier) channels
  x = rng.normal(size=(64, 32)).astype(np.float32)
  bits, k, errs = omq.omq_search(jnp.asarray(w), jnp.asarray(x), 2, (0.0, 0.1, 0.2, 0.3, 0.4, 0.5))
  assert len(errs) == 6 and k == [0, 2, 4, 6, 8, 10][int(np.argmin(errs))]
  assert int(np.asarray(bits).sum()) == 2 * 20
  with pytest.raises(ValueError, match="<= 0.5"):
    omq.omq_search(jnp.asarray(w), jnp.asarray(x), 2, (0.6,))
