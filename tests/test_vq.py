"""Additive VQ (diffq/quant/vq.py) against numpy references: beam search vs brute force, decode, LUT, accounting."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffq.quant import vq


def _problem(n_in, n_out, seed=0, rows=512):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(rows, n_in)) @ rng.normal(size=(n_in, n_in))
  x[:, 0] *= 10  # an outlier channel: H far from diagonal-uniform
  return rng.normal(size=(n_in, n_out)).astype(np.float32), (x.T @ x / rows).astype(np.float32)


def _np_decode(codes, books, scales):
  """Ŵ rows (out, in) with a python loop (float16-rounded codebooks and scales, as stored)."""
  books = books.astype(np.float16).astype(np.float64)
  scales = scales.astype(np.float16).astype(np.float64)
  n_out, n_g, n_m = codes.shape
  g = books.shape[-1]
  out = np.zeros((n_out, n_g * g))
  for o, j, m in itertools.product(range(n_out), range(n_g), range(n_m)):
    out[o, j * g:(j + 1) * g] += scales[o] * books[m, codes[o, j, m]]
  return out


def _np_loss(w_row, what_row, h):
  d = w_row - what_row
  return d @ h @ d


@pytest.mark.parametrize("groups,books", [(2, 1), (1, 2)])
def test_beam_search_equals_brute_force(groups, books):
  """With beam K^(steps - 1) the sweep enumerates every code set: it must find each row's exact optimum of
  (W - Ŵ) H (W - Ŵ)ᵀ over all K^(G M) code sets."""
  g, k = 2, 4
  kern, h = _problem(groups * g, 5)
  rng = np.random.default_rng(1)
  codebooks = rng.normal(size=(books, k, g)).astype(np.float32)
  scales = rng.uniform(0.5, 2.0, size=5).astype(np.float32)
  codes = rng.integers(0, k, size=(5, groups, books)).astype(np.int32)
  order = jnp.asarray([(j, m) for j in range(groups) for m in range(books)], jnp.int32)
  got = np.asarray(vq.beam_search(jnp.asarray(h), jnp.asarray(kern.T), codebooks, codes, scales, order,
                                  beam_size=k ** (groups * books - 1)))
  h64 = h.astype(np.float64)
  for o in range(5):
    best = min(itertools.product(range(k), repeat=groups * books),
               key=lambda c: _np_loss(kern[:, o], _np_decode(np.reshape(c, (1, groups, books)), codebooks,
                                                             scales[o:o + 1])[0], h64))
    np.testing.assert_array_equal(got[o].reshape(-1), best)


def test_greedy_step_is_the_coordinate_minimum():
  """Beam 1 over one (group, codebook) pair picks the codeword of least numpy-recomputed loss."""
  kern, h = _problem(8, 6, seed=2)
  rng = np.random.default_rng(3)
  codebooks = rng.normal(size=(2, 16, 4)).astype(np.float32)
  scales = rng.uniform(0.5, 2.0, size=6).astype(np.float32)
  codes = rng.integers(0, 16, size=(6, 2, 2)).astype(np.int32)
  got = np.asarray(vq.beam_search(h, kern.T, codebooks, codes, scales, jnp.asarray([[1, 0]], jnp.int32),
                                  beam_size=1))
  for o in range(6):
    losses = []
    for c in range(16):
      trial = codes[o:o + 1].copy()
      trial[0, 1, 0] = c
      losses.append(_np_loss(kern[:, o], _np_decode(trial, codebooks, scales[o:o + 1])[0], h.astype(np.float64)))
    want = codes[o].copy()
    want[1, 0] = int(np.argmin(losses))
    np.testing.assert_array_equal(got[o], want)


def test_dequantize_and_lut_match_numpy():
  rng = np.random.default_rng(4)
  w = vq.VQWeight(jnp.asarray(rng.integers(0, 8, size=(6, 3, 2)), jnp.int32),
                  jnp.asarray(rng.normal(size=(2, 8, 4)), jnp.float32), jnp.asarray(rng.uniform(0.1, 1, 6)))
  want = _np_decode(np.asarray(w.codes), np.asarray(w.codebooks), np.asarray(w.scales)).T
  np.testing.assert_allclose(vq.dequantize(w), want, rtol=1e-6, atol=1e-7)
  x = jnp.asarray(rng.normal(size=(2, 5, 12)), jnp.float32)
  np.testing.assert_allclose(vq.lut_matmul(x, w), x @ vq.dequantize(w), rtol=1e-5, atol=1e-5)


def test_fit_never_increases_and_beats_its_start():
  kern, h = _problem(32, 16, seed=5)
  w, info = vq.quantize_weight(kern, h, num_codebooks=2, codebook_bits=4, group_size=4, beam_size=2,
                               steps_per_epoch=20, lr=1e-3, max_epochs=6, tolerance=0.0)
  losses = np.asarray(info["losses"])
  assert np.all(np.diff(losses) <= 1e-7 * losses[0]), losses
  assert losses[-1] < 0.7 * losses[0]
  rows = jnp.asarray(kern.T)
  np.testing.assert_allclose(vq.relative_error(rows, vq.dequantize(w).T, h), losses[-1], rtol=1e-4)
  assert w.codes.shape == (16, 8, 2) and w.codebooks.shape == (2, 16, 4) and w.scales.shape == (16,)


def test_shared_codebooks_fit_several_layers():
  (k1, h1), (k2, h2) = _problem(16, 8, seed=6), _problem(32, 4, seed=7)
  (w1, w2), info = vq.quantize_weights([k1, k2], [h1, h2], num_codebooks=1, codebook_bits=4, group_size=4,
                                       settings=vq.FitSettings(steps_per_epoch=10, max_epochs=3))
  assert w1.codebooks is w2.codebooks and w1.codes.shape == (8, 4, 1) and w2.codes.shape == (4, 8, 1)
  total = vq.relative_error(jnp.asarray(k1.T), vq.dequantize(w1).T, h1) + \
      vq.relative_error(jnp.asarray(k2.T), vq.dequantize(w2).T, h2)
  np.testing.assert_allclose(total, info["losses"][-1], rtol=1e-4)


def test_kmeans_fixed_point():
  """Lloyd's result: every point is assigned its nearest centroid and every used centroid is its points' mean."""
  pts = jnp.asarray(np.random.default_rng(8).normal(size=(200, 3)), jnp.float32)
  c, a = vq.kmeans(pts, jax.random.key(0), k=5, iters=100)
  d = np.sum((np.asarray(pts)[:, None] - np.asarray(c)[None]) ** 2, -1)
  np.testing.assert_array_equal(a, np.argmin(d, 1))
  for i in np.unique(a):
    np.testing.assert_allclose(c[i], np.asarray(pts)[np.asarray(a) == i].mean(0), atol=1e-4)


def test_stored_bits_hand_count():
  # qkv of the embedded DiT (128 -> 384) at 2x8 g8, codebooks shared by the 6 blocks
  bits = vq.stored_bits(128, 384, 2, 8, 8, shared_by=6)
  assert bits == dict(codes=384 * 16 * 2 * 8, codebooks=2 * 256 * 8 * 16 / 6, scales=16 * 384)
  assert vq.lut_flops(128, 384, 2, 8, 8) == dict(table=2 * 128 * 2 * 256, gather=384 * 16 * 2, dense=2 * 128 * 384)


def test_bad_settings_are_refused():
  kern, h = _problem(12, 4)
  with pytest.raises(ValueError, match="group_size 8 does not divide"):
    vq.quantize_weight(kern, h, num_codebooks=1, codebook_bits=4, group_size=8)
  with pytest.raises(ValueError, match="codebook_bits must lie in 1..16"):
    vq.quantize_weight(kern, h, num_codebooks=1, codebook_bits=17, group_size=4)
  with pytest.raises(ValueError, match="beam_size 32 exceeds"):
    vq.quantize_weight(kern, h, num_codebooks=1, codebook_bits=4, group_size=4, beam_size=32)
  with pytest.raises(ValueError, match="H must be"):
    vq.quantize_weight(kern, h[:4, :4], num_codebooks=1, codebook_bits=4, group_size=4)


def test_l2_beam_search_equals_brute_force_and_caps_the_changed_groups():
  rng = np.random.default_rng(9)
  books = rng.normal(size=(2, 4, 3)).astype(np.float32)
  scales = rng.uniform(0.5, 2.0, 5).astype(np.float32)
  codes = rng.integers(0, 4, size=(5, 2, 2)).astype(np.int32)
  target = rng.normal(size=(5, 6)).astype(np.float32)
  order = jnp.arange(2, dtype=jnp.int32)
  got = np.asarray(vq.l2_beam_search(target, books, codes, scales, order, 1.0, beam_size=4))
  stored = books.astype(np.float16).astype(np.float64)
  s = scales.astype(np.float16).astype(np.float64)
  for o, j in itertools.product(range(5), range(2)):
    ref = target[o, 3 * j:3 * j + 3] / s[o]
    best = min(itertools.product(range(4), repeat=2), key=lambda c: np.sum((ref - stored[0, c[0]] - stored[1, c[1]]) ** 2))
    np.testing.assert_array_equal(got[o, j], best)
  capped = np.asarray(vq.l2_beam_search(target, books, codes, scales, order, 0.3, beam_size=4))
  changed = np.any(capped != codes, axis=-1)
  assert changed.sum() <= np.ceil(0.3 * 10)
  dist = np.sum((target.reshape(5, 2, 3) / s[:, None, None] - stored[0][codes[..., 0]] - stored[1][codes[..., 1]]) ** 2, -1)
  far = np.argsort(-dist.reshape(-1))[:3]  # only the farthest groups may change, to their optimum
  np.testing.assert_array_equal(capped.reshape(10, 2)[far], got.reshape(10, 2)[far])
  np.testing.assert_array_equal(np.delete(capped.reshape(10, 2), far, 0), np.delete(codes.reshape(10, 2), far, 0))


def test_greedy_allocation_meets_the_budget_and_matches_brute_force_on_convex_options():
  from diffq.quant import allocate
  rng = np.random.default_rng(10)
  options = {}
  for t in "abcd":  # convex error-vs-bits curves (each extra codebook helps less)
    n = int(rng.integers(1, 5)) * 1000
    errs = np.cumsum(-np.sort(rng.uniform(0.1, 1.0, 4))[::-1]) + 5.0
    options[t] = [(f"{m}x8g8", m * n, float(e)) for m, e in zip(range(1, 5), errs)]
  budget = 0.6 * sum(o[-1][1] for o in options.values())
  got = allocate.greedy_allocation(options, budget)
  pick = {t: next(o for o in options[t] if o[0] == got[t]) for t in options}
  assert sum(p[1] for p in pick.values()) <= budget
  best = min(itertools.product(*options.values()), key=lambda c: sum(o[2] for o in c) if sum(o[1] for o in c)
             <= budget else np.inf)
  # greedy on convex curves is within one upgrade of the optimum: never worse than the optimum by more than the
  # largest single step's error drop
  assert sum(p[2] for p in pick.values()) <= sum(o[2] for o in best) + 1.0
  with pytest.raises(ValueError, match="over the budget"):
    allocate.greedy_allocation(options, 10)
