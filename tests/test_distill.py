import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffq import calibrate, distill, parallel, plan as plan_lib, sampler
from diffq.models import dit
from diffq.seam import rules

from tests.test_calibrate import tiny_setup


def np_relation_kl(f_fp, f_q):
  """Slow reference: per image, per row, KL between softmaxes of token cosine similarities."""
  total = 0.0
  for a, b in zip(np.asarray(f_fp, np.float64), np.asarray(f_q, np.float64)):
    sims = [(f / np.linalg.norm(f, axis=1, keepdims=True)) @ (f / np.linalg.norm(f, axis=1, keepdims=True)).T
            for f in (a, b)]
    p, q = [np.exp(s) / np.exp(s).sum(1, keepdims=True) for s in sims]
    total += np.sum(p * np.log(p / q))
  return total


def test_relation_kl_matches_numpy_and_is_zero_for_equal_features():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(3, 5, 4)), rng.normal(size=(3, 5, 4))
  np.testing.assert_allclose(distill.relation_kl(jnp.asarray(a), jnp.asarray(b)), np_relation_kl(a, b), rtol=1e-4)
  assert abs(float(distill.relation_kl(jnp.asarray(a), jnp.asarray(2 * a)))) < 1e-6  # scale-invariant


@pytest.fixture(scope="module")
def setup():
  cfg, params, cal = tiny_setup(num_images=8)
  pol = rules.scalar_spec(2, 4, 4, smooth=True, lora_rank=4)
  table = (("x_embedder", rules.scalar_spec(8, 8, 4)), ("*", pol))
  quant, _ = calibrate.calibrate(cfg, {"params": params}, cal, table)
  return cfg, params, cal.plan, table, quant


def make(setup, hooks=None, **kw):
  cfg, params, plan, table, quant = setup
  d = distill.Distiller(cfg, plan, table, distill.DistillConfig(trajectories=2, images=8, **kw), cfg_scale=1.5,
                        **(hooks or {}))
  state, frozen = d.init_state(quant)
  return d, state, frozen, params


def run_steps(d, state, frozen, params, n, mesh):
  fn = d.jit_step(mesh, state)
  rep = parallel.replicated(mesh)
  state, frozen, params = jax.device_put((state, frozen, params), rep)
  out = []
  for _ in range(n):
    x_T, y = d.trajectory_inputs(int(state["step"]) // len(d.plan.steps))
    state, metrics = fn(state, frozen, params, *parallel.shard_batch((x_T, y), mesh))
    out.append(jax.device_get(metrics))
  return jax.device_get(state), out


def test_first_step_loss_is_the_eps_error_of_the_guided_models(setup):
  d, state, frozen, params = make(setup, trd_weight=0.0)
  cfg, _, plan, table, quant = setup
  x_T, y = d.trajectory_inputs(0)
  _, (m,) = run_steps(d, state, frozen, params, 1, parallel.make_mesh(1))
  t = jnp.full((8,), int(plan.model_timesteps[0]))
  ctx = plan_lib.StepContext(0)
  fp, _ = sampler.guided(dit.model_fn(dit.DiT(config=cfg)), {"params": params}, {}, x_T, t, y, ctx, 1.5, 10)
  q, _ = sampler.guided(dit.model_fn(dit.DiT(config=cfg, specs=table)), {"params": params, "quant": quant}, {},
                        x_T, t, y, ctx, 1.5, 10)
  np.testing.assert_allclose(m["mse"], np.sum((np.asarray(q) - np.asarray(fp))[..., :1] ** 2), rtol=1e-4)
  assert m["loss"] == m["mse"]


def test_only_lora_layers_train_with_the_spec_learning_rates(setup):
  d, state, frozen, _ = make(setup)
  keys = set(state["quant"])
  assert not any(k.startswith("x_embedder/") for k in keys)  # 8-bit boundary: frozen
  assert {"blocks_0/attn/qkv/lora_a", "blocks_0/attn/qkv/a_scale", "blocks_0/attn/qkv/w_zero"} <= keys
  assert "blocks_0/attn/qkv/smooth" in frozen
  w_scale = np.asarray(state["quant"]["blocks_0/attn/qkv/w_scale"])
  assert d._lrs["blocks_0/attn/qkv/lora_b"] == pytest.approx(w_scale.mean() / 2500)
  assert d._lrs["blocks_0/attn/qkv/a_zero"] == 5e-4 and d._lrs["blocks_0/attn/qkv/w_scale"] == 1e-6


def test_detached_trd_has_no_gradient_and_current_trd_does(setup):
  """Step 2 closes the first TRD window. Released behaviour (trd_grad='none') trains exactly as without TRD."""
  mesh = parallel.make_mesh(1)
  runs = {k: run_steps(*make(setup, **kw), 2, mesh) for k, kw in
          {"off": dict(trd_weight=0.0), "none": dict(trd_grad="none"), "current": dict()}.items()}
  a, b, c = (runs[k][0]["quant"] for k in ("off", "none", "current"))
  for k in a:  # 'none' differentiates the loss of 'off' itself: identical by construction, on every machine
    np.testing.assert_array_equal(b[k], a[k], err_msg=k)
  # 'current' moves parameters far beyond float32 round-off of their own scale
  moved = max(float(np.abs(a[k] - c[k]).max() / max(np.abs(a[k]).max(), 1e-30)) for k in a)
  assert moved > 1e3 * np.finfo(np.float32).eps
  assert runs["none"][1][1]["trd"] > 0 and runs["none"][1][0]["loss"] == runs["none"][1][0]["mse"]


def test_distillation_on_8_devices_equals_1_device(setup):
  s1, m1 = run_steps(*make(setup), 3, parallel.make_mesh(1))
  s8, m8 = run_steps(*make(setup), 3, parallel.make_mesh(8))
  for k in s1["quant"]:
    np.testing.assert_allclose(s8["quant"][k], s1["quant"][k], rtol=1e-5, atol=1e-7, err_msg=k)
  np.testing.assert_allclose([m["loss"] for m in m8], [m["loss"] for m in m1], rtol=1e-5)


def test_bad_settings_are_refused(setup):
  with pytest.raises(ValueError, match="trd_grad"):
    distill.DistillConfig(trd_grad="window")
  cfg, params, plan, _, quant = setup
  with pytest.raises(ValueError, match="eta"):
    distill.Distiller(cfg, plan, (), distill.DistillConfig(), cfg_scale=1.5, eta=1.0)
  no_lora = (("*", rules.scalar_spec(2, 4, 4)),)
  q, _ = calibrate.calibrate(cfg, {"params": params}, calibrate.CalibrationSet(
      jnp.zeros((4, 2, 32, 32, 1)), jnp.arange(2), plan, 1.0, 10), no_lora)
  with pytest.raises(ValueError, match="lora_rank"):
    distill.Distiller(cfg, plan, no_lora, distill.DistillConfig(), cfg_scale=1.5).init_state(q)


def test_hooks_run_after_every_update_and_at_every_trajectory_start(setup):
  """post_update sees the updated leaves (here: it pins lora_b to zero); trajectory_start runs before step 0 of each
  trajectory only (here: it counts trajectories in a_zero of one layer)."""
  key = "blocks_0/attn/qkv/lora_b"
  pin = lambda train, opt, step: ({**train, key: jnp.zeros_like(train[key])}, opt)
  mark = lambda train, opt, j: ({**train, "blocks_1/mlp/fc2/a_zero": train["blocks_1/mlp/fc2/a_zero"] + 100.0}, opt)
  d, state, frozen, params = make(setup, dict(post_update=pin, trajectory_start=mark), a_quant_lr=0.0)
  s0 = np.asarray(state["quant"]["blocks_1/mlp/fc2/a_zero"])
  state, _ = run_steps(d, state, frozen, params, 5, parallel.make_mesh(1))  # steps 0..4: trajectories 0 and 1
  assert not np.any(state["quant"][key])
  np.testing.assert_allclose(state["quant"]["blocks_1/mlp/fc2/a_zero"], s0 + 200.0, rtol=1e-6)
  plain, _ = run_steps(*make(setup), 1, parallel.make_mesh(1))
  assert np.any(plain["quant"][key])  # without the hook, LoRA B moves off zero


def test_loss_terms_and_config_from_a_config_block():
  terms = distill.loss_terms(distill.DistillConfig(trd_weight=7.0, trd_grad="none"), channels=1)
  assert [(t.name, t.weight, t.grad_weight) for t in terms] == [("mse", 1.0, 1.0), ("trd", 7.0, 0.0)]
  cfg = distill.DistillConfig.from_config(dict(trajectories=3, log_every=5), ignore=("log_every",))
  assert cfg.trajectories == 3
  with pytest.raises(ValueError, match="Unknown distillation settings \\['trajectorie'\\]"):
    distill.DistillConfig.from_config(dict(trajectorie=3))


def test_default_loop_is_wave_1s():
  """The remedies are off by default: no extra state, no clipping, teacher forcing, the raw sum MSE."""
  cfg = distill.DistillConfig()
  assert (cfg.loss_norm, cfg.grad_clip, cfg.trajectory) == ("none", 0.0, "fp")
  with pytest.raises(ValueError, match="loss_norm"):
    distill.DistillConfig(loss_norm="max")
  with pytest.raises(ValueError, match="trajectory"):
    distill.DistillConfig(trajectory="ddpm")
  with pytest.raises(ValueError, match="grad_clip"):
    distill.DistillConfig(grad_clip=-1.0)


def test_grad_clip_feeds_adam_the_clipped_gradient():
  """Adam's first moment after one update is (1 - b1) g: with grad_clip, g is rescaled to the clip norm first."""
  g = {"a": jnp.full((3,), 10.0), "b": jnp.full((4,), -5.0)}
  norm = float(np.sqrt(3 * 100 + 4 * 25))
  lrs = {"a": 1e-3, "b": 1e-3}
  for clip, scale in ((0.0, 1.0), (1.0, 1.0 / norm), (1e6, 1.0)):
    opt = distill.make_optimizer(lrs, distill.DistillConfig(grad_clip=clip), total_steps=10)
    params = {k: jnp.ones_like(v) for k, v in g.items()}
    _, st = opt.update(g, opt.init(params), params)
    mu = (st[1] if clip else st)[0].mu  # chain(clip, the adamw chain) or the adamw chain
    for k in g:
      np.testing.assert_allclose(mu[k], 0.1 * scale * np.asarray(g[k]), rtol=1e-5, err_msg=f"{clip} {k}")


def test_loss_norm_divides_the_differentiated_mse(setup):
  """Step 0 (same state): the gradient norm of 'mean' is that of 'none' / element count, of 'running' / the MSE;
  the running scale is the per-position EMA of the logged MSE over trajectories (first visit: the MSE itself)."""
  mesh = parallel.make_mesh(1)
  _, (m_none,) = run_steps(*make(setup, trd_weight=0.0), 1, mesh)
  _, (m_mean,) = run_steps(*make(setup, trd_weight=0.0, loss_norm="mean"), 1, mesh)
  state, ms = run_steps(*make(setup, trd_weight=0.0, loss_norm="running", loss_norm_decay=0.75), 8, mesh)
  _, (m_x,) = run_steps(*make(setup, trd_weight=0.0, loss_norm="x_prev"), 1, mesh)
  gain = distill.ddim_eps_gain(setup[2])
  np.testing.assert_allclose(m_x["grad_norm"], m_none["grad_norm"] * gain[0] ** 2, rtol=1e-4)
  np.testing.assert_allclose(m_mean["grad_norm"] * 8 * 32 * 32, m_none["grad_norm"], rtol=1e-4)
  np.testing.assert_allclose(ms[0]["grad_norm"] * ms[0]["mse"], m_none["grad_norm"], rtol=1e-4)
  assert m_mean["mse"] == m_none["mse"] == ms[0]["mse"]  # the logged MSE stays the raw sum
  mse = np.array([m["mse"] for m in ms]).reshape(2, 4)
  np.testing.assert_allclose(state["loss_scale"], 0.75 * mse[0] + 0.25 * mse[1], rtol=1e-5)


def test_quant_trajectory_advances_x_with_the_quantized_output(setup):
  """trajectory='quant': x_1 = DDIM(x_T, quantized guided output before the update); 'fp': the FP output."""
  cfg, params, plan, table, quant = setup
  mesh = parallel.make_mesh(1)
  d, state, frozen, _ = make(setup, trajectory="quant")
  x_T, y = d.trajectory_inputs(0)
  s_q, _ = run_steps(d, state, frozen, params, 1, mesh)
  s_fp, _ = run_steps(*make(setup), 1, mesh)
  t = jnp.full((8,), int(plan.model_timesteps[0]))
  ctx = plan_lib.StepContext(0)
  fp, _ = sampler.guided(dit.model_fn(dit.DiT(config=cfg)), {"params": params}, {}, x_T, t, y, ctx, 1.5, 10)
  q, _ = sampler.guided(dit.model_fn(dit.DiT(config=cfg, specs=table)), {"params": params, "quant": quant}, {},
                        x_T, t, y, ctx, 1.5, 10)
  ddim = lambda out: np.asarray(sampler.denoise_step(plan.schedule, "ddim", 0.0, out, jnp.asarray(x_T),
                                                     plan.steps[0], jnp.zeros_like(x_T)))
  np.testing.assert_allclose(s_q["x"], ddim(q), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(s_fp["x"], ddim(fp), rtol=1e-4, atol=1e-5)
  assert np.abs(ddim(q) - ddim(fp)).max() > 1e-3  # the two modes differ here
  assert "loss_scale" not in s_fp


def test_ddim_eps_gain_is_the_derivative_of_the_ddim_step(setup):
  """Independent reference: jvp of sampler.denoise_step along the eps channels, at every plan position."""
  plan = setup[2]
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
  out = jax.random.normal(jax.random.key(1), (2, 4, 4, 2))
  direction = jnp.concatenate([jnp.ones_like(x), jnp.zeros_like(x)], -1)
  for i, t in enumerate(plan.steps):
    step = lambda o: sampler.denoise_step(plan.schedule, "ddim", 0.0, o, x, t, jnp.zeros_like(x))
    _, dx = jax.jvp(step, (out,), (direction,))
    np.testing.assert_allclose(np.asarray(dx), distill.ddim_eps_gain(plan)[i], rtol=1e-4, err_msg=str(i))


def test_branch_loss_is_the_eps_error_of_the_uncombined_rows(setup):
  """loss_on='branches': sum of the squared eps error over the cond and uncond rows of the CFG batch."""
  d, state, frozen, params = make(setup, trd_weight=0.0, loss_on="branches")
  cfg, _, plan, table, quant = setup
  x_T, y = d.trajectory_inputs(0)
  _, (m,) = run_steps(d, state, frozen, params, 1, parallel.make_mesh(1))
  t = jnp.full((8,), int(plan.model_timesteps[0]))
  batch = sampler.cfg_batch(jnp.asarray(x_T), t, jnp.asarray(y), 10)
  fp = dit.DiT(config=cfg).apply({"params": params}, *batch)
  q = dit.DiT(config=cfg, specs=table).apply({"params": params, "quant": quant}, *batch,
                                             ctx=plan_lib.StepContext(0))
  np.testing.assert_allclose(m["mse"], np.sum((np.asarray(q) - np.asarray(fp))[..., :1] ** 2), rtol=1e-4)
