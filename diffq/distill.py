"""Data-free distillation of a fake-quant DiT along the FP model's own DDIM trajectory (EfficientDM / MPQ-DM).

One optimiser step per sampling step: at position i of a trajectory (state["step"] % S), the FP and quantized
networks see the same CFG batch (x_t, t, y); the loss is

    L = sum (eps_q - eps_fp)^2                                        (CFG-combined eps, sum-reduced)
      + lambda * 1[i % N == N - 1] * L_TRD                            (MPQ-DM eq. TRD, N-step windows)
    L_TRD = sum_b sum_rows KL(softmax(S_fp) || softmax(S_q)),   S = F^ F^T,   F^ = l2norm(mean_window(F))

with F the last DiT block's output tokens (2B, T, D). The trajectory follows the FP model (teacher forcing):
x_{t-1} = DDIM(x_t, FP output). Trainable: the leaves the layer specs declare (`LayerSpec.trainable`: LoRA A/B,
weight and per-step activation scales/zeros of layers with `train`), each with its group's learning rate; the
8-bit boundary layers do not train.

Additive-VQ layers that train are PV-tuned (AQLM's PV-Tuning, AQUATIC-Diff's stage 2): the P-step is the Adam
update of their codebooks and scales (one copy per sharing group, `tied_leaves`); the V-step follows every
update: each layer's straight-through target T (trained by Adam (0, 0.95) on dL/dŴ) is re-encoded by L2 beam
search, the `max_code_change` fraction of groups farthest from T taking new codes (`discrete_leaves`, carried in
the state). `semi` selects a selective momentum invalidation (SEMI).

The loss is a list of terms (`loss_terms`: name, logged weight, gradient weight, fn of the step's forwards),
and two hooks let a method act on the trained leaves: `post_update(train, opt_state, step) -> (train,
opt_state)` after every optimiser update, `trajectory_start(train, opt_state, trajectory) -> (train, opt_state)`
before the first step of every trajectory.

Remedies (`DistillConfig`; the defaults are the loop above, exactly). The sum MSE is 20-100x larger at the last
(t -> 0) positions than at high noise, although an eps error there barely moves the sample (the DDIM step's
d x_{t-1} / d eps is ~0.01 at the last position vs ~0.2-0.6 elsewhere), and the LoRA factors, shared by all
positions, follow those steps' gradients. `loss_norm` reweights the differentiated MSE per position ("mean":
/ element count, a constant, i.e. no reweighting under Adam; "running": / the EMA of this position's MSE over
trajectories, every position weighted alike; "x_prev": x (d x_{t-1} / d eps)^2, the MSE of the DDIM step's
x_{t-1}); the logged `mse` stays the raw sum. `grad_clip` clips the gradient's global norm before Adam;
`trajectory="quant"` advances x with the quantized model's (pre-update, detached) output instead of the FP one.
`loss_on="branches"` takes the eps MSE on the cond and uncond rows of the CFG batch instead of the combined
eps_u + s (eps_c - eps_u): with noisy 4-bit activations the guided loss weights the noisy guidance direction s^2
times, and its MSE optimum shrinks that direction (weaker effective CFG; experiments/guidance_gain.py).

TRD gradient (`trd_grad`): the released code detaches both features, so TRD never trains (`"none"`
reproduces that: the term is logged, and the differentiated loss is that of a run without TRD, so it trains
exactly like one). `"current"` (default, the spec's option (b)):
the gradient flows through the current step's quantized features; the window's earlier quantized features
were produced before the last update and enter as constants.
"""
from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffq import parallel, plan as plan_lib, sampler
from diffq.models import dit
from diffq.seam import spec as spec_lib

TRD_GRADS = ("current", "none")
# SeMI-PV (AQUATIC-Diff; the rule is unpublished, spec §2.3's two readings): 'boundary' zeroes the first moment of
# the P-step leaves (codebooks, scales) at every trajectory start, where the stream jumps from t -> 0 back to t = T;
# 'code_change' zeroes both moments of the straight-through target entries of every group whose codes changed.
SEMI = ("none", "boundary", "code_change")
PV_KEYS = ("vq_lr", "code_lr", "vq_lamb", "max_code_change", "code_beam", "semi")  # DistillConfig's PV-tuning settings
VQ_GROUPS = ("vq", "vq_target")  # learning-rate groups of the VQ parts (their own Adam, no weight decay)
LOSS_NORMS = ("none", "mean", "running", "x_prev")
TRAJECTORIES = ("fp", "quant")
LOSS_ON = ("guided", "branches")
# The remedies' settings at their wave-1 values: a settings record leaves them out then, so the distillation
# stages cached before they existed stay reusable (diffq.jobs.quantize).
# Settings left out of stage records at these values, so records made before the settings existed stay valid.
UNRECORDED_DEFAULTS = dict(loss_norm="none", loss_norm_decay=0.9, grad_clip=0.0, trajectory="fp", loss_on="guided",
                           compute_dtype="float32")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Static settings of the loop (the numbers are MPQ-DM's released ones unless noted)."""
  trajectories: int = 100           # optimiser steps = trajectories * plan steps (released: 800 x 20)
  images: int = 4                   # per trajectory (x2 rows under CFG)
  seed: int = 3407
  lora_lr_divisor: float = 2500.0   # LoRA lr = mean weight step size of the layer / divisor
  w_quant_lr: float = 1e-6
  a_quant_lr: float = 5e-4
  weight_decay: float = 0.01
  trd_weight: float = 100.0         # 0 = EfficientDM (no TRD)
  trd_window: int = 2
  trd_grad: str = "current"
  # PV-tuning of additive-VQ weights (AQLM's recipe unless noted; used only by VQ layers that train):
  vq_lr: float = 3e-4               # P-step: Adam (0.9, 0.95) on codebooks and scales
  code_lr: float = 1e-2             # V-step: Adam (0, 0.95) on the straight-through targets
  vq_lamb: bool = True              # LAMB (AQLM's `--lamb`): each VQ leaf's step is lr x its norm, not lr per entry
  max_code_change: float = 0.01     # fraction of code groups re-encoded per step (the farthest from the target)
  code_beam: int = 5                # L2 beam width of the re-encoding
  semi: str = "none"                # selective momentum invalidation: none | boundary | code_change
  # Remedies for distillation hurting at W3A4 / W4A4 (the defaults are wave 1's loop, exactly):
  loss_norm: str = "none"           # eps MSE as is | "mean" (/ element count) | "running" (/ per-position EMA)
                                    # | "x_prev" (x c_i^2, dx_{t-1}/deps of the DDIM step: the MSE of x_{t-1})
  loss_norm_decay: float = 0.9      # "running": EMA decay of each trajectory position's MSE over trajectories
  grad_clip: float = 0.0            # > 0: clip the gradient's global norm before Adam (optax.clip_by_global_norm)
  trajectory: str = "fp"            # x_{t-1} from the FP output (teacher forcing) | "quant" (the student's own)
  loss_on: str = "guided"           # eps MSE of the CFG-combined output | "branches": of the cond and uncond rows
  compute_dtype: str = "float32"    # the student's and teacher's activations and matmuls (float32 | bfloat16)

  @classmethod
  def from_config(cls, cfg, ignore: tuple[str, ...] = ()) -> "DistillConfig":
    """DistillConfig(**cfg) without the keys in `ignore` (the outer loop's); an unknown key is an error."""
    kw = {k: v for k, v in dict(cfg).items() if k not in ignore}
    unknown = sorted(set(kw) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"Unknown distillation settings {unknown}; known: {[f.name for f in dataclasses.fields(cls)]}.")
    return cls(**kw)

  def __post_init__(self):
    if self.trd_grad not in TRD_GRADS:
      raise ValueError(f"Unknown trd_grad {self.trd_grad!r}; choose one of {TRD_GRADS}.")
    if self.semi not in SEMI:
      raise ValueError(f"Unknown semi {self.semi!r}; choose one of {SEMI}.")
    if not 0.0 <= self.max_code_change <= 1.0 or self.code_beam < 1:
      raise ValueError(f"max_code_change must lie in [0, 1] and code_beam be >= 1; got {self.max_code_change}, "
                       f"{self.code_beam}.")
    if self.loss_norm not in LOSS_NORMS:
      raise ValueError(f"Unknown loss_norm {self.loss_norm!r}; choose one of {LOSS_NORMS}.")
    if self.loss_on not in LOSS_ON:
      raise ValueError(f"Unknown loss_on {self.loss_on!r}; choose one of {LOSS_ON}.")
    if self.trajectory not in TRAJECTORIES:
      raise ValueError(f"Unknown trajectory {self.trajectory!r}; choose one of {TRAJECTORIES}.")
    if self.grad_clip < 0 or not 0.0 <= self.loss_norm_decay < 1.0:
      raise ValueError(f"grad_clip must be >= 0 and 0 <= loss_norm_decay < 1; got {self.grad_clip}, "
                       f"{self.loss_norm_decay}.")
    if self.trajectories < 1 or self.images < 1 or self.trd_window < 1:
      raise ValueError(f"trajectories, images and trd_window must be >= 1; got {self}.")


def relation_kl(f_fp, f_q):
  """sum_b sum_i KL(P_fp[b, i] || P_q[b, i]) for features (B, T, D); P = row-softmax of token cosine sims."""
  def log_relation(f):
    f = f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
    return jax.nn.log_softmax(jnp.einsum("btd,bsd->bts", f, f), axis=-1)
  lp_fp, lp_q = log_relation(f_fp), log_relation(f_q)
  return jnp.sum(jnp.exp(lp_fp) * (lp_fp - lp_q))


def trainable_groups(quant: dict, table: spec_lib.SpecTable) -> dict:
  """{path tuple: learning-rate group} of the `quant` leaves the layer specs declare trainable."""
  groups = {}
  for k in flax.traverse_util.flatten_dict(quant):
    group = spec_lib.resolve("/".join(k[:-1]), table).trainable().get(k[-1])
    if group:
      groups[k] = group
  return groups


def tied_leaves(quant: dict, table: spec_lib.SpecTable) -> dict:
  """{path tuple: the path tuple it equals} of the shared leaves (VQ codebooks of a sharing group) of trained
  layers other than each group's first: distillation trains one copy and reads it for all."""
  ties, first = {}, {}
  for k in sorted(trainable_groups(quant, table)):
    path = "/".join(k[:-1])
    part = spec_lib.resolve(path, table).weight
    if k[-1] in getattr(part, "shared", ()) and part.share_group(path) is not None:
      canonical = first.setdefault((part, part.share_group(path), k[-1]), k)
      if canonical != k:
        ties[k] = canonical
  return ties


def discrete_leaves(quant: dict, table: spec_lib.SpecTable) -> set:
  """Path tuples of the integer leaves trained layers update through their weight part (`LayerSpec.discrete`)."""
  return {k for k in flax.traverse_util.flatten_dict(quant)
          if k[-1] in spec_lib.resolve("/".join(k[:-1]), table).discrete()}


def split_trainable(quant: dict, table: spec_lib.SpecTable) -> tuple[dict, dict]:
  """(trainable, frozen) flat dicts {path tuple: array} of a `quant` collection (see module docstring); tied
  copies and discrete leaves are in neither."""
  flat = flax.traverse_util.flatten_dict(quant)
  groups, ties, discrete = trainable_groups(quant, table), tied_leaves(quant, table), discrete_leaves(quant, table)
  train = {k: v for k, v in flat.items() if k in groups and k not in ties}
  return train, {k: v for k, v in flat.items() if k not in groups and k not in discrete}


def learning_rates(trainable: dict, groups: dict, cfg: DistillConfig) -> dict:
  """Per-leaf learning rates by group: LoRA mean(w_scale of its layer) / divisor, weight quantizer, activation
  quantizer."""
  by_group = {"weight_quant": lambda k: cfg.w_quant_lr, "act_quant": lambda k: cfg.a_quant_lr,
              "vq": lambda k: cfg.vq_lr, "vq_target": lambda k: cfg.code_lr,
              spec_lib.LORA_GROUP: lambda k: float(jnp.mean(trainable[k[:-1] + ("w_scale",)])) / cfg.lora_lr_divisor}
  return {k: by_group[groups[k]](k) for k in trainable}


def make_optimizer(lrs: dict, cfg: DistillConfig, total_steps: int, groups: dict | None = None
                   ) -> optax.GradientTransformation:
  """torch AdamW (decoupled decay, eps 1e-8) with per-leaf lrs and a linear decay to 0 over `total_steps`. Leaves
  of the VQ groups (`groups`: {key: group}) take PV-tuning's Adam instead, without weight decay: (0.9, 0.95) on
  codebooks and scales, (0, 0.95) on the straight-through targets; with `vq_lamb` each such leaf's Adam direction
  is rescaled to norm ||leaf|| before its lr (LAMB's trust ratio, as AQLM's PV recipe runs), so the lr is a
  relative step. `grad_clip` > 0 clips the raw gradient's global norm (over all leaves) first."""
  def scale_by_leaf_lr():
    return optax.GradientTransformation(lambda _: optax.EmptyState(),
                                        lambda u, s, p=None: ({k: v if isinstance(v, optax.MaskedNode) else
                                                               -lrs[k] * v for k, v in u.items()}, s))
  decay = optax.scale_by_schedule(optax.linear_schedule(1.0, 0.0, total_steps))
  adamw = optax.chain(optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8), optax.add_decayed_weights(cfg.weight_decay),
                      decay, scale_by_leaf_lr())
  labels = {k: g if g in VQ_GROUPS else "adamw" for k, g in (groups or {}).items()}
  if set(labels.values()) & set(VQ_GROUPS):
    lamb = (optax.scale_by_trust_ratio(),) if cfg.vq_lamb else ()
    pv = lambda b1: optax.chain(optax.scale_by_adam(b1=b1, b2=0.95, eps=1e-8), *lamb, decay, scale_by_leaf_lr())
    adamw = optax.multi_transform({"adamw": adamw, "vq": pv(0.9), "vq_target": pv(0.0)}, labels)
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip > 0 else adamw


def zero_moments(opt_state, keys, moments=("mu",), mask=None):
  """`opt_state` with the Adam `moments` of the leaves `keys` zeroed (where `mask[k]` is true, if given), in
  whatever optax chain or multi_transform holds them."""
  def walk(s):
    if isinstance(s, optax.ScaleByAdamState):
      fix = lambda tree: {k: (jnp.where(mask[k], 0.0, v) if mask else jnp.zeros_like(v))
                          if k in keys and hasattr(v, "shape") else v for k, v in tree.items()}
      return s._replace(**{m: fix(getattr(s, m)) for m in moments})
    if isinstance(s, tuple) and hasattr(s, "_fields"):
      return type(s)(*(walk(x) for x in s))
    if isinstance(s, tuple):
      return tuple(walk(x) for x in s)
    if isinstance(s, dict):
      return {k: walk(v) for k, v in s.items()}
    return s
  return walk(opt_state)


def ddim_eps_gain(plan: plan_lib.StepPlan) -> np.ndarray:
  """(S,) d x_{t-1} / d eps of the deterministic DDIM step at each plan position (x_t fixed, x0 unclipped):
  sqrt(1 - abar_prev) - sqrt(abar_prev (1 - abar) / abar)."""
  a = np.asarray(plan.schedule.alphas_cumprod, np.float64)[np.array(plan.steps)]
  ap = np.asarray(plan.schedule.alphas_cumprod_prev, np.float64)[np.array(plan.steps)]
  return np.sqrt(1 - ap) - np.sqrt(ap * (1 - a) / a)


def _keyed(flat: dict) -> dict:
  """Flat {path tuple: x} -> {"a/b/c": x}: string keys, so orbax can checkpoint the state."""
  return {"/".join(k): v for k, v in flat.items()}


def _unkeyed(flat: dict) -> dict:
  return {tuple(k.split("/")): v for k, v in flat.items()}


class Forwards(NamedTuple):
  """What a loss term sees of one step: guided outputs (B, H, W, 2C) and last-block tokens (rows, T, D) of both
  networks, the window-averaged tokens (`trd_window` steps, this one included) and whether this step ends a
  window (1.0 / 0.0)."""
  out_fp: jax.Array
  out_q: jax.Array
  f_fp: jax.Array
  f_q: jax.Array
  window_fp: jax.Array
  window_q: jax.Array
  window_end: jax.Array
  raw_fp: jax.Array | None = None   # the networks' outputs on the CFG batch before combining (2B, H, W, 2C)
  raw_q: jax.Array | None = None


class LossTerm(NamedTuple):
  """One term of the distillation loss: fn(Forwards) -> scalar, weighted by `weight` in the logged loss and by
  `grad_weight` in the differentiated one, both times gate(Forwards) (1.0 / 0.0) if a gate is given."""
  name: str
  weight: float
  grad_weight: float
  fn: Callable
  gate: Callable | None = None


def eps_mse(channels: int, branches: bool = False) -> Callable:
  """sum (eps_q - eps_fp)^2 over the eps channels of the guided outputs (`branches`: of the uncombined cond and
  uncond rows)."""
  if branches:
    return lambda f: jnp.sum((f.raw_q[..., :channels] - f.raw_fp[..., :channels]) ** 2)
  return lambda f: jnp.sum((f.out_q[..., :channels] - f.out_fp[..., :channels]) ** 2)


def window_relation_kl(f: Forwards):
  """MPQ-DM's time-smoothed relation distillation on the window-averaged tokens."""
  return relation_kl(f.window_fp, f.window_q)


def loss_terms(cfg: DistillConfig, channels: int) -> tuple[LossTerm, ...]:
  """The eps MSE and TRD (at window ends; trains only with trd_grad='current')."""
  return (LossTerm("mse", 1.0, 1.0, eps_mse(channels, cfg.loss_on == "branches")),
          LossTerm("trd", cfg.trd_weight, cfg.trd_weight if cfg.trd_grad == "current" else 0.0, window_relation_kl,
                   lambda f: f.window_end))


def combine(terms, values, fw: Forwards, grad: bool):
  """sum_k w_k [gate_k] v_k with the logged (grad=False) or the gradient weights."""
  parts = []
  for term, v in zip(terms, values):
    w = term.grad_weight if grad else term.weight
    if term.gate is not None:
      w = w * term.gate(fw)
    parts.append(v if isinstance(w, float) and w == 1.0 else w * v)
  return functools.reduce(operator.add, parts)


def _no_hook(train, opt_state, _):
  return train, opt_state


class Distiller:
  """Builds the state and the jitted step of the loop for one model / plan / spec table."""

  def __init__(self, model_cfg: dit.DiTConfig, plan: plan_lib.StepPlan, table: spec_lib.SpecTable,
               cfg: DistillConfig, *, cfg_scale: float, eta: float = 0.0, clip_x0: bool = False,
               cfg_channels: int = 0, post_update: Callable | None = None,
               trajectory_start: Callable | None = None):
    self.model_cfg, self.plan, self.table, self.cfg = model_cfg, plan, tuple(table), cfg
    self.post_update, self.trajectory_start = post_update, trajectory_start
    if eta != 0.0:
      raise ValueError(f"Distillation follows the deterministic DDIM trajectory (eta = 0, as MPQ-DM's ImageNet "
                       f"recipe); got eta={eta}. Set sample.eta=0.")
    self.cfg_scale, self.clip_x0, self.cfg_channels = cfg_scale, clip_x0, cfg_channels
    self.num_steps = cfg.trajectories * len(plan.steps)
    self.shape = (model_cfg.input_size, model_cfg.input_size, model_cfg.in_channels)
    self._lrs = None
    self.terms = loss_terms(cfg, self.shape[-1])

  def init_state(self, quant: dict) -> tuple[dict, dict]:
    """(state, frozen quant vars) from a calibrated `quant` collection."""
    quant = jax.tree.map(jnp.array, quant)  # copies: the step donates
    train, frozen = split_trainable(quant, self.table)
    if not train:
      raise ValueError("Distillation has nothing to train: no layer spec declares trainable leaves (the quantize "
                       "job trains layers that carry LoRA or, with VQ weights, quant.vq.train); set "
                       "quant.lora_rank > 0.")
    groups = trainable_groups(quant, self.table)
    self._lrs = _keyed(learning_rates(train, groups, self.cfg))
    self._groups = _keyed({k: g for k, g in groups.items() if k in train})
    self._ties = _keyed({k: "/".join(v) for k, v in tied_leaves(quant, self.table).items()})
    flat = flax.traverse_util.flatten_dict(quant)
    discrete = _keyed({k: flat[k] for k in discrete_leaves(quant, self.table)})
    train = _keyed(train)
    rows = self.cfg.images * (2 if self.cfg_scale != 1.0 else 1)
    feat = (rows, self.model_cfg.grid_size ** 2, self.model_cfg.hidden_size)
    state = dict(step=jnp.zeros((), jnp.int32), quant=train, discrete=discrete, opt_state=self.optimizer().init(train),
                 x=jnp.zeros((self.cfg.images, *self.shape)), acc_fp=jnp.zeros(feat), acc_q=jnp.zeros(feat),
                 model_state=dit.init_state(dit.DiT(config=self.model_cfg, specs=self.table,
                                                    dtype=self.cfg.compute_dtype),
                                            dit.variable_shapes(self.model_cfg, self.table), rows))
    if self.cfg.loss_norm == "running":  # per trajectory position: EMA of the eps MSE (0 = not visited yet)
      state["loss_scale"] = jnp.zeros((len(self.plan.steps),))
    return state, _keyed(frozen)

  def optimizer(self) -> optax.GradientTransformation:
    return make_optimizer(self._lrs, self.cfg, self.num_steps, self._groups)

  def _quant(self, frozen, train, discrete) -> dict:
    """The model's `quant` collection from the loop's flat parts (tied copies read from their canonical leaf)."""
    flat = {**frozen, **train, **discrete, **{k: train[c] for k, c in self._ties.items()}}
    return flax.traverse_util.unflatten_dict(_unkeyed(flat))

  def _update_codes(self, train, discrete, frozen, step):
    """PV-tuning's V-step on every layer with discrete leaves: {key: new value} and {layer: changed groups mask
    (out, G)}."""
    quant = self._quant(frozen, train, discrete)
    new, changed = {}, {}
    for i, layer in enumerate(sorted({k.rsplit("/", 1)[0] for k in discrete})):
      q = quant
      for part in layer.split("/"):
        q = q[part]
      part = spec_lib.resolve(layer, self.table).weight
      got = part.update_discrete(q, jax.random.fold_in(jax.random.fold_in(jax.random.key(self.cfg.seed), step), i),
                                 self.cfg)
      for name, v in got.items():
        new[f"{layer}/{name}"] = v
      changed[layer] = jnp.any(got["vq_codes"] != q["vq_codes"], axis=-1)
    return new, changed

  def _semi_boundary(self, opt_state):
    return zero_moments(opt_state, {k for k, g in self._groups.items() if g == "vq"})

  def _semi_code_change(self, opt_state, train, changed):
    """Zero both moments of the straight-through target entries (in, out) of the groups whose codes changed."""
    masks = {}
    for layer, groups in changed.items():  # groups (out, G) -> (in, out)
      g = train[f"{layer}/vq_target"].shape[0] // groups.shape[1]
      masks[f"{layer}/vq_target"] = jnp.repeat(groups.T, g, axis=0)
    return zero_moments(opt_state, set(masks), ("mu", "nu"), masks)

  def trajectory_inputs(self, trajectory: int) -> tuple[np.ndarray, np.ndarray]:
    """(x_T (B, H, W, C), labels (B,)) of trajectory `trajectory`: stateless in (seed, trajectory)."""
    key = jax.random.fold_in(jax.random.key(self.cfg.seed), trajectory)
    k_x, k_y = jax.random.split(key)
    return (np.asarray(jax.random.normal(k_x, (self.cfg.images, *self.shape))),
            np.asarray(jax.random.randint(k_y, (self.cfg.images,), 0, self.model_cfg.num_classes)))

  def _forward(self, specs, variables, x, t, y, step, model_state=None):
    """(guided output (B, H, W, 2C), last-block tokens (rows, T, D), the model's next state, the uncombined output
    (rows, H, W, 2C)) for one CFG network batch; `model_state` (the parts' state collections, e.g. MoDiff's reconstructions) advances by this call."""
    model = dit.DiT(config=self.model_cfg, specs=specs, dtype=self.cfg.compute_dtype)
    last = f"blocks_{self.model_cfg.depth - 1}"
    batch = sampler.cfg_batch(x, t, y, self.model_cfg.num_classes) if self.cfg_scale != 1.0 else (x, t, y)
    model_state = model_state or {}
    out, inter = model.apply({**variables, **model_state}, *batch, ctx=plan_lib.StepContext(step),
                             mutable=["intermediates", *model_state],
                             capture_intermediates=lambda m, name: m.name == last and name == "__call__")
    tokens = inter["intermediates"][last]["__call__"][0]
    raw = out
    if self.cfg_scale != 1.0:
      out = sampler.cfg_combine(out, self.cfg_channels or self.shape[-1], self.cfg_scale)
    return out, tokens, {k: inter[k] for k in model_state}, raw

  def step(self, state, frozen, params, x_T, labels):
    """One optimiser step at trajectory position state["step"] % S. Returns (state, metrics)."""
    cfg, s_len = self.cfg, len(self.plan.steps)
    i = state["step"] % s_len
    first = i == 0
    train, opt_state, discrete = state["quant"], state["opt_state"], state["discrete"]
    if self.trajectory_start is not None:
      train, opt_state = jax.lax.cond(first, self.trajectory_start, _no_hook, train, opt_state,
                                      state["step"] // s_len)
    if cfg.semi == "boundary":
      opt_state = jax.lax.cond(first, self._semi_boundary, lambda o: o, opt_state)
    x = jnp.where(first, x_T, state["x"])
    acc_fp, acc_q = (jnp.where(first, 0.0, state[k]) for k in ("acc_fp", "acc_q"))
    t_model = jnp.asarray(self.plan.model_timesteps, jnp.int32)[i]
    t = jnp.full((x.shape[0],), t_model)
    out_fp, f_fp, _, raw_fp = self._forward((), {"params": params}, x, t, labels, i)
    # the quantized model's state follows the trajectory in step order, from zeros at its start (as in sampling)
    model_state = jax.tree.map(lambda a: jnp.where(first, jnp.zeros_like(a), a), state["model_state"])
    window_end = (i % cfg.trd_window == cfg.trd_window - 1).astype(jnp.float32)

    # trd_grad="none" differentiates the very loss of a run without TRD (gradient weight 0), so it trains exactly
    # like one; the logged loss still carries the (detached) TRD term, as the released code reports it.
    def loss_fn(train):
      quant = self._quant(frozen, train, discrete)
      out_q, f_q, next_state, raw_q = self._forward(self.table, {"params": params, "quant": quant}, x, t, labels,
                                                    i, model_state)
      fw = Forwards(out_fp, out_q, f_fp, f_q, (acc_fp + f_fp) / cfg.trd_window, (acc_q + f_q) / cfg.trd_window,
                    window_end, raw_fp, raw_q)
      values = [term.fn(fw) for term in self.terms]
      scale = self._mse_scale(state, i, values[0])
      grad_values = [values[0] / scale, *values[1:]] if self.cfg.loss_norm != "none" else values
      return combine(self.terms, grad_values, fw, grad=True), (values, fw, next_state, scale)

    grads, (values, fw, next_state, scale) = jax.grad(loss_fn, has_aux=True)(train)
    updates, opt_state = self.optimizer().update(grads, opt_state, train)
    train = optax.apply_updates(train, updates)
    if discrete:
      new_codes, changed = self._update_codes(train, discrete, frozen, state["step"])
      discrete = {**discrete, **new_codes}
      if cfg.semi == "code_change":
        opt_state = self._semi_code_change(opt_state, train, changed)
    if self.post_update is not None:
      train, opt_state = self.post_update(train, opt_state, state["step"])
    steps = jnp.asarray(self.plan.steps, jnp.int32)
    # teacher forcing (wave 1) or the student's own trajectory (its output before this update, no gradient)
    out_next = out_fp if cfg.trajectory == "fp" else jax.lax.stop_gradient(fw.out_q)
    x_next = sampler.denoise_step(self.plan.schedule, "ddim", 0.0, out_next, x, steps[i], jnp.zeros_like(x),
                                  self.clip_x0)
    keep = 1.0 - window_end
    new = dict(step=state["step"] + 1, quant=train, discrete=discrete, opt_state=opt_state,
               x=x_next, acc_fp=keep * (acc_fp + f_fp), acc_q=keep * (acc_q + fw.f_q),
               model_state=jax.lax.stop_gradient(next_state))
    if "loss_scale" in state:
      new["loss_scale"] = state["loss_scale"].at[i].set(scale)
    metrics = dict(loss=combine(self.terms, values, fw, grad=False),
                   **{term.name: v for term, v in zip(self.terms, values)}, grad_norm=optax.tree.norm(grads),
                   **self._group_norms(grads, updates))
    if discrete:
      metrics["code_change"] = sum(jnp.sum(c) for c in changed.values()) / sum(c.size for c in changed.values())
    return new, metrics

  def _mse_scale(self, state, i, mse):
    """The divisor of the eps MSE in the differentiated loss (`loss_norm`; a constant to the gradient)."""
    if self.cfg.loss_norm == "mean":
      return jnp.float32(self.cfg.images * int(np.prod(self.shape)))
    if self.cfg.loss_norm == "x_prev":
      return 1.0 / jnp.asarray(ddim_eps_gain(self.plan) ** 2, jnp.float32)[i]
    if self.cfg.loss_norm == "running":
      prev, cur = state["loss_scale"][i], jax.lax.stop_gradient(mse)
      d = self.cfg.loss_norm_decay
      return jnp.where(prev > 0, d * prev + (1 - d) * cur, cur)
    return jnp.float32(1.0)

  def _group_norms(self, grads, updates) -> dict:
    """Per learning-rate group: global norm of the gradient and of the applied update (diagnostics only)."""
    out = {}
    for g in sorted(set(self._groups.values())):
      keys = [k for k in grads if self._groups[k] == g]
      out[f"grad_norm_{g}"] = optax.tree.norm({k: grads[k] for k in keys})
      out[f"update_norm_{g}"] = optax.tree.norm({k: updates[k] for k in keys})
    return out

  def merged_quant(self, state, frozen) -> dict:
    """The full `quant` collection (trained, tied, discrete and frozen variables)."""
    return self._quant(frozen, state["quant"], state["discrete"])

  def jit_step(self, mesh, state):
    """Jitted `step`: state, frozen vars and params replicated, trajectory inputs split over 'data'."""
    rep, bat = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    state_sh = jax.tree.map(lambda _: rep, state)
    return jax.jit(self.step, in_shardings=(state_sh, rep, rep, bat, bat), out_shardings=(state_sh, rep),
                   donate_argnums=(0,))
