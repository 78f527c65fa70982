"""Export job: a training run's latest EMA params (or another DiT export) -> .npz + manifest."""
from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from diffq.io import npz
from diffq.jobs import common, sample


def run(config, workdir: str) -> dict:
  if not config.source or not config.dest:
    raise ValueError("Set --config.source (training workdir or DiT export) and --config.dest (.npz path).")
  if os.path.isdir(config.source):
    model_cfg, params, steps = sample.load_training_run(config.source)
  else:
    (model_cfg, params), steps = sample.load_dit(config.source), None
  manifest = npz.export_npz(config.dest, jax.device_get(params),
                            metadata=dict(kind="dit_params", model=dataclasses.asdict(model_cfg), steps=steps,
                                          source=os.path.abspath(config.source)))
  result = dict(dest=config.dest, sha256=manifest["sha256"], steps=steps if steps is not None else -1,
                params=int(sum(np.size(x) for x in jax.tree.leaves(params))))
  common.write_metrics(workdir, result)
  return result
