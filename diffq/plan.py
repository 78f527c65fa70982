"""Step plans: the denoising steps a sampler runs and the kind of each, built once per job and validated.

A `StepKind` is static data saying what a step computes: its cache mode ('refresh': the network runs in full
and its stateful parts write their state; 'read': a cached step, whose parts use the state the last refresh
step of its segment wrote), its patch size (0: the model's own; several sizes split a plan into segments whose
state never mixes token counts) and its guidance rule ('both': conditional and unconditional rows at this
kind). Kinds are registered by name (`register_kind`) and plans name them. A `StepContext` is what the network
sees of one step: its plan index (traced under the sampler's scan) and its kind (static).
"""
from __future__ import annotations

import dataclasses

import flax
import jax
import numpy as np

from diffq.diffusion import gaussian, respace

CACHE_MODES = ("refresh", "read")
CFG_RULES = ("both",)


@dataclasses.dataclass(frozen=True)
class StepKind:
  """What a step computes (hashable: a static argument of the traced step)."""
  name: str
  cache: str = "refresh"
  patch_size: int = 0
  cfg: str = "both"

  def __post_init__(self):
    if self.cache not in CACHE_MODES:
      raise ValueError(f"Step kind {self.name!r}: unknown cache mode {self.cache!r}; known: {CACHE_MODES}.")
    if self.cfg not in CFG_RULES:
      raise ValueError(f"Step kind {self.name!r}: unknown guidance rule {self.cfg!r}; known: {CFG_RULES}.")
    if self.patch_size < 0:
      raise ValueError(f"Step kind {self.name!r}: patch_size must be >= 0 (0 = the model's); got "
                       f"{self.patch_size}.")


KINDS: dict[str, StepKind] = {}


def register_kind(kind: StepKind) -> StepKind:
  """Adds `kind` to the registry (re-registering the identical kind is a no-op; a different one is an error)."""
  if KINDS.get(kind.name, kind) != kind:
    raise ValueError(f"Step kind {kind.name!r} is already registered as {KINDS[kind.name]}.")
  KINDS[kind.name] = kind
  return kind


FULL = register_kind(StepKind("full"))
CACHED = register_kind(StepKind("cached", cache="read"))  # the layers' cache parts read (ICC, naive reuse)


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


def make_plan(num_train_steps: int = 1000, spacing: str = "ddim20", kinds: tuple[str, ...] | None = None,
              pattern: str = "") -> StepPlan:
  """Plan over `space_timesteps(num_train_steps, spacing)`, last (noisiest) first; the step kinds are `kinds`
  (one name per step) or those of the cache `pattern` (`kinds_from_pattern`; '' = every step full)."""
  base = gaussian.Schedule.from_betas(gaussian.linear_betas(num_train_steps))
  sched = respace.respace(base, respace.space_timesteps(num_train_steps, spacing))
  steps = tuple(range(sched.num_steps - 1, -1, -1))
  kinds = tuple(kinds) if kinds is not None else kinds_from_pattern(pattern, len(steps))
  return StepPlan(schedule=sched, steps=steps, kinds=kinds)
