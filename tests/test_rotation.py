"""The block-Hadamard rotation (diffq/quant/rotation.py, `LayerSpec.rotate`) against numpy: the matrix, the
float identity through the whole DiT, calibration on the rotated inputs, composition with MoDiff."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffq import calibrate, parallel, plan as plan_lib
from diffq.models import dit
from diffq.quant import rotation
from diffq.seam import inputs, rules, spec as spec_lib
from tests.test_calibrate import tiny_setup
from tests.test_modiff import modiff_sample, np_minmax_quant, np_modiff_layer, run_layer, smooth_trajectory


def np_rotation(signs: np.ndarray) -> np.ndarray:
  """R = diag(signs) (I ⊗ H_b) / sqrt(b), H_b by the Kronecker recursion, b the largest power of 2 dividing n."""
  n = signs.size
  b = 1
  while n % (2 * b) == 0:
    b *= 2
  h = np.array([[1.0]])
  while h.shape[0] < b:
    h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
  return np.diag(signs) @ np.kron(np.eye(n // b), h / np.sqrt(b))


@pytest.mark.parametrize("n", [128, 96, 1152])
def test_rotation_is_the_orthogonal_block_hadamard_matrix(n):
  rng = np.random.default_rng(n)
  signs = rng.choice([-1.0, 1.0], n)
  r = np_rotation(signs)
  np.testing.assert_allclose(r @ r.T, np.eye(n), atol=1e-12)
  x, w = rng.normal(size=(3, 5, n)), rng.normal(size=(n, 7))
  s = jnp.asarray(signs, jnp.float32)
  np.testing.assert_allclose(rotation.rotate(jnp.asarray(x, jnp.float32), s), x @ r, atol=1e-5)
  np.testing.assert_allclose(rotation.rotate_kernel(jnp.asarray(w, jnp.float32), s), r.T @ w, atol=1e-5)
  np.testing.assert_allclose(rotation.unrotate_kernel(jnp.asarray(w, jnp.float32), s), r @ w, atol=1e-5)
  assert rotation.block_size(n) == {128: 128, 96: 32, 1152: 128}[n]
  assert rotation.adds_per_token(n) == n * int(np.log2(rotation.block_size(n)))
  assert set(np.unique(np.asarray(rotation.random_signs(n)))) == {-1.0, 1.0}


def test_rotated_float_dit_equals_the_fp_dit():
  """(x / s) R @ Rᵀ (W s) == x W: a rotated (and smoothed) float model leaves the outputs unchanged to 1e-5."""
  cfg, params, _ = tiny_setup()
  table = (("blocks_*", spec_lib.LayerSpec(smooth=True, rotate=True)),)
  model = dit.DiT(config=cfg, specs=table)
  x = jax.random.normal(jax.random.key(3), (4, cfg.input_size, cfg.input_size, cfg.in_channels))
  t, y = jnp.array([10, 400, 800, 999]), jnp.array([0, 1, 2, cfg.num_classes])
  quant = jax.tree.map(np.array, calibrate.quant_template(cfg, table))
  rng = np.random.default_rng(0)
  for layer in jax.tree.leaves(quant, is_leaf=lambda d: isinstance(d, dict) and "rot_signs" in d):
    layer["rot_signs"] = rng.choice([-1.0, 1.0], layer["rot_signs"].shape).astype(np.float32)
    layer["smooth"] = rng.uniform(0.5, 2.0, layer["smooth"].shape).astype(np.float32)
  rotated = model.apply({"params": params, "quant": quant}, x, t, y)
  plain = dit.DiT(config=cfg).apply({"params": params}, x, t, y)
  np.testing.assert_allclose(rotated, plain, atol=1e-5)
  assert np.abs(np.asarray(plain)).max() > 1e-2


def test_rotation_spreads_an_outlier_channel_over_the_quantizer_range():
  """Per-tensor 4-bit min-max of an input with one outlier channel: rotating first cuts the error of x W."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 128)).astype(np.float32)
  x[:, 5] *= 30.0
  w = rng.normal(size=(128, 32)).astype(np.float32)
  s = rotation.random_signs(128)
  plain = np_minmax_quant(x, 4) @ w
  xr, wr = np.asarray(rotation.rotate(jnp.asarray(x), s)), np.asarray(rotation.rotate_kernel(jnp.asarray(w), s))
  rotated = np_minmax_quant(xr, 4) @ wr
  err = lambda y: np.linalg.norm(y - x @ w) / np.linalg.norm(x @ w)
  assert err(rotated) < 0.5 * err(plain)


def test_rotated_layers_calibrate_on_their_rotated_inputs():
  """A rotated static layer's ranges come from (x / s) R, the input it quantizes: the second statistics pass
  records that input's min/max (numpy on the captured inputs), and the calibrated W8A8 model tracks FP."""
  cfg, params, cal = tiny_setup()
  steps = len(cal.plan.steps)
  table = (("blocks_*", rules.scalar_spec(8, 8, steps, smooth=True, rotate=True)),)
  quant, _ = calibrate.calibrate(cfg, {"params": params}, cal, table)
  q = quant["blocks_0"]["mlp"]["fc2"]
  np.testing.assert_array_equal(q["rot_signs"], rotation.random_signs(q["rot_signs"].shape[0]))
  spec = spec_lib.resolve("blocks_0/mlp/fc2", table)
  xs = []
  for i in range(steps):
    _, got = calibrate.capture_layers(dit.DiT(config=cfg), {"params": params}, *calibrate._model_batch(cal, i))
    xs.append(np.asarray(spec.transform_input(got["blocks_0/mlp/fc2"][0], q)))
  stats = calibrate.statistics(cfg, {"params": params}, (), cal, {"blocks_0/mlp/fc2": ("in_min", "in_max")},
                               transforms={"blocks_0/mlp/fc2": lambda a: spec.transform_input(a, q)})
  flat = np.stack(xs).reshape(steps, -1, xs[0].shape[-1])
  np.testing.assert_allclose(stats["blocks_0/mlp/fc2"]["in_max"], flat.max(axis=1), rtol=1e-5, atol=1e-6)
  # every step's quantizer range lies within that step's rotated input span (the MSE search clips, never widens)
  lo, hi = flat.min(axis=(1, 2)), flat.max(axis=(1, 2))
  assert np.all(np.asarray(q["a_scale"]) * 255 <= (np.maximum(hi, 0) - np.minimum(lo, 0)) * 1.0001)
  x, t, y = calibrate._model_batch(cal, 3)
  fp = dit.DiT(config=cfg).apply({"params": params}, x, t, y)
  w8a8 = dit.DiT(config=cfg, specs=table).apply({"params": params, "quant": quant}, x, t, y,
                                                 ctx=plan_lib.StepContext(3))
  assert float(jnp.linalg.norm(w8a8 - fp) / jnp.linalg.norm(fp)) < 0.02


@pytest.mark.parametrize("compensate", [True, False])
def test_rotation_composes_with_modiff(compensate):
  """A rotated modulated layer is the released MoDiff datapath on the rotated input and weight."""
  xs = smooth_trajectory(c=32)
  rng = np.random.default_rng(1)
  w, b = rng.normal(size=(32, 6)).astype(np.float32), rng.normal(size=6).astype(np.float32)
  signs = rng.choice([-1.0, 1.0], 32).astype(np.float32)
  r = np_rotation(signs)
  spec = spec_lib.LayerSpec(input=inputs.Modulated(4, compensate=compensate), rotate=True)
  got, _ = run_layer(spec, xs, w, b, quant={"rot_signs": jnp.asarray(signs)})
  want = np_modiff_layer(xs @ r, r.T @ w, b, 4, compensate)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_rotated_modiff_sampler_on_8_devices_equals_1_device():
  if len(jax.devices()) < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  cfg, params, _ = tiny_setup()
  part = inputs.Modulated(4, granularity="sample")
  one = modiff_sample(cfg, params, parallel.make_mesh(1), part, rotate=True)
  eight = modiff_sample(cfg, params, parallel.make_mesh(8), part, rotate=True)
  np.testing.assert_allclose(one, eight, rtol=1e-5, atol=1e-5)
  unrotated = modiff_sample(cfg, params, parallel.make_mesh(1), part)
  assert np.abs(one - unrotated).max() > 1e-4


def test_bitops_add_the_rotations_walsh_hadamard_additions():
  """Rotated body layers add n log2(n) float additions per token (n = 32 here, a power of two) at 32 BitOPs
  each, on every step: 1 token for adaLN, every patch token for the block linears."""
  from diffq.eval import flops
  cfg, _, _ = tiny_setup()
  plan = plan_lib.make_plan(1000, "ddim5")
  plain = (("*", rules.scalar_spec(4, 4, 5)),)
  rotated = (("blocks_*", rules.scalar_spec(4, 4, 5, rotate=True)),) + plain
  by_part = flops.bitops_per_image(cfg, plan, 3.0, rotated, by_part=True)
  assert by_part["linear"] + by_part["attention"] == flops.bitops_per_image(cfg, plan, 3.0, plain)
  want = 0
  for path in flops.dit_layer_macs(cfg):
    if path.startswith("blocks_") and not path.endswith(flops.ATTENTION_PRODUCTS):
      n_in = {"fc2": int(cfg.hidden_size * cfg.mlp_ratio)}.get(path.rsplit("/", 1)[-1], cfg.hidden_size)
      tokens = 1 if path.endswith("adaLN_modulation") else cfg.num_tokens
      want += tokens * n_in * int(np.log2(n_in)) * 32
  assert by_part["rotation"] == 2 * 5 * want
