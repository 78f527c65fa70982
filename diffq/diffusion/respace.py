"""Timestep respacing (ADM `space_timesteps` / `SpacedDiffusion`).

A respaced schedule keeps a subset of the original steps, recomputes betas from the kept
cumulative alphas, and remembers the original index of each kept step (`timestep_map`):
the model is always called with original indices.
"""
from __future__ import annotations

import numpy as np

from diffq.diffusion.gaussian import Schedule


def space_timesteps(num_steps: int, section_counts) -> list[int]:
  """Kept original indices. `section_counts`: "ddimN" (stride T//N), "N", "a,b,c" (per-section counts) or list."""
  if isinstance(section_counts, str):
    spec = section_counts
    try:
      want = int(spec[len("ddim"):]) if spec.startswith("ddim") else None
      section_counts = None if want is not None else [int(x) for x in spec.split(",")]
    except ValueError:
      raise ValueError(f"Unknown spacing {spec!r}: use 'ddimN' (N steps at an integer stride, e.g. ddim20), 'N' "
                       "(N evenly spaced steps) or comma-separated per-section counts such as '10,5'.") from None
    if want is not None:
      for stride in range(1, num_steps):
        if len(range(0, num_steps, stride)) == want:
          return list(range(0, num_steps, stride))
      raise ValueError(f"Cannot make exactly {want} DDIM steps with an integer stride from {num_steps}.")
  section_counts = list(section_counts)
  size_per, extra = divmod(num_steps, len(section_counts))
  start, kept = 0, []
  for i, count in enumerate(section_counts):
    size = size_per + (1 if i < extra else 0)
    if not 1 <= count <= size:
      raise ValueError(f"Cannot take {count} steps from a section of {size} steps.")
    frac = 1 if count == 1 else (size - 1) / (count - 1)
    cur = 0.0
    for _ in range(count):
      kept.append(start + round(cur))
      cur += frac
    start += size
  return sorted(set(kept))


def respace(base: Schedule, use_timesteps) -> Schedule:
  """Schedule over the kept steps: beta_i = 1 - abar_{k_i} / abar_{k_{i-1}}."""
  keep = sorted(set(int(t) for t in use_timesteps))
  if not keep or keep[0] < 0 or keep[-1] >= base.num_steps:
    raise ValueError(f"Respaced timesteps must lie in [0, {base.num_steps}); got {keep[:3]}...{keep[-3:]}.")
  acp = base.alphas_cumprod
  last, betas = 1.0, []
  for k in keep:
    betas.append(1 - acp[k] / last)
    last = acp[k]
  return Schedule.from_betas(np.array(betas), base.timestep_map[np.array(keep)])
