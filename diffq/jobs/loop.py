"""The training loop every trainer shares: resume from orbax, stateless batches, async-friendly logging,
progress with ETA, periodic and final checkpoints."""
from __future__ import annotations

import os
import time
from typing import Callable

import jax
import orbax.checkpoint as ocp
from absl import logging

from diffq.jobs import common


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                         save_interval_steps=config.checkpoint_every)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def open_readonly(workdir: str) -> ocp.CheckpointManager:
  """Read-only manager over workdir/checkpoints (to load a run without touching it)."""
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=ocp.CheckpointManagerOptions(read_only=True))


def restore_latest(mngr: ocp.CheckpointManager, state):
  """The latest checkpoint restored into `state`'s structure and shardings, or `state` if there is none."""
  if mngr.latest_step() is None:
    return state
  state = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(state))
  logging.info("Resumed from checkpoint at step %d.", int(state["step"]))
  return state


def run(step_fn: Callable, state, batch_at: Callable, *, mngr, writer, num_steps: int, log_every: int):
  """Runs state["step"]..num_steps-1 with `state, metrics = step_fn(state, *batch_at(step))`.

  Returns (state, final metrics as floats prefixed 'train_', wall seconds, steps run)."""
  start = int(state["step"])
  progress = common.Progress(num_steps, start, writer)
  t0, last = time.time(), None
  for step in range(start, num_steps):
    state, metrics = step_fn(state, *batch_at(step))
    if last is not None and step % log_every == 0:
      writer.write_scalars(step, jax.device_get(last))  # the previous step's: no sync on this one
    last = metrics
    progress(step + 1)
    mngr.save(step + 1, args=ocp.args.StandardSave(state))
  if mngr.latest_step() != int(state["step"]):
    mngr.save(int(state["step"]), args=ocp.args.StandardSave(state), force=True)
  mngr.wait_until_finished()
  final = {f"train_{k}": float(v) for k, v in jax.device_get(last or {}).items()}
  return state, final, time.time() - t0, num_steps - start
