import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffq import calibrate, parallel, plan as plan_lib
from diffq.models import dit
from diffq.quant import ranges
from diffq.seam import rules


def np_mse_range(x, bits, p=2.4, n=80):
  """Slow reference of the per-tensor LAPQ range search."""
  qmax = 2 ** bits - 1
  best = (np.inf, None, None)
  for i in range(n):
    lo, hi = min(x.min() * (1 - 0.01 * i), 0.0), max(x.max() * (1 - 0.01 * i), 0.0)
    s = max((hi - lo) / qmax, 1e-8)
    z = np.round(-lo / s)
    q = (np.clip(np.round(x / s) + z, 0, qmax) - z) * s
    err = np.mean(np.abs(x - q) ** p)
    if err < best[0]:
      best = (err, s, z)
  return best[1], best[2]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_mse_range_matches_numpy(bits):
  x = np.random.default_rng(bits).standard_t(3, size=(64, 5)).astype(np.float32)
  s, z = ranges.mse_range(jnp.asarray(x), bits, (0,))
  for c in range(5):
    rs, rz = np_mse_range(x[:, c].astype(np.float64), bits)
    np.testing.assert_allclose(s[0, c], rs, rtol=1e-4)
    assert z[0, c] == rz


def test_smoothing_is_an_identity_without_quantization():
  rng = np.random.default_rng(0)
  x, w = rng.normal(size=(10, 6)) * [1, 10, 0.1, 5, 1, 0], rng.normal(size=(6, 4))
  s = ranges.smooth_scale(np.abs(x).max(0), np.abs(w).max(1))
  assert np.all(np.isfinite(s))  # a dead channel (max 0) must not give inf/NaN
  np.testing.assert_allclose((x / s) @ (w * np.asarray(s)[:, None]), x @ w, rtol=1e-5, atol=1e-6)


def tiny_setup(num_images=8):
  cfg = dit.preset("FM", hidden_size=32, depth=2, num_heads=2)
  params = dit.init_params(cfg, jax.random.key(0))
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape), params)
  plan = plan_lib.make_plan(1000, "ddim4")
  labels = jnp.arange(num_images) % 10
  xs = calibrate.fp_trajectory(dit.model_fn(dit.DiT(config=cfg)), {"params": params}, jax.random.key(1), labels,
                               plan, (32, 32, 1), 1.5, 10)
  return cfg, params, calibrate.CalibrationSet(xs, labels, plan, 1.5, 10)


def test_calibrated_w8a8_model_tracks_fp():
  cfg, params, cal = tiny_setup()
  assert cal.xs.shape == (4, 8, 32, 32, 1)
  pol = rules.scalar_spec(8, 8, 4, smooth=True)
  table = (("*", pol),)
  quant, _ = calibrate.calibrate(cfg, {"params": params}, cal, table)
  x, t, y = calibrate._model_batch(cal, 2)
  fp = dit.DiT(config=cfg).apply({"params": params}, x, t, y)
  q8 = dit.DiT(config=cfg, specs=table).apply({"params": params, "quant": quant}, x, t, y, ctx=plan_lib.StepContext(2))
  rel = float(jnp.linalg.norm(q8 - fp) / jnp.linalg.norm(fp))
  assert rel < 0.02, rel
  pol4 = rules.scalar_spec(4, 4, 4)
  q4 = dit.DiT(config=cfg, specs=(("*", pol4),)).apply(
      {"params": params, "quant": calibrate.calibrate(cfg, {"params": params}, cal, (("*", pol4),))[0]}, x, t, y, ctx=plan_lib.StepContext(2))
  assert float(jnp.linalg.norm(q4 - fp) / jnp.linalg.norm(fp)) > rel  # fewer bits, more error


def test_calibration_on_8_devices_equals_1_device():
  cfg, params, cal = tiny_setup(num_images=8)
  pol = rules.scalar_spec(2, 4, 4, smooth=True, mixed=True)
  one = calibrate.calibrate(cfg, {"params": params}, cal, (("*", pol),))
  mesh = parallel.make_mesh(8)
  sharded = calibrate.CalibrationSet(jax.device_put(cal.xs, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, parallel.DATA))), jax.device_put(cal.labels,
      parallel.batch_sharded(mesh)), cal.plan, cal.cfg_scale, cal.null_class)
  assert len(sharded.xs.sharding.device_set) == 8
  eight = calibrate.calibrate(cfg, {"params": params}, sharded, (("*", pol),))
  assert one[1] == eight[1] and one[1]  # same OMQ choices
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), one, eight)


def test_statistics_pass_matches_numpy_on_the_captured_inputs():
  cfg, params, cal = tiny_setup(num_images=4)
  names = ("in_min", "in_max", "in_xtx", "in_sample", "in_absmean", "in_delta_absmean")
  p = "blocks_1/mlp/fc2"
  stats = calibrate.statistics(cfg, {"params": params}, (), cal, {p: names}, sample_size=100)[p]
  model = dit.DiT(config=cfg)
  caps = [calibrate.capture_layers(model, {"params": params}, *calibrate._model_batch(cal, i))[1][p]
          for i in range(4)]
  xs = [np.asarray(c[0], np.float64) for c in caps]
  flat_all = np.concatenate([x.reshape(-1, x.shape[-1]) for x in xs])
  np.testing.assert_allclose(stats["in_xtx"], flat_all.T @ flat_all, rtol=1e-4, atol=1e-3)  # summed over steps
  for i, x in enumerate(xs):
    flat = x.reshape(-1, x.shape[-1])
    np.testing.assert_allclose(stats["in_min"][i], flat.min(0), rtol=1e-6)  # jit vs eager: last-bit fusion
    np.testing.assert_allclose(stats["in_sample"][i], x.reshape(-1)[np.asarray(
        jax.random.randint(jax.random.key(0), (100,), 0, x.size))], rtol=1e-5, atol=1e-7)
    m = np.abs(x).mean(1)
    norm = (m - m.min(1, keepdims=True) + 1e-6) / (m.max(1, keepdims=True) - m.min(1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(stats["in_absmean"][i], norm.mean(0), rtol=1e-4)
    if i:
      m = np.abs(x - xs[i - 1]).mean(1)
      norm = (m - m.min(1, keepdims=True) + 1e-6) / (m.max(1, keepdims=True) - m.min(1, keepdims=True) + 1e-6)
      np.testing.assert_allclose(stats["in_delta_absmean"][i - 1], norm.mean(0), rtol=1e-4)
  assert stats["in_delta_absmean"].shape[0] == 3 and stats["out_absmean"].shape == (4, 32)
