import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffq import plan as plan_lib, sampler
from diffq.diffusion import gaussian, respace


def base():
  return gaussian.Schedule.from_betas(gaussian.linear_betas(1000))


def test_linear_betas_endpoints():
  b = gaussian.linear_betas(1000)
  assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02) and len(b) == 1000


def test_respacing_maps_original_indices():
  kept = respace.space_timesteps(1000, "ddim20")
  assert kept == list(range(0, 1000, 50))
  s = respace.respace(base(), kept)
  np.testing.assert_array_equal(s.timestep_map, kept)
  # the respaced process has the same marginals q(x_t | x_0) at every kept step
  np.testing.assert_allclose(s.alphas_cumprod, base().alphas_cumprod[kept], rtol=1e-12)
  assert respace.space_timesteps(1000, "250")[:3] == [0, 4, 8]
  assert len(respace.space_timesteps(1000, "10,15,20")) == 45
  plan = plan_lib.make_plan(1000, "ddim20")
  np.testing.assert_array_equal(plan.model_timesteps, kept[::-1])


def test_respacing_bad_input():
  with pytest.raises(ValueError, match="exactly 7 DDIM steps"):
    respace.space_timesteps(10, "ddim7")
  with pytest.raises(ValueError, match="Cannot take"):
    respace.space_timesteps(10, "20")


def test_posterior_matches_numpy_reference():
  s = base()
  acp = np.cumprod(1 - s.betas)
  t = 500
  coef1 = s.betas[t] * np.sqrt(acp[t - 1]) / (1 - acp[t])
  coef2 = (1 - acp[t - 1]) * np.sqrt(1 - s.betas[t]) / (1 - acp[t])
  var = s.betas[t] * (1 - acp[t - 1]) / (1 - acp[t])
  x0, xt = np.float32(0.3), np.float32(-1.2)
  mean, logv = gaussian.q_posterior(s, jnp.full((1, 1), x0), jnp.full((1, 1), xt), jnp.array([t]))
  np.testing.assert_allclose(mean[0, 0], coef1 * x0 + coef2 * xt, rtol=1e-5)
  np.testing.assert_allclose(logv[0, 0], np.log(var), rtol=1e-5)


def test_discretized_likelihood_matches_scipy():
  x = np.array([-1.0, -0.2, 0.5, 1.0], np.float32)
  mean, log_scale = np.float32(0.1), np.float32(np.log(0.8))
  ll = np.asarray(gaussian.discretized_gaussian_log_likelihood(jnp.asarray(x), mean, log_scale))
  sd = 0.8  # within ~2 sd, where the tanh CDF approximation is accurate
  ref = np.log(np.array([stats.norm.cdf((-1 + 1 / 255 - 0.1) / sd),
                         stats.norm.cdf((-0.2 + 1 / 255 - 0.1) / sd) - stats.norm.cdf((-0.2 - 1 / 255 - 0.1) / sd),
                         stats.norm.cdf((0.5 + 1 / 255 - 0.1) / sd) - stats.norm.cdf((0.5 - 1 / 255 - 0.1) / sd),
                         1 - stats.norm.cdf((1 - 1 / 255 - 0.1) / sd)]))
  np.testing.assert_allclose(ll, ref, rtol=2e-3)  # ADM's tanh approximation of the normal CDF


def test_vb_does_not_train_the_mean():
  """DiT's hybrid loss: the VB term's gradient reaches only the variance channels."""
  s = base()
  x0 = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  t = jnp.array([10, 600])

  def vb_of(out):
    return jnp.sum(gaussian.training_losses(s, lambda xt, tt: out, x0, t, noise)["vb"])

  g = jax.grad(vb_of)(jax.random.normal(jax.random.key(2), (2, 4, 4, 2)))
  assert np.all(np.asarray(g[..., 0]) == 0) and np.any(np.asarray(g[..., 1]) != 0)


def _toy_eps(params, x, t, y, step=0):
  """A deterministic stand-in eps-model: depends on x, t, y and the plan position `step`, outputs 2C channels."""
  h = jnp.tanh(x * params["w"] + t[:, None, None, None] / 1000.0 + y[:, None, None, None] / 10.0 + 0.05 * step)
  return jnp.concatenate([h, 0.5 * h], axis=-1)


def _toy_model(variables, state, x, t, y, ctx):
  """`_toy_eps` under the sampler's contract (stateless)."""
  return _toy_eps(variables, x, t, y, ctx.index), state


def _run(ids, labels, key=0, eta=0.0, method="ddim", cfg=1.0, clip=False):
  plan = plan_lib.make_plan(1000, "ddim10")
  return np.asarray(sampler.sample(_toy_model, {"w": 0.7}, jax.random.key(key), jnp.asarray(labels),
                                   jnp.asarray(ids), plan=plan, shape=(4, 4, 1), method=method, eta=eta,
                                   cfg_scale=cfg, null_class=10, clip_x0=clip))


def test_ddim_eta0_is_deterministic_given_x_T():
  """eta=0: the trajectory is a function of x_T only; step noise (keyed by sample id) plays no role."""
  s = plan_lib.make_plan(1000, "ddim10").schedule
  x = jax.random.normal(jax.random.key(0), (3, 4, 4, 1))
  out = _toy_eps({"w": 0.7}, x, jnp.full((3,), 500), jnp.zeros(3, jnp.int32))
  a = sampler.denoise_step(s, "ddim", 0.0, out, x, 5, jax.random.normal(jax.random.key(1), x.shape))
  b = sampler.denoise_step(s, "ddim", 0.0, out, x, 5, jax.random.normal(jax.random.key(2), x.shape))
  np.testing.assert_array_equal(a, b)
  c = sampler.denoise_step(s, "ddim", 1.0, out, x, 5, jax.random.normal(jax.random.key(2), x.shape))
  assert np.abs(np.asarray(a - c)).max() > 1e-3
  np.testing.assert_array_equal(_run([0, 1, 2], [0, 1, 2]), _run([0, 1, 2], [0, 1, 2]))


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_eta0_matches_numpy_reference(clip):
  """A slow numpy DDIM (DDIM paper eq. 12, eta=0; ADM clip_denoised optional) over the same respaced schedule."""
  plan = plan_lib.make_plan(1000, "ddim10")
  acp = plan.schedule.alphas_cumprod
  x = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(3), 5), (4, 4, 1)))[None]
  for position, i in enumerate(plan.steps):
    t_model = plan.schedule.timestep_map[i]
    eps = np.asarray(_toy_eps({"w": 0.7}, jnp.asarray(x), jnp.array([t_model]), jnp.array([2]), position))[..., :1]
    x0 = (x - np.sqrt(1 - acp[i]) * eps) / np.sqrt(acp[i])
    if clip:
      x0 = np.clip(x0, -1, 1)
      eps = (x - np.sqrt(acp[i]) * x0) / np.sqrt(1 - acp[i])
    prev = acp[i - 1] if i > 0 else 1.0
    x = np.sqrt(prev) * x0 + np.sqrt(1 - prev) * eps
  np.testing.assert_allclose(_run([5], [2], key=3, clip=clip), x, rtol=1e-4, atol=1e-4)


def test_samples_do_not_depend_on_batch_composition():
  both = _run([4, 9], [1, 3], eta=1.0, method="ddpm", cfg=2.0)
  alone = _run([9], [3], eta=1.0, method="ddpm", cfg=2.0)
  np.testing.assert_allclose(both[1:], alone, rtol=1e-6, atol=1e-6)


def test_unknown_method_and_kind():
  with pytest.raises(ValueError, match="Unknown sampling method"):
    _run([0], [0], method="euler")
  with pytest.raises(ValueError, match="Unknown step kinds"):
    plan_lib.StepPlan(schedule=base(), steps=(1, 0), kinds=("full", "warp"))


@pytest.mark.parametrize("cfg_channels", [0, 3])
def test_guidance_on_the_first_channels_is_dits_forward_with_cfg(cfg_channels):
  """cfg_channels=3 reproduces facebookresearch/DiT's forward_with_cfg (written out in numpy from its models.py:
  eps, rest = out[:, :3], out[:, 3:]; guided eps on both halves, then the conditional half); 0 guides all."""
  rng = np.random.default_rng(0)
  out = rng.normal(size=(4, 2, 2, 8)).astype(np.float32)  # [cond; uncond] rows, 4 eps + 4 sigma channels
  model_fn = lambda v, s, x, t, y, ctx: (jnp.asarray(out), s)
  x = jnp.zeros((2, 2, 2, 4))
  got, _ = sampler.guided(model_fn, {}, {}, x, jnp.zeros(2, jnp.int32), jnp.zeros(2, jnp.int32),
                          plan_lib.StepContext(), 1.5, 10, cfg_channels)
  c = cfg_channels or 4
  eps, rest = out[..., :c], out[..., c:]
  cond_eps, uncond_eps = np.split(eps, 2)
  half = uncond_eps + 1.5 * (cond_eps - uncond_eps)
  ref = np.concatenate([np.concatenate([half, half]), rest], axis=-1)[:2]
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6)
