"""Step plans: the denoising steps a sampler runs and the kind of each, built once per job and validated.

A `StepKind` is static data saying what a step computes: its cache mode ('refresh': the network runs in full
and its stateful parts write their state; 'read': a cached step, whose parts use the state the last refresh
step of its segment wrote), its patch size (0: the model's own; several sizes split a plan into segments whose
state never mixes token counts) and its guidance rule ('both': conditional and unconditional rows at this
kind; 'weak_guide': FlexiDiT's guidance by the conditional prediction of a weaker, larger patch size,
eps = eps(c; p_g) + s2 (eps(c; p) - eps(c; p_g))). Kinds are registered by name (`register_kind`; `at_patch`
makes the patch-size variants) and plans name them. A `StepContext` is what the network
sees of one step: its plan index (traced under the sampler's scan) and its kind (static).
"""
from __future__ import annotations

import dataclasses

import flax
import jax
import numpy as np

from diffq.diffusion import gaussian, respace

CACHE_MODES = ("refresh", "read")
CFG_RULES = ("both", "weak_guide")


@dataclasses.dataclass(frozen=True)
class StepKind:
  """What a step computes (hashable: a static argument of the traced step)."""
  name: str
  cache: str = "refresh"
  patch_size: int = 0
  cfg: str = "both"
  guide_patch_size: int = 0  # 'weak_guide': the guidance branch's patch size


  def __post_init__(self):
    if self.cache not in CACHE_MODES:
      raise ValueError(f"Step kind {self.name!r}: unknown cache mode {self.cache!r}; known: {CACHE_MODES}.")
    if self.cfg not in CFG_RULES:
      raise ValueError(f"Step kind {self.name!r}: unknown guidance rule {self.cfg!r}; known: {CFG_RULES}.")
    if self.patch_size < 0:
      raise ValueError(f"Step kind {self.name!r}: patch_size must be >= 0 (0 = the model's); got "
                       f"{self.patch_size}.")
    if (self.cfg == "weak_guide") != (self.guide_patch_size > 0):
      raise ValueError(f"Step kind {self.name!r}: guide_patch_size is the weak guidance branch's patch size; set "
                       "it (> 0) exactly when cfg='weak_guide'.")


  def guide_call(self) -> "StepKind":
    """The kind of a 'weak_guide' step's guidance call: this step at its guide patch size, plain guidance."""
    return dataclasses.replace(self, name=f"{self.name}:guide", patch_size=self.guide_patch_size, cfg="both",
                               guide_patch_size=0)


KINDS: dict[str, StepKind] = {}


def register_kind(kind: StepKind) -> StepKind:
  """Adds `kind` to the registry (re-registering the identical kind is a no-op; a different one is an error)."""
  if KINDS.get(kind.name, kind) != kind:
    raise ValueError(f"Step kind {kind.name!r} is already registered as {KINDS[kind.name]}.")
  KINDS[kind.name] = kind
  return kind


FULL = register_kind(StepKind("full"))
CACHED = register_kind(StepKind("cached", cache="read"))  # the layers' cache parts read (ICC, naive reuse)


def at_patch(name: str, patch_size: int = 0, guide_patch_size: int = 0) -> str:
  """The registered name of kind `name` run at `patch_size` (0: the model's own), guided by the conditional
  prediction at `guide_patch_size` when that differs (0: the kind's own guidance rule): 'full@p8', 'full@g8'."""
  kind = KINDS[name]
  if not patch_size and not guide_patch_size:
    return name
  guide = guide_patch_size if guide_patch_size and guide_patch_size != patch_size else 0
  new = dataclasses.replace(kind, name=name + (f"@p{patch_size}" if patch_size else "") + (f"@g{guide}" if guide
                                                                                          else ""),
                            patch_size=patch_size, cfg="weak_guide" if guide else kind.cfg,
                            guide_patch_size=guide)
  return register_kind(new).name


@flax.struct.dataclass
class StepContext:
  """The step a network call belongs to: `index` in the plan (0 = noisiest; a traced int32 under the sampler)
  and its static `kind`. Parts that keep per-step quantizers or state select by `index`, never by a counter."""
  index: jax.Array | int = 0
  kind: StepKind = flax.struct.field(pytree_node=False, default=FULL)


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """Static plan: `steps[i]` indexes `schedule` (a respaced schedule), run from noisy to clean, as kind
  `kinds[i]` (a registered kind's name)."""
  schedule: gaussian.Schedule
  steps: tuple[int, ...]
  kinds: tuple[str, ...]

  def __post_init__(self):
    if len(self.steps) != len(self.kinds) or not self.steps:
      raise ValueError("A step plan needs one kind per step and at least one step.")
    unknown = sorted(set(self.kinds) - set(KINDS))
    if unknown:
      raise ValueError(f"Unknown step kinds {unknown}; known: {sorted(KINDS)}.")
    for start, stop in self.segments:
      if KINDS[self.kinds[start]].cache == "read":
        raise ValueError(f"Step {start} ({self.kinds[start]!r}) reads a cache, but no earlier step of its segment "
                         f"(steps {start}..{stop - 1}, one patch size) refreshes it; start each segment with a "
                         "'refresh' kind such as 'full'.")

  @property
  def model_timesteps(self) -> np.ndarray:
    """Original (model-facing) timestep index of each step."""
    return self.schedule.timestep_map[np.array(self.steps)]

  @property
  def step_kinds(self) -> tuple[StepKind, ...]:
    return tuple(KINDS[k] for k in self.kinds)

  @property
  def segments(self) -> tuple[tuple[int, int], ...]:
    """[start, stop) ranges of consecutive steps with one patch size: state never crosses a segment boundary."""
    sizes = [k.patch_size for k in self.step_kinds]
    starts = [i for i in range(len(sizes)) if i == 0 or sizes[i] != sizes[i - 1]]
    return tuple(zip(starts, starts[1:] + [len(sizes)]))


def kinds_from_pattern(pattern: str, num_steps: int) -> tuple[str, ...]:
  """Step kinds of a cache pattern: '' every step full; 'period:p' full at steps 0, p, 2p, ... (ICC's schedule)
  and cached between; or one letter per step, F (full) or C (cached), e.g. 'FCCFCFFF'."""
  if not pattern:
    return ("full",) * num_steps
  if pattern.startswith("period:"):
    try:
      p = int(pattern[len("period:"):])
    except ValueError:
      p = 0
    if p < 1:
      raise ValueError(f"Cache pattern {pattern!r}: the period must be a positive integer, e.g. 'period:2'.")
    return tuple("full" if i % p == 0 else "cached" for i in range(num_steps))
  letters = {"F": "full", "C": "cached"}
  if len(pattern) != num_steps or set(pattern) - set(letters):
    raise ValueError(f"Cache pattern {pattern!r} must be '', 'period:p' or {num_steps} letters F (full) / C "
                     "(cached), one per step of the plan.")
  return tuple(letters[c] for c in pattern)


def weak_first(kinds: tuple[str, ...], weak_patch: int, t_weak: int, t_weak_guide: int | None = None
               ) -> tuple[str, ...]:
  """FlexiDiT's schedule over `kinds`: the conditional branch at `weak_patch` for the first `t_weak` steps, the
  guidance branch for the first `t_weak_guide` (default t_weak, >= t_weak; between the two the powerful
  conditional prediction is guided by the weak one), the model's own patch size after."""
  t_weak_guide = t_weak if t_weak_guide is None else t_weak_guide
  if not 0 <= t_weak <= t_weak_guide <= len(kinds):
    raise ValueError(f"Weak steps: need 0 <= t_weak ({t_weak}) <= t_weak_guide ({t_weak_guide}) <= the plan's "
                     f"{len(kinds)} steps.")
  if t_weak_guide and weak_patch < 1:
    raise ValueError("Weak steps need a weak patch size (> 0): set the model's patch_sizes or sample.weak_patch.")
  return tuple(at_patch(k, weak_patch if i < t_weak else 0, weak_patch if t_weak <= i < t_weak_guide else 0)
               for i, k in enumerate(kinds))


def make_plan(num_train_steps: int = 1000, spacing: str = "ddim20", kinds: tuple[str, ...] | None = None,
              pattern: str = "", weak_patch: int = 0, t_weak: int = 0, t_weak_guide: int | None = None
              ) -> StepPlan:
  """Plan over `space_timesteps(num_train_steps, spacing)`, last (noisiest) first; the step kinds are `kinds`
  (one name per step) or those of the cache `pattern` (`kinds_from_pattern`; '' = every step full), with
  `weak_first`'s weak steps at `weak_patch` when t_weak / t_weak_guide > 0."""
  base = gaussian.Schedule.from_betas(gaussian.linear_betas(num_train_steps))
  sched = respace.respace(base, respace.space_timesteps(num_train_steps, spacing))
  steps = tuple(range(sched.num_steps - 1, -1, -1))
  kinds = tuple(kinds) if kinds is not None else kinds_from_pattern(pattern, len(steps))
  if t_weak or t_weak_guide:
    kinds = weak_first(kinds, weak_patch, t_weak, t_weak_guide)
  return StepPlan(schedule=sched, steps=steps, kinds=kinds)
