import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffq.quant import ops, pack


def np_fake_quant(x, s, z, bits, symmetric=False):
  """Slow reference: elementwise, Python scalars."""
  out = np.empty_like(x, dtype=np.float64)
  s, z, bits = (np.broadcast_to(a, x.shape) for a in (s, z, bits))
  for idx in np.ndindex(x.shape):
    qmax = 2 ** int(bits[idx]) - 1
    lo, hi = (-(qmax + 1) / 2, (qmax - 1) / 2) if symmetric else (0, qmax)
    zz = 0.0 if symmetric else float(np.round(z[idx]))
    q = min(max(np.round(x[idx] / s[idx]) + zz, lo), hi)
    out[idx] = (q - zz) * s[idx]
  return out


@pytest.mark.parametrize("bits,symmetric", list(itertools.product([1, 2, 3, 4, 8], [False, True])))
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_fake_quant_matches_numpy(bits, symmetric, granularity):
  rng = np.random.default_rng(bits)
  x = rng.normal(size=(6, 8)).astype(np.float32)
  if granularity == "group":
    x = x.reshape(6, 2, 4)  # groups of 4 along the input axis
  shape = {"tensor": (), "channel": (6, 1), "group": (6, 2, 1)}[granularity]
  s = rng.uniform(0.05, 0.6, shape).astype(np.float32)
  z = 0.0 if symmetric else rng.uniform(0, 2 ** bits - 1, shape).astype(np.float32)
  got = ops.fake_quant(jnp.asarray(x), s, z, ops.qmax_of(bits), symmetric)
  np.testing.assert_allclose(got, np_fake_quant(x, s, z, bits, symmetric), rtol=1e-6, atol=1e-6)


def test_per_channel_bit_vector_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 7)).astype(np.float32)
  bits = np.array([1, 2, 3, 4, 8])[:, None]
  s = rng.uniform(0.1, 0.5, (5, 1)).astype(np.float32)
  z = np.array([0.0, 1.0, 3.0, 7.0, 128.0], np.float32)[:, None]
  got = ops.fake_quant(jnp.asarray(x), s, z, ops.qmax_of(bits))
  np.testing.assert_allclose(got, np_fake_quant(x, s, z, bits), rtol=1e-6, atol=1e-6)


def test_gradients_match_ste_lsq_formulas():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4, 6)).astype(np.float32) * 2
  s = np.full((4, 1), 0.3, np.float32)
  z = np.full((4, 1), 1.4, np.float32)  # used as round(z) = 1
  qmax, gscale = 3.0, 0.25
  g = rng.normal(size=x.shape).astype(np.float32)
  f = lambda x, s, z: jnp.sum(g * ops.fake_quant(x, s, z, qmax, False, gscale))
  dx, ds, dz = jax.grad(f, argnums=(0, 1, 2))(jnp.asarray(x), jnp.asarray(s), jnp.asarray(z))
  u = x / s
  v = np.round(u) + 1
  inside = (v >= 0) & (v <= qmax)
  np.testing.assert_allclose(dx, np.where(inside, g, 0))
  ref_ds = np.sum(g * np.where(inside, np.round(u) - u, np.where(v < 0, 0 - 1, qmax - 1)), axis=1, keepdims=True)
  np.testing.assert_allclose(ds, gscale * ref_ds, rtol=1e-5)
  np.testing.assert_allclose(dz, gscale * np.sum(g * np.where(inside, 0, -s), axis=1, keepdims=True), rtol=1e-5)
  assert inside.any() and (~inside).any()


def test_codes_are_integers_and_reproduce_fake_quant():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(8, 16)).astype(np.float32)
  s, z, qmax = np.float32(0.2), np.float32(1.6), ops.qmax_of(2)
  codes = ops.quantize(x, s, z, qmax)
  assert codes.dtype == jnp.int32 and int(codes.min()) >= 0 and int(codes.max()) <= 3
  np.testing.assert_array_equal(ops.dequantize(codes, s, z), ops.fake_quant(x, s, z, qmax))


@pytest.mark.parametrize("bits", [*range(1, 9), 12, 16])
def test_pack_unpack_round_trip(bits):
  codes = np.random.default_rng(bits).integers(0, 2 ** bits, size=(7, 13)).astype(np.uint8 if bits <= 8 else np.uint16)
  packed = pack.pack(codes, bits)
  assert packed.dtype == np.uint8 and packed.size == -(-codes.size * bits // 8)
  np.testing.assert_array_equal(pack.unpack(packed, bits, codes.shape), codes)


def test_mixed_row_packing_round_trip():
  bits = np.array([1, 2, 3, 2, 8])
  codes = np.stack([np.random.default_rng(i).integers(0, 2 ** b, 9) for i, b in enumerate(bits)]).astype(np.uint8)
  packed, offsets = pack.pack_rows(codes, bits)
  assert packed.size == sum(-(-9 * int(b) // 8) for b in bits)
  np.testing.assert_array_equal(pack.unpack_rows(packed, offsets, bits, 9), codes)


def test_bad_bits_and_codes_are_clear_errors():
  with pytest.raises(ValueError, match="1..8"):
    ops.check_bits([2, 9])
  with pytest.raises(ValueError, match="1..8"):
    ops.check_bits(0)
  with pytest.raises(ValueError, match="integers"):
    ops.check_bits(2.5)
  with pytest.raises(ValueError, match=r"\[0, 4\)"):
    pack.pack(np.array([4]), 2)
  with pytest.raises(ValueError, match="uint8 bytes"):
    pack.unpack(np.zeros(3, np.uint8), 2, (20,))
