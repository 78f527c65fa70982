"""Gaussian diffusion of DiT/ADM: linear betas, q_sample, learned-range variance, hybrid loss.

Schedule arrays are computed in float64 numpy (as ADM does) and become float32 constants under jit.
Timesteps `t` are always indices into the schedule the arrays were built for.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


def linear_betas(num_steps: int = 1000) -> np.ndarray:
  """beta_t = linspace(1e-4, 0.02) scaled by 1000/T (ADM `get_named_beta_schedule('linear')`)."""
  scale = 1000 / num_steps
  return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
  """Derived quantities of a beta schedule; `timestep_map[i]` is the model-facing (original) index of step i."""
  betas: np.ndarray
  timestep_map: np.ndarray

  @classmethod
  def from_betas(cls, betas, timestep_map=None):
    betas = np.asarray(betas, np.float64)
    if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
      raise ValueError("betas must be a 1-D array with values in (0, 1].")
    tmap = np.arange(len(betas)) if timestep_map is None else np.asarray(timestep_map)
    return cls(betas=betas, timestep_map=tmap.astype(np.int32))

  @property
  def num_steps(self) -> int:
    return len(self.betas)

  @property
  def alphas_cumprod(self):
    return np.cumprod(1.0 - self.betas)

  @property
  def alphas_cumprod_prev(self):
    return np.append(1.0, self.alphas_cumprod[:-1])

  @property
  def posterior_variance(self):
    return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

  @property
  def posterior_log_variance_clipped(self):
    v = self.posterior_variance
    return np.log(np.append(v[1], v[1:]))

  @property
  def posterior_mean_coef1(self):
    return self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

  @property
  def posterior_mean_coef2(self):
    return (1.0 - self.alphas_cumprod_prev) * np.sqrt(1.0 - self.betas) / (1.0 - self.alphas_cumprod)


def _take(arr: np.ndarray, t, ndim: int):
  v = jnp.asarray(arr, jnp.float32)[t]
  return v.reshape(v.shape + (1,) * (ndim - 1))


def q_sample(s: Schedule, x0, t, noise):
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
  acp = s.alphas_cumprod
  return _take(np.sqrt(acp), t, x0.ndim) * x0 + _take(np.sqrt(1 - acp), t, x0.ndim) * noise


def predict_x0_from_eps(s: Schedule, xt, t, eps):
  acp = s.alphas_cumprod
  return _take(np.sqrt(1 / acp), t, xt.ndim) * xt - _take(np.sqrt(1 / acp - 1), t, xt.ndim) * eps


def predict_eps_from_x0(s: Schedule, xt, t, x0):
  acp = s.alphas_cumprod
  return (_take(np.sqrt(1 / acp), t, xt.ndim) * xt - x0) / _take(np.sqrt(1 / acp - 1), t, xt.ndim)


def q_posterior(s: Schedule, x0, xt, t):
  """Mean and clipped log-variance of q(x_{t-1} | x_t, x0)."""
  mean = _take(s.posterior_mean_coef1, t, xt.ndim) * x0 + _take(s.posterior_mean_coef2, t, xt.ndim) * xt
  return mean, _take(s.posterior_log_variance_clipped, t, xt.ndim)


def p_mean_variance(s: Schedule, model_out, xt, t, clip_x0: bool = False):
  """Learned-range variance: model_out = [eps, v] on the channel axis; log var interpolates beta and beta~.

  Returns dict(mean, log_variance, pred_x0, eps).
  """
  c = xt.shape[-1]
  if model_out.shape[-1] != 2 * c:
    raise ValueError(f"Expected model output with 2C={2 * c} channels (learned sigma); got {model_out.shape[-1]}.")
  eps, v = model_out[..., :c], model_out[..., c:]
  min_log = _take(s.posterior_log_variance_clipped, t, xt.ndim)
  max_log = _take(np.log(s.betas), t, xt.ndim)
  frac = (v + 1) / 2
  log_var = frac * max_log + (1 - frac) * min_log
  x0 = predict_x0_from_eps(s, xt, t, eps)
  if clip_x0:
    x0 = jnp.clip(x0, -1, 1)
  mean, _ = q_posterior(s, x0, xt, t)
  return dict(mean=mean, log_variance=log_var, pred_x0=x0, eps=eps)


def normal_kl(mean1, logvar1, mean2, logvar2):
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def _approx_std_normal_cdf(x):
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """Log-likelihood of data in [-1, 1] discretized to 256 bins (ADM)."""
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  cdf_delta = cdf_plus - cdf_min
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, jnp.log(jnp.maximum(cdf_delta, 1e-12))))


def _mean_flat(x):
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def training_losses(s: Schedule, model_fn, x0, t, noise):
  """DiT's hybrid loss per example: MSE(eps) + VB (bits/dim) with the mean prediction stop-gradiented.

  model_fn(x_t, t) -> (N, H, W, 2C). Returns dict(loss, mse, vb), each (N,).
  """
  xt = q_sample(s, x0, t, noise)
  out = model_fn(xt, t)
  c = x0.shape[-1]
  eps = out[..., :c]
  frozen = jnp.concatenate([jax.lax.stop_gradient(eps), out[..., c:]], axis=-1)
  p = p_mean_variance(s, frozen, xt, t)
  true_mean, true_log_var = q_posterior(s, x0, xt, t)
  kl = _mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2.0)
  nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])) / math.log(2.0)
  vb = jnp.where(t == 0, nll, kl)
  mse = _mean_flat((noise - eps) ** 2)
  return dict(loss=mse + vb, mse=mse, vb=vb)
