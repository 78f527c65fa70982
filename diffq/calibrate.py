"""Data-free post-training calibration of fake-quant DiT layers.

1. `fp_trajectory`: (x_t, t, y) tuples from the FP model's own sampling trajectory (the calibration set).
2. `capture_layer_inputs`: the input of every seam Linear for one batch (traced, so it runs under jit on a
   sharded batch; reductions over the batch become cross-device all-reduces).
3. `mse_range`: LAPQ-style range search (MPQ-DM / Q-Diffusion): shrink [min, max] by (1 - 0.01 i), i < 80,
   and keep the candidate minimising mean |x - Q(x)|^2.4 -- per output channel for weights, per tensor for
   activations.
4. `calibrate`: weight quantizers per layer, SmoothQuant pre-scales, activation quantizers per sampling step
   (indexed by the step, never by a counter); returns the model's `quant` collection.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffq import plan as plan_lib, sampler
from diffq.models import dit, layers
from diffq.quant import omq, ops

NUM_CANDIDATES = 80
NORM_P = 2.4


def fp_trajectory(model_fn: Callable, variables, key, labels, plan: plan_lib.StepPlan, shape, cfg_scale: float,
                  null_class: int, eta: float = 0.0, clip_x0: bool = False):
  """Model inputs of every step of the FP sampler: xs (S, N, *shape); the labels and plan give y and t."""
  ids = jnp.arange(labels.shape[0])
  _, xs = sampler.sample(model_fn, variables, key, labels, ids, plan=plan, shape=shape, method="ddim", eta=eta,
                         cfg_scale=cfg_scale, null_class=null_class, clip_x0=clip_x0, return_trajectory=True)
  return xs


def capture_layer_inputs(model: nn.Module, variables: dict, x, t, y, ctx=None) -> tuple[jax.Array, dict]:
  """(model output, {layer path: input of that seam Linear}) for one forward pass at step `ctx`."""
  captured = {}

  def grab(next_fun, args, kwargs, context):
    if isinstance(context.module, layers.Linear) and context.method_name == "__call__":
      captured["/".join(context.module.scope.path)] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(grab):
    out = model.apply(variables, x, t, y, ctx=ctx)
  return out, captured


def _asym_params(lo, hi, qmax):
  lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)  # keep 0 exactly representable
  scale = jnp.maximum((hi - lo) / qmax, 1e-8)
  return scale, jnp.round(-lo / scale)


def mse_range(x, bits, reduce_axes: tuple[int, ...], num_candidates: int = NUM_CANDIDATES, p: float = NORM_P,
              symmetric: bool = False, bounds=None):
  """(scale, zero) minimising mean |x - Q(x)|^p over `reduce_axes` (kept as size-1 dims), per remaining index.

  `bits` is an int or an int array broadcastable to the kept shape (per-channel bit vectors). `bounds` (lo, hi)
  overrides the min/max of `x` (when `x` is a subsample of the tensor whose range is searched)."""
  qmax = ops.qmax_of(bits)
  if bounds is None:
    bounds = jnp.min(x, axis=reduce_axes, keepdims=True), jnp.max(x, axis=reduce_axes, keepdims=True)
  lo0, hi0 = bounds

  def candidate(carry, i):
    best_err, best_s, best_z = carry
    shrink = 1.0 - 0.01 * i
    if symmetric:
      s = jnp.maximum(jnp.maximum(-lo0, hi0) * shrink / ((qmax + 1) / 2), 1e-8)
      z = jnp.zeros_like(s)
    else:
      s, z = _asym_params(lo0 * shrink, hi0 * shrink, qmax)
    err = jnp.mean(jnp.abs(x - ops.fake_quant(x, s, z, qmax, symmetric)) ** p, axis=reduce_axes, keepdims=True)
    better = err < best_err
    return (jnp.where(better, err, best_err), jnp.where(better, s, best_s), jnp.where(better, z, best_z)), None

  init = (jnp.full(lo0.shape, jnp.inf), jnp.ones(lo0.shape), jnp.zeros(lo0.shape))
  (_, scale, zero), _ = jax.lax.scan(candidate, init, jnp.arange(num_candidates, dtype=jnp.float32))
  return scale, zero


def smooth_scale(act_absmax, w_absmax, alpha: float = 0.5, eps: float = 1e-5):
  """SmoothQuant pre-scale per input channel: s_j = max|X_j|^alpha / max|W_j|^(1-alpha) (alpha=0.5: the sqrt
  ratio MPQ-DM uses), with an epsilon the released code lacks (a zero max gave inf/NaN there)."""
  a = jnp.maximum(act_absmax, eps)
  w = jnp.maximum(w_absmax, eps)
  return a ** alpha / w ** (1 - alpha)


def _tree_get(tree, path: str):
  for k in path.split("/"):
    tree = tree[k]
  return tree


@dataclasses.dataclass(frozen=True)
class CalibrationSet:
  """FP-trajectory inputs: xs (S, N, H, W, C), labels (N,), the plan (timesteps of the S steps)."""
  xs: jax.Array
  labels: jax.Array
  plan: plan_lib.StepPlan
  cfg_scale: float
  null_class: int


def _model_batch(cal: CalibrationSet, step: int):
  """The batch the sampler feeds the network at `step` (CFG doubles it with the null class)."""
  x = cal.xs[step]
  t = jnp.full((x.shape[0],), int(cal.plan.model_timesteps[step]), jnp.int32)
  y = cal.labels
  if cal.cfg_scale != 1.0:
    return sampler.cfg_batch(x, t, y, cal.null_class)
  return x, t, y


def _per_step(fn, cal: CalibrationSet):
  """[fn(x, t, y) for every step's network batch]; fn is jitted once."""
  fn = jax.jit(fn)
  return [fn(*_model_batch(cal, i)) for i in range(len(cal.plan.steps))]


def input_absmax(model_cfg: dit.DiTConfig, params, cal: CalibrationSet) -> dict[str, jax.Array]:
  """Per seam Linear: max |input| per input channel (in,), over the whole calibration set (FP network)."""
  model = dit.DiT(config=model_cfg)

  def fn(x, t, y):
    _, inputs = capture_layer_inputs(model, {"params": params}, x, t, y)
    return {p: jnp.max(jnp.abs(a.reshape(-1, a.shape[-1])), axis=0) for p, a in inputs.items()}

  per_step = _per_step(fn, cal)
  return jax.tree.map(lambda *xs: jnp.max(jnp.stack(xs), axis=0), *per_step)


def activation_ranges(model_cfg: dit.DiTConfig, params, cal: CalibrationSet, a_bits: dict[str, int],
                      smooth: dict[str, jax.Array], sample_size: int = 16384) -> dict[str, tuple[jax.Array, jax.Array]]:
  """Per layer in `a_bits`: MSE-searched per-tensor (scale, zero) of input / smooth, one pair per step (S,).

  The range candidates span the full tensor's [min, max]; their error is scored on `sample_size` entries drawn
  at random (fixed key) when the tensor is larger (0 = score on every entry)."""
  model = dit.DiT(config=model_cfg)

  def fn(x, t, y):
    _, inputs = capture_layer_inputs(model, {"params": params}, x, t, y)
    out = {}
    for p, bits in a_bits.items():
      a = (inputs[p] / smooth[p] if p in smooth else inputs[p]).reshape(-1)
      bounds = jnp.min(a, keepdims=True), jnp.max(a, keepdims=True)
      if 0 < sample_size < a.size:
        a = a[jax.random.randint(jax.random.key(0), (sample_size,), 0, a.size)]
      s, z = mse_range(a, bits, (0,), bounds=bounds)
      out[p] = (s.reshape(()), z.reshape(()))
    return out

  per_step = _per_step(fn, cal)
  return {p: (jnp.stack([r[p][0] for r in per_step]), jnp.stack([r[p][1] for r in per_step])) for p in a_bits}


def layer_input_samples(model_cfg: dit.DiTConfig, params, cal: CalibrationSet, paths,
                        images_per_step: int) -> dict[str, jax.Array]:
  """Per layer: its FP inputs for the first `images_per_step` images (and their CFG twins) of every step,
  concatenated over steps: (S * rows, ..., in). The OMQ search scores bit allocations on these."""
  model = dit.DiT(config=model_cfg)
  n = cal.xs.shape[1]
  keep = jnp.concatenate([jnp.arange(images_per_step), n + jnp.arange(images_per_step)]) \
      if cal.cfg_scale != 1.0 else jnp.arange(images_per_step)

  def fn(x, t, y):
    _, inputs = capture_layer_inputs(model, {"params": params}, x, t, y)
    return {p: inputs[p][keep] for p in paths}

  per_step = _per_step(fn, cal)
  return {p: jnp.concatenate([r[p] for r in per_step]) for p in paths}


@functools.partial(jax.jit, static_argnums=(1,))
def weight_ranges(kernel, policy: layers.LayerPolicy, smooth=None, bits=None):
  """MSE-searched (scale, zero) of the (smoothed) kernel (in, out), per output channel or per input group;
  `bits` (1, out) per-channel widths (default: policy.w_bits everywhere, through the same array code path)."""
  w = kernel if smooth is None else kernel * smooth[:, None]
  bits = jnp.full((1, w.shape[1]), policy.w_bits, jnp.int32) if bits is None else bits
  if policy.w_group_size:
    n_in, n_out = w.shape
    w = w.reshape(n_in // policy.w_group_size, policy.w_group_size, n_out)
    return mse_range(w, bits, (1,), symmetric=policy.w_symmetric)
  return mse_range(w, bits, (0,), symmetric=policy.w_symmetric)


def quant_template(model_cfg: dit.DiTConfig, table: layers.PolicyTable) -> dict:
  """The `quant` collection (neutral values) of a DiT under `table`."""
  model = dit.DiT(config=model_cfg, policies=tuple(table))
  x = jnp.zeros((1, model_cfg.input_size, model_cfg.input_size, model_cfg.in_channels))
  return model.init(jax.random.key(0), x, jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32))["quant"]


def calibrate(model_cfg: dit.DiTConfig, params, cal: CalibrationSet, table: layers.PolicyTable,
              omq_fractions: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5),
              omq_images_per_step: int = 2, act_sample_size: int = 16384) -> tuple[dict, dict]:
  """(`quant` collection for `table`, report). Sets smoothing scales, OMQ bit vectors (mixed_bits layers:
  k searched over `omq_fractions` of output channels), weight (scale, zero) by MSE search for the final bits,
  and per-step activation (scale, zero). LoRA stays at its initialisation (B = 0: merged weight = FP weight).
  The report maps each mixed-bits layer to its chosen OMQ k."""
  quant = jax.tree.map(jnp.asarray, quant_template(model_cfg, table))
  paths = ["/".join(p) for p in _leaf_parents(quant)]
  policies = {p: layers.resolve_policy(p, table) for p in paths}
  smooth = {}
  if any(pol.smooth for pol in policies.values()):
    absmax = input_absmax(model_cfg, params, cal)
    smooth = {p: smooth_scale(absmax[p], jnp.max(jnp.abs(_tree_get(params, p)["kernel"]), axis=1))
              for p, pol in policies.items() if pol.smooth}
  acts = activation_ranges(model_cfg, params, cal, {p: pol.a_bits for p, pol in policies.items() if pol.a_bits},
                           smooth, act_sample_size)
  mixed = [p for p, pol in policies.items() if pol.mixed_bits]
  samples = layer_input_samples(model_cfg, params, cal, mixed, omq_images_per_step) if mixed else {}
  report = {}
  for p, pol in policies.items():
    q = _tree_get(quant, p)
    if p in smooth:
      q["smooth"] = smooth[p]
    bits = None
    if pol.mixed_bits:
      kernel = _tree_get(params, p)["kernel"]
      w_hat = kernel * smooth[p][:, None] if p in smooth else kernel
      x_hat = samples[p] / smooth[p] if p in smooth else samples[p]
      bits, k, _ = omq.omq_search(w_hat, x_hat, pol.w_bits, omq_fractions)
      q["w_bits"] = bits
      report[p] = dict(omq_k=k, out_channels=int(kernel.shape[1]))
    q["w_scale"], q["w_zero"] = weight_ranges(_tree_get(params, p)["kernel"], pol, smooth.get(p), bits)
    if p in acts:
      if pol.a_steps != len(acts[p][0]):
        raise ValueError(f"Layer {p} keeps {pol.a_steps} activation quantizers but the calibration plan has "
                         f"{len(acts[p][0])} steps; set a_steps to the number of sampling steps.")
      q["a_scale"], q["a_zero"] = acts[p]
  return quant, report


def _leaf_parents(tree, prefix=()):
  """Paths (tuples) of the dicts that directly hold arrays: the seam layers of a quant collection."""
  if any(not isinstance(v, dict) for v in tree.values()):
    yield prefix
    return
  for k, v in tree.items():
    yield from _leaf_parents(v, prefix + (k,))
