"""MoDiff's modulated input part (diffq/seam/inputs.py `Modulated`) against a numpy version of the released code's
datapath (research/modiff.md §2.2: a_hat / o_hat accumulators, bias added once), its ablation without error
compensation, and in the sampler (state per network row, reset per trajectory, 8 devices == 1)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffq import calibrate, parallel, plan as plan_lib, sampler
from diffq.models import dit, layers
from diffq.seam import inputs, rules, spec as spec_lib
from tests.test_calibrate import tiny_setup


def np_minmax_quant(x, bits, axes=None):
  """Q-Diffusion's asymmetric min-max fake quantizer (min clipped at 0 from above, max from below)."""
  lo = np.minimum(x.min(axis=axes, keepdims=True), 0.0)
  hi = np.maximum(x.max(axis=axes, keepdims=True), 0.0)
  delta = np.maximum((hi - lo) / (2 ** bits - 1), 1e-8)
  z = np.round(-lo / delta)
  return (np.clip(np.round(x / delta) + z, 0, 2 ** bits - 1) - z) * delta


def np_modiff_layer(xs, w, b, bits, compensate=True):
  """The released QuantModule forward over a sequence of calls (float weights): first call FP with bias; then
  out = o_hat + Q(x - a_hat) @ W, a_hat += Q(.) (compensate) or the standard modulation of true differences.
  `bits`: an int, or one per call."""
  a_hat = o_hat = x_prev = None
  outs = []
  for i, x in enumerate(xs):
    if a_hat is None:
      a_hat, out = x, x @ w + b
    else:
      q = np_minmax_quant(x - (a_hat if compensate else x_prev), bits if np.isscalar(bits) else bits[i])
      a_hat, out = a_hat + q, o_hat + q @ w
    o_hat, x_prev = out, x
    outs.append(out)
  return np.stack(outs)


def smooth_trajectory(steps=8, rows=3, tokens=5, c=16, seed=0):
  rng = np.random.default_rng(seed)
  base, drift = rng.normal(size=(rows, tokens, c)), rng.normal(size=(rows, tokens, c))
  return np.stack([base + 0.15 * k * drift + 0.02 * rng.normal(size=base.shape) for k in range(steps)])


def run_layer(part, xs, w, b, quant=None):
  """The outputs of a Linear with input part `part` (or the LayerSpec `part`) over the calls xs, and its state."""
  spec = part if isinstance(part, spec_lib.LayerSpec) else spec_lib.LayerSpec(input=part)
  layer = layers.Linear(w.shape[1], spec=spec)
  v = {"params": {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}, **({"quant": quant} if quant else {})}
  state = layer.init(jax.random.key(0), jnp.asarray(xs[0], jnp.float32))[inputs.STATE]
  state = jax.tree.map(jnp.zeros_like, state)
  outs = []
  for i, x in enumerate(xs):
    y, new = layer.apply({**v, inputs.STATE: state}, jnp.asarray(x, jnp.float32), plan_lib.StepContext(i),
                         mutable=[inputs.STATE])
    state = new[inputs.STATE]
    outs.append(np.asarray(y))
  return np.stack(outs), state


@pytest.mark.parametrize("compensate", [True, False])
def test_modulated_layer_is_the_released_datapath(compensate):
  xs = smooth_trajectory()
  rng = np.random.default_rng(1)
  w, b = rng.normal(size=(16, 8)) / 4, rng.normal(size=8)
  got, _ = run_layer(inputs.Modulated(4, compensate=compensate), xs.astype(np.float32), w.astype(np.float32),
                     b.astype(np.float32))
  want = np_modiff_layer(xs.astype(np.float64), w, b, 4, compensate)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  np.testing.assert_allclose(got[0], xs[0] @ w + b, rtol=1e-5, atol=1e-5)  # the warm-up call is float


def test_late_steps_quantize_the_differences_at_late_bits():
  xs = smooth_trajectory(steps=6)
  rng = np.random.default_rng(1)
  w, b = rng.normal(size=(16, 8)) / 4, rng.normal(size=8)
  part = inputs.Modulated(3, late_bits=6, late_from=4)
  got, _ = run_layer(part, xs.astype(np.float32), w.astype(np.float32), b.astype(np.float32))
  want = np_modiff_layer(xs.astype(np.float64), w, b, [32, 3, 3, 3, 6, 6])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  assert [part.step_bits(i == 0, i) for i in range(6)] == [32, 3, 3, 3, 6, 6]
  with pytest.raises(ValueError, match="late_from"):
    inputs.Modulated(3, late_bits=6)
  with pytest.raises(ValueError, match="per-step ranges"):
    inputs.Modulated(3, "static", late_bits=6, late_from=2)


@pytest.mark.parametrize("bits", [3, 8])
def test_reconstruction_stays_within_half_a_quantization_step(bits):
  """Sigma-delta: with compensation x_hat_t - x_t is the rounding error of Q(x_t - x_hat_{t-1}) alone, so every
  entry stays within half that step's quantizer step (numpy on the layer's own outputs; identity weight); at 8
  bits the outputs are float activations up to that bound."""
  xs = smooth_trajectory(steps=12).astype(np.float32)
  eye, zero = np.eye(16, dtype=np.float32), np.zeros(16, np.float32)
  got, _ = run_layer(inputs.Modulated(bits), xs, eye, zero)
  for t in range(1, len(xs)):
    d = xs[t] - got[t - 1]
    step = (max(d.max(), 0.0) - min(d.min(), 0.0)) / (2 ** bits - 1)
    assert np.abs(got[t] - xs[t]).max() <= 0.5 * step * 1.001 + 1e-6
  if bits == 8:
    np.testing.assert_allclose(got, xs, atol=0.01 * np.abs(xs).max())


def test_error_compensation_keeps_the_error_bounded():
  xs = smooth_trajectory(steps=30)
  rng = np.random.default_rng(2)
  w, b = rng.normal(size=(16, 8)) / 4, np.zeros(8)
  exact = xs @ w + b
  err = {}
  for compensate in (True, False):
    got, _ = run_layer(inputs.Modulated(3, compensate=compensate), xs.astype(np.float32), w.astype(np.float32),
                       b.astype(np.float32))
    err[compensate] = np.linalg.norm((got - exact).reshape(len(xs), -1), axis=1) / np.linalg.norm(
        exact.reshape(len(xs), -1), axis=1)
  direct = np.linalg.norm(np_minmax_quant(xs, 3, (1, 2, 3)) @ w - xs @ w) / np.linalg.norm(xs @ w)
  assert err[True][-10:].max() < 0.5 * direct          # compensated: well below direct 3-bit quantization
  assert err[False][-1] > 3 * err[True][-1]             # without compensation the errors accumulate
  assert err[False][-1] > err[False][5]


def test_granularity_and_warmup_bits():
  xs = smooth_trajectory(steps=3).astype(np.float32)
  w, b = np.eye(16, dtype=np.float32), np.zeros(16, np.float32)
  got, state = run_layer(inputs.Modulated(4, granularity="token", warmup_bits=8), xs, w, b)
  np.testing.assert_allclose(got[0], np_minmax_quant(xs[0], 8, (2,)), rtol=1e-5, atol=1e-6)
  want1 = got[0] + np_minmax_quant(xs[1] - got[0], 4, (2,))
  np.testing.assert_allclose(got[1], want1, rtol=1e-5, atol=1e-5)
  assert state["started"].shape == (3, 1, 1) and set(state) == {"x_hat", "started"}


def test_static_modulated_ranges_come_from_the_fp_increments():
  cfg, params, cal = tiny_setup()
  table = (("blocks_*", spec_lib.LayerSpec(input=inputs.Modulated(4, "static", steps=len(cal.plan.steps)))),)
  quant, _ = calibrate.calibrate(cfg, {"params": params}, cal, table, parts=("input",))
  q = quant["blocks_0"]["mlp"]["fc1"]
  assert q["a_scale"].shape == (len(cal.plan.steps),) and np.all(np.asarray(q["a_scale"]) > 0)
  stats = calibrate.statistics(cfg, {"params": params}, (), cal, {"blocks_0/mlp/fc1": ("in_delta_min",
                                                                                       "in_delta_max")})
  s = stats["blocks_0/mlp/fc1"]
  xs = []
  for i in range(len(cal.plan.steps)):
    _, got = calibrate.capture_layers(dit.DiT(config=cfg), {"params": params}, *calibrate._model_batch(cal, i))
    xs.append(np.asarray(got["blocks_0/mlp/fc1"][0]))
  d = np.diff(np.stack(xs), axis=0).reshape(len(xs) - 1, -1, xs[0].shape[-1])
  np.testing.assert_allclose(s["in_delta_min"], d.min(axis=1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s["in_delta_max"], d.max(axis=1), rtol=1e-5, atol=1e-6)
  # the step-1 range covers that step's increments' span (at most the min-max span)
  span = (d[0].max() - min(d[0].min(), 0.0)) / 15
  assert float(q["a_scale"][1]) <= span * 1.0001 and np.isclose(q["a_scale"][0], q["a_scale"][1])
  # late_bits: the last steps' ranges are searched at their own (finer) grid, the earlier ones unchanged
  late = (("blocks_*", spec_lib.LayerSpec(input=inputs.Modulated(4, "static", steps=len(cal.plan.steps),
                                                                 late_bits=8, late_from=len(cal.plan.steps) - 1))),)
  q8 = calibrate.calibrate(cfg, {"params": params}, cal, late, parts=("input",))[0]["blocks_0"]["mlp"]["fc1"]
  np.testing.assert_array_equal(q8["a_scale"][:-1], q["a_scale"][:-1])
  assert float(q8["a_scale"][-1]) < 0.25 * float(q["a_scale"][-1])


def modiff_sample(cfg, params, mesh, part, n=8, rotate=False):
  table = (("blocks_*", spec_lib.LayerSpec(input=part, rotate=rotate)),)
  model = dit.DiT(config=cfg, specs=table)
  plan = plan_lib.make_plan(1000, "ddim6")
  quant = {"quant": calibrate.quant_template(cfg, table)} if rotate else {}  # rotation signs all +1
  v = jax.device_put({"params": params, **quant}, parallel.replicated(mesh))
  labels, ids = parallel.shard_batch((np.arange(n, dtype=np.int32) % cfg.num_classes, np.arange(n, dtype=np.int32)),
                                     mesh)
  fn = jax.jit(lambda v, y, i: sampler.sample(dit.model_fn(model), v, jax.random.key(0), y, i, plan=plan,
                                               shape=(cfg.input_size, cfg.input_size, cfg.in_channels),
                                               cfg_scale=3.0, null_class=cfg.num_classes,
                                               state=dit.init_state(model, v, 2 * y.shape[0])))
  return np.asarray(fn(v, labels, ids))


def test_modiff_sampler_on_8_devices_equals_1_device():
  if len(jax.devices()) < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  cfg, params, _ = tiny_setup()
  part = inputs.Modulated(4, granularity="sample")
  one = modiff_sample(cfg, params, parallel.make_mesh(1), part)
  eight = modiff_sample(cfg, params, parallel.make_mesh(8), part)
  np.testing.assert_allclose(one, eight, rtol=1e-5, atol=1e-5)
  plain = modiff_sample(cfg, params, parallel.make_mesh(1), inputs.Float())
  assert np.abs(one - plain).max() > 1e-4  # the 4-bit differences change the samples, so the check can fail


def test_a_modulated_layer_without_state_and_bad_settings_are_clear_errors():
  cfg, params, _ = tiny_setup()
  table = (("blocks_*", spec_lib.LayerSpec(input=inputs.Modulated(4))),)
  x = jnp.zeros((1, 32, 32, 1))
  with pytest.raises(ValueError, match="carries no modulation state"):
    dit.DiT(config=cfg, specs=table).apply({"params": params}, x, jnp.zeros(1, int), jnp.zeros(1, int))
  with pytest.raises(ValueError, match="Unknown MoDiff quantizer"):
    inputs.Modulated(4, "lsq")
  with pytest.raises(ValueError, match="Unknown MoDiff granularity"):
    inputs.Modulated(4, granularity="channel")
  with pytest.raises(ValueError, match="Unknown quant.act"):
    rules.input_part("rotate", 4, 20)
  spec = spec_lib.LayerSpec(input=inputs.Modulated(3, "static", "token", 20, False, 8))
  assert spec_lib.from_dict(spec_lib.to_dict(spec)) == spec


def test_distillation_carries_the_modulation_state_along_each_trajectory():
  """With every learning rate 0, the loop's per-step eps error equals that of the MoDiff model called in step order
  along the same FP trajectory from zero state (reference: sequential model_fn calls); state resets per trajectory."""
  from diffq import calibrate, distill
  cfg, params, cal = tiny_setup(num_images=8)
  table = (("*", rules.scalar_spec(8, 4, 4, lora_rank=2, act=inputs.Modulated(4))),)
  quant, _ = calibrate.calibrate(cfg, {"params": params}, cal, table)
  d = distill.Distiller(cfg, cal.plan, table, distill.DistillConfig(
      trajectories=2, images=8, trd_weight=0.0, lora_lr_divisor=1e30, w_quant_lr=0.0, a_quant_lr=0.0),
      cfg_scale=1.5)
  state, frozen = d.init_state(quant)
  mesh = parallel.make_mesh(1)
  fn = d.jit_step(mesh, state)
  losses = []
  for k in range(2 * len(cal.plan.steps)):
    x_T, y = d.trajectory_inputs(k // len(cal.plan.steps))
    state, m = fn(state, frozen, params, *parallel.shard_batch((x_T, y), mesh))
    losses.append(float(m["mse"]))
  fp_fn, q_fn = dit.model_fn(dit.DiT(config=cfg)), dit.model_fn(dit.DiT(config=cfg, specs=table))
  v = {"params": params, "quant": quant}
  for j in range(2):
    x_T, y = d.trajectory_inputs(j)
    x, st = jnp.asarray(x_T), dit.init_state(dit.DiT(config=cfg, specs=table), v, 16)
    for i, (step, t_model) in enumerate(zip(cal.plan.steps, cal.plan.model_timesteps)):
      t = jnp.full((8,), int(t_model))
      ctx = plan_lib.StepContext(i)
      fp, _ = sampler.guided(fp_fn, {"params": params}, {}, x, t, jnp.asarray(y), ctx, 1.5, 10)
      q, st = sampler.guided(q_fn, v, st, x, t, jnp.asarray(y), ctx, 1.5, 10)
      want = float(np.sum((np.asarray(q) - np.asarray(fp))[..., :1] ** 2))
      np.testing.assert_allclose(losses[j * len(cal.plan.steps) + i], want, rtol=2e-3)
      x = sampler.denoise_step(cal.plan.schedule, "ddim", 0.0, fp, x, jnp.int32(step), jnp.zeros_like(x))


def test_bitops_count_the_warmup_step_in_float_and_the_differences_at_their_bits():
  """Reference: per-layer MACs (flops.dit_layer_macs) x weight bits x activation bits, summed by hand: W4 body
  linears with 4-bit differences after a float first step, W8A8 boundary layers, float attention products."""
  from diffq.eval import flops
  cfg, _, _ = tiny_setup()
  plan = plan_lib.make_plan(1000, "ddim5")
  table = (("x_embedder", rules.scalar_spec(8, 8, 5)), ("t_embedder/*", rules.scalar_spec(8, 8, 5)),
           ("final_layer/*", rules.scalar_spec(8, 8, 5)), ("*", rules.scalar_spec(4, 4, 5, act=inputs.Modulated(4))))
  macs = flops.dit_layer_macs(cfg)
  want = 0
  for step in range(5):
    for path, m in macs.items():
      if path.endswith(flops.ATTENTION_PRODUCTS):
        want += m * 32 * 32
      elif path.startswith(("x_embedder", "t_embedder", "final_layer")):
        want += m * 8 * 8
      else:
        want += m * 4 * (32 if step == 0 else 4)
  assert flops.bitops_per_image(cfg, plan, 3.0, table) == 2 * want
  assert flops.bitops_per_image(cfg, plan, 1.0, ()) == 5 * sum(macs.values()) * 32 * 32
  with pytest.raises(ValueError, match="per-channel"):
    flops.bitops_per_image(cfg, plan, 1.0, (("*", rules.scalar_spec(3, 4, 5, mixed=True)),))
