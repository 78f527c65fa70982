"""Data-free post-training calibration of the seam's parts, from one statistics pass.

1. `fp_trajectory`: (x_t, t, y) of the model's own sampling trajectory (the calibration set).
2. `statistics`: one pass over the calibration set that records, per seam Linear and step, the statistics its
   parts ask for (`LayerSpec.part_stats`): per-channel input min/max, fixed random input entries, the inputs of the
   first images (OMQ), X^T X (additive VQ), row-normalised per-channel mean magnitudes of inputs and outputs and of their increments
   between adjacent steps (ICC). Each step's network call is traced once, so it runs under jit on a sharded
   batch (reductions over the batch become cross-device all-reduces).
3. `calibrate`: each layer's parts calibrate in pipeline order (smoothing, rotation, weight, input, cache) from
   those statistics and the variables calibrated before them; returns the model's `quant` collection. A rotated
   layer's weight and input statistics come from a second pass over its rotated input (x / s) R: a rotation
   mixes channels, so they cannot be derived from the first pass's per-channel ones as smoothing's are.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging

from diffq import plan as plan_lib, sampler
from diffq.models import dit, layers
from diffq.quant import ranges, rotation, vq
from diffq.seam import spec as spec_lib

PARTS = ("smooth", "rotate", "weight", "input", "cache")  # calibration order within a layer


def fp_trajectory(model_fn: Callable, variables, key, labels, plan: plan_lib.StepPlan, shape, cfg_scale: float,
                  null_class: int, eta: float = 0.0, clip_x0: bool = False, state=None, cfg_channels: int = 0):
  """Model inputs of every step of the sampler: xs (S, N, *shape); the labels and plan give y and t
  (`cfg_channels`: see sampler.guided)."""
  ids = jnp.arange(labels.shape[0])
  _, xs = sampler.sample(model_fn, variables, key, labels, ids, plan=plan, shape=shape, method="ddim", eta=eta,
                         cfg_scale=cfg_scale, null_class=null_class, clip_x0=clip_x0, state=state,
                         return_trajectory=True, cfg_channels=cfg_channels)
  return xs


def capture_layers(model: nn.Module, variables: dict, x, t, y, ctx=None) -> tuple[jax.Array, dict]:
  """(model output, {layer path: (input, output) of that seam Linear}) for one forward pass at step `ctx`."""
  captured = {}

  def grab(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, layers.Linear) and context.method_name == "__call__":
      captured["/".join(context.module.scope.path)] = (args[0], out)
    return out

  with nn.intercept_methods(grab):
    out = model.apply(variables, x, t, y, ctx=ctx)
  return out, captured


@dataclasses.dataclass(frozen=True)
class CalibrationSet:
  """Trajectory inputs: xs (S, N, H, W, C), labels (N,), the plan (timesteps of the S steps)."""
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


def _channel_absmean(a):
  """ICC's per-channel statistic of a (rows, ..., C): mean |a| over tokens per row, min-max normalised across
  channels per row ((m - min + 1e-6) / (max - min + 1e-6)), averaged over rows -> (C,)."""
  m = jnp.mean(jnp.abs(a.reshape(a.shape[0], -1, a.shape[-1])), axis=1)
  lo, hi = jnp.min(m, axis=1, keepdims=True), jnp.max(m, axis=1, keepdims=True)
  return jnp.mean((m - lo + 1e-6) / (hi - lo + 1e-6), axis=0)


SUMMED = {"in_xtx"}  # statistics summed over steps, not stacked
DELTA_STATS = ("in_delta_absmean", "out_delta_absmean", "in_delta_min", "in_delta_max", "in_delta_sample")


def _at_tokens(a, tokens: int):
  """A token tensor (rows, t, C) of a FlexiDiT weak step, each token repeated to the model's own `tokens`
  (the same entries in the same proportions), so every step samples the same flat indices and channels."""
  if a.ndim == 3 and a.shape[1] < tokens and tokens % a.shape[1] == 0:
    return jnp.repeat(a, tokens // a.shape[1], axis=1)
  return a


def _sample_index(size: int, sample_size: int):
  """`sample_size` fixed random flat indices into a tensor of `size` entries (all of them if it is smaller)."""
  if 0 < sample_size < size:
    return jax.random.randint(jax.random.key(0), (sample_size,), 0, size)
  return jnp.arange(size)


def statistics(model_cfg: dit.DiTConfig, variables: dict, table: spec_lib.SpecTable, cal: CalibrationSet,
               requests: dict[str, tuple[str, ...]], sample_size: int = 16384, images_per_step: int = 2,
               transforms: dict[str, Callable] | None = None, dtype: str = "float32"
               ) -> dict[str, dict[str, jax.Array]]:
  """{layer path: {statistic: array}} of the model under `table` over the calibration set, for the statistics
  `requests` names per layer. Per step (leading axis S): in_min, in_max (in,) per-channel input range;
  in_sample (k,) the input's entries at `sample_size` fixed random flat indices (every entry if the tensor is
  smaller; in_sample_channel (k,) their channels); in_absmean (in,), out_absmean (out,) (`_channel_absmean`);
  in_delta_absmean, out_delta_absmean (S - 1 pairs of adjacent steps) the same of the increments, and
  in_delta_min, in_delta_max (in,), in_delta_sample (k,) of the input increments x_i - x_{i-1}. in_rows: the
  inputs of the first `images_per_step` images (and their guidance twins), steps concatenated
  (S * rows, ..., in). Summed over steps (no leading axis): in_xtx (in, in), the input's X^T X over every row,
  token and step. A layer in `transforms` ({path: fn}) has its statistics taken of fn(input) instead. `dtype`:
  the network's compute dtype (the statistics are of its float32 layer inputs)."""
  model = dit.DiT(config=model_cfg, specs=tuple(table), dtype=dtype)
  n = cal.xs.shape[1]
  keep = jnp.concatenate([jnp.arange(images_per_step), n + jnp.arange(images_per_step)]) \
      if cal.cfg_scale != 1.0 else jnp.arange(images_per_step)
  wants_delta = {p for p, names in requests.items() if set(names) & set(DELTA_STATS)}

  def one_step(x, t, y, ctx, prev):
    _, got = capture_layers(model, variables, x, t, y, ctx)
    stats, raw = {}, {}
    for p, names in requests.items():
      if p not in got:  # a boundary layer of another patch size: it does not run at this step
        continue
      a, out = got[p]
      if transforms and p in transforms:
        a = transforms[p](a)
      s = {}
      if "in_min" in names:
        flat = a.reshape(-1, a.shape[-1])
        s["in_min"], s["in_max"] = jnp.min(flat, axis=0), jnp.max(flat, axis=0)
      if "in_sample" in names:
        a_s = _at_tokens(a, model_cfg.num_tokens)
        idx = _sample_index(a_s.size, sample_size)
        s["in_sample"], s["in_sample_channel"] = a_s.reshape(-1)[idx], idx % a.shape[-1]
      if "in_xtx" in names:
        flat = a.reshape(-1, a.shape[-1])
        s["in_xtx"] = flat.T @ flat
      if "in_rows" in names:
        s["in_rows"] = a[keep]
      if "in_absmean" in names:
        s["in_absmean"], s["out_absmean"] = _channel_absmean(a), _channel_absmean(out)
      if p in wants_delta:
        raw[p] = (a, out)
        if prev is not None and "in_delta_absmean" in names:
          s["in_delta_absmean"] = _channel_absmean(a - prev[p][0])
          s["out_delta_absmean"] = _channel_absmean(out - prev[p][1])
        if prev is not None and "in_delta_min" in names:
          d = a - prev[p][0]
          flat = d.reshape(-1, d.shape[-1])
          s["in_delta_min"], s["in_delta_max"] = jnp.min(flat, axis=0), jnp.max(flat, axis=0)
          d = _at_tokens(d, model_cfg.num_tokens)
          idx = _sample_index(d.size, sample_size)
          s["in_delta_sample"], s["in_delta_sample_channel"] = d.reshape(-1)[idx], idx % d.shape[-1]
      stats[p] = s
    return stats, raw

  fn = jax.jit(one_step)
  per_step, sums, prev = [], {}, None
  starts = {start for start, _ in cal.plan.segments}
  for i, kind in enumerate(cal.plan.step_kinds):
    ctx = plan_lib.StepContext(jnp.int32(i), kind)  # per-step quantizers by index; a weak step at its patch size
    if i in starts:
      prev = None  # increments never cross a patch-size segment (MoDiff restarts there)
    stats, raw = fn(*_model_batch(cal, i), ctx, prev)
    for p, s in stats.items():  # summed statistics accumulate here (XLA keeps no per-step copies)
      for k in SUMMED & set(s):
        v = s.pop(k)
        sums[p, k] = v if (p, k) not in sums else sums[p, k] + v
    per_step.append(stats)
    prev = raw if wants_delta else None
  _fill_missing_steps(per_step, requests)
  out = {}
  for p, names in requests.items():
    keys = set(per_step[-1][p])
    channels = {"in_sample_channel", "in_delta_sample_channel"} & keys
    s = {k: jnp.stack([st[p][k] for st in per_step if k in st[p]]) for k in keys - {"in_rows"} - channels}
    s.update({k: sums[p, k] for k in SUMMED if (p, k) in sums})
    if "in_rows" in keys:
      s["in_rows"] = jnp.concatenate([st[p]["in_rows"] for st in per_step])
    for k in channels:
      s[k] = per_step[-1][p][k]
    out[p] = s
  return out


def _fill_missing_steps(per_step: list, requests) -> None:
  """FlexiDiT: a boundary layer runs only at the steps of its patch size, and increments restart at every
  patch-size segment. A per-step statistic missing at a step (whose quantizer that layer never uses there) is
  copied from the nearest step that has it, so per-step statistics keep one entry per plan step (increments:
  per step after the first); summed and concatenated ones cover the steps the layer ran."""
  delta = set(DELTA_STATS) | {"in_delta_sample_channel"}
  for p in requests:
    keys = {k for st in per_step for k in st.get(p, {}) if k != "in_rows"}
    if not any(p in st for st in per_step):
      raise ValueError(f"Layer {p} runs at no step of the calibration plan: its quantizers cannot be calibrated. "
                       "Calibrate on a plan that uses every patch size the layers are quantized for.")
    for i, st in enumerate(per_step):
      have = st.setdefault(p, {})
      for k in sorted((keys if i else keys - delta) - set(have)):
        near = min((j for j, o in enumerate(per_step) if k in o.get(p, {})), key=lambda j: abs(j - i))
        have[k] = per_step[near][p][k]


def _tree_get(tree, path: str):
  for k in path.split("/"):
    tree = tree.get(k, {}) if isinstance(tree, dict) else {}
  return tree


def quant_template(model_cfg: dit.DiTConfig, table: spec_lib.SpecTable) -> dict:
  """The `quant` collection (neutral values) of a DiT under `table`."""
  model = dit.DiT(config=model_cfg, specs=tuple(table))
  x = jnp.zeros((1, model_cfg.input_size, model_cfg.input_size, model_cfg.in_channels))
  return model.init(jax.random.key(0), x, jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32)).get("quant", {})


def calibrate(model_cfg: dit.DiTConfig, variables: dict, cal: CalibrationSet, table: spec_lib.SpecTable, *,
              base_table: spec_lib.SpecTable = (), parts: tuple[str, ...] = PARTS,
              omq_fractions: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5), omq_images_per_step: int = 2,
              act_sample_size: int = 16384, vq_settings: vq.FitSettings = vq.FitSettings(),
              dtype: str = "float32") -> tuple[dict, dict]:
  """(`quant` collection of the model under `table`, report {layer: {omq_k, ...}}).

  Statistics come from the model `variables` runs under `base_table` (the FP network for quantization; a
  quantized model for caching on top of it). The `parts` named are calibrated (the others keep the values in
  `variables["quant"]`, or their neutral initial values): smoothing scales (SmoothQuant on the inputs' absmax),
  rotation signs (rotation.random_signs), weight quantizers (OMQ bit vectors with k searched over `omq_fractions`,
  then MSE ranges; additive VQ fitted under `vq_settings`, layers of one `share` group jointly), per-step input
  quantizers, ICC factors. LoRA stays at its initialisation (B = 0: merged weight = FP weight). `dtype`: the
  statistics pass's compute dtype."""
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    raise ValueError(f"Unknown calibration parts {unknown}; known: {PARTS}.")
  template = flax.traverse_util.flatten_dict(jax.tree.map(jnp.asarray, quant_template(model_cfg, table)))
  given = flax.traverse_util.flatten_dict(variables.get("quant", {}))
  flat = {k: given.get(k, v) for k, v in template.items()}
  paths = sorted({"/".join(k[:-1]) for k in flat})
  specs = {p: spec_lib.resolve(p, table) for p in paths}
  active = lambda s, part: part in parts and (getattr(s, part) if part in ("smooth", "rotate") else
                                              hasattr(getattr(s, part), "calibrate"))
  needs = lambda s, names: [n for part in names if active(s, part) for n in s.part_stats(part)]
  raw, rotated = {}, {}  # requests of the first pass (layer inputs), of the second (rotated layers' (x / s) R)
  for p, s in specs.items():
    if s.rotate:
      raw[p], rotated[p] = needs(s, ("smooth", "cache")), needs(s, ("weight", "input"))
    else:
      raw[p] = needs(s, ("smooth", "weight", "input", "cache"))
  pass_stats = lambda requests, transforms=None: statistics(
      model_cfg, variables, base_table, cal, requests, act_sample_size, omq_images_per_step, transforms, dtype) \
      if requests else {}
  stats = pass_stats({p: tuple(dict.fromkeys(n)) for p, n in raw.items() if n})
  qs, kernels = {}, {}
  for p, s in specs.items():
    q = qs[p] = {k[-1]: v for k, v in flat.items() if "/".join(k[:-1]) == p}
    kernel = kernels[p] = _tree_get(variables["params"], p).get("kernel")
    if active(s, "smooth"):
      st = stats[p]
      absmax = jnp.maximum(jnp.max(st["in_max"], axis=0), -jnp.min(st["in_min"], axis=0))
      q["smooth"] = ranges.smooth_scale(absmax, jnp.max(jnp.abs(kernel), axis=1))
    if active(s, "rotate") or (s.rotate and tuple(p.split("/")) + ("rot_signs",) not in given):
      q["rot_signs"] = rotation.random_signs(kernel.shape[0])  # also when calibrating under a rotation not given
  second = {p: tuple(dict.fromkeys(n)) for p, n in rotated.items() if n}
  stats_rotated = pass_stats(second, {p: (lambda a, s=specs[p], q=qs[p]: s.transform_input(a, q)) for p in second})
  options = dict(omq_fractions=tuple(omq_fractions), vq=vq_settings)
  data = {}
  for p, s in specs.items():
    first = stats.get(p, {})
    if p in stats_rotated:  # the first pass's input ranges were smoothing's (of x, not (x / s) R): not the parts'
      first = {k: v for k, v in first.items() if k not in ("in_min", "in_max") or k in needs(s, ("cache",))}
    data[p] = spec_lib.LayerData(p, s, kernels[p], {**first, **stats_rotated.get(p, {})}, qs[p], options, {},
                                 transformed=p in stats_rotated)
  for part in ("weight", "input", "cache"):  # a layer's parts in pipeline order; a shared group's layers together
    groups = {}
    for p, s in specs.items():
      if active(s, part):
        obj = getattr(s, part)
        group = obj.share_group(p) if hasattr(obj, "share_group") else None
        groups.setdefault(p if group is None else (obj, group), []).append(data[p])
    t0, logged = time.time(), time.time()
    for i, (key, members) in enumerate(groups.items()):
      obj = getattr(members[0].spec, part)
      fitted = obj.calibrate_shared(members) if isinstance(key, tuple) else [obj.calibrate(members[0])]
      for layer, values in zip(members, fitted):
        layer.q.update(values)
      if time.time() - logged > 10 or (i + 1 == len(groups) and time.time() - t0 > 10):  # slow parts (VQ fits)
        logged, spent = time.time(), time.time() - t0
        logging.info("Calibrated the %s parts of %d/%d layer groups (%.0f s, ETA %.0f s).", part, i + 1,
                     len(groups), spent, spent / (i + 1) * (len(groups) - i - 1))
  report = {p: dict(l.report, out_channels=int(l.kernel.shape[1]) if l.kernel is not None else None)
            for p, l in data.items() if l.report}
  for p, q in qs.items():
    flat.update({tuple(p.split("/")) + (k,): v for k, v in q.items()})
  return flax.traverse_util.unflatten_dict(flat), report
