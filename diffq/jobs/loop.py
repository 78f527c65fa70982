"""The training loop every trainer shares: resume from orbax, stateless batches, async-friendly logging,
progress with ETA, periodic and final checkpoints, a stop on the first non-finite metric.

Each checkpoint holds two items: `state` (the pytree the step function carries) and `meta` (JSON: wall seconds
spent up to that step and that step's metrics), so a resumed run reports its whole cost and final metrics even
when it has no step left to run.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from typing import Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from diffq import parallel
from diffq.jobs import common

STATE, META = "state", "meta"
LEGACY = "default"  # the one item of checkpoints written before `meta` existed


LOOP_KEYS = ("log_every", "checkpoint_every", "keep_checkpoints")  # the loop's own settings: no effect on results


def check_settings(config, prefix: str = "--config.") -> None:
  """The loop's settings in `config` must be positive (validated before any work; `prefix`: their CLI path)."""
  for key in LOOP_KEYS:
    if not isinstance(config[key], int) or config[key] < 1:
      raise ValueError(f"{key} must be a positive integer; got {config[key]!r}. Set {prefix}{key}.")


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                         save_interval_steps=config.checkpoint_every)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options,
                               item_names=(STATE, META))


def open_readonly(workdir: str) -> ocp.CheckpointManager:
  """Read-only manager over workdir/checkpoints (to load a run without touching it)."""
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=ocp.CheckpointManagerOptions(read_only=True), item_names=(STATE, META))


def restore_latest(mngr: ocp.CheckpointManager, state=None, *, set_aside: bool = True) -> tuple[object, dict]:
  """(state, meta) of the newest checkpoint that restores (into `state`'s structure and shardings; `state=None`:
  as saved), or (`state`, empty meta) when there is none.

  A newer checkpoint that cannot be read (a preempted write, a damaged file) is skipped with a warning and, with
  `set_aside`, moved to `<checkpoints>/../corrupt_checkpoints/` so the run can save that step again. If no
  checkpoint restores, nothing is moved and the error names the directory and the fix."""
  failures = []
  for step in sorted(mngr.all_steps(), reverse=True):
    legacy = os.path.join(str(mngr.directory), str(step), LEGACY)
    args = ocp.args.Composite(**{STATE: ocp.args.StandardRestore(state), META: ocp.args.JsonRestore()})
    try:
      if os.path.isdir(legacy):  # a single-item checkpoint of diffq before the meta item: no seconds recorded
        restored = {STATE: ocp.StandardCheckpointer().restore(legacy, state), META: dict(seconds=0.0, metrics={})}
      else:
        restored = mngr.restore(step, args=args)
    except Exception as e:  # orbax/tensorstore raise many types for a damaged or incompatible checkpoint
      first = (str(e).strip().splitlines() or [""])[0][:300]
      logging.warning("Checkpoint %s/%d cannot be restored (%s: %s); trying an earlier one.", mngr.directory, step,
                      type(e).__name__, first)
      failures.append((step, f"{type(e).__name__}: {first}"))
      continue
    if failures and set_aside:
      aside = os.path.join(os.path.dirname(str(mngr.directory)), "corrupt_checkpoints")
      if jax.process_index() == 0:
        os.makedirs(aside, exist_ok=True)
        for bad, _ in failures:
          shutil.move(os.path.join(str(mngr.directory), str(bad)), os.path.join(aside, f"{bad}-{time.time():.0f}"))
        logging.warning("Moved unreadable checkpoints %s to %s.", [s for s, _ in failures], aside)
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices("diffq_checkpoint_fallback")
      mngr.reload()
    logging.info("Resumed from checkpoint at step %d.", step)
    return restored[STATE], dict(restored[META])
  if failures:
    raise ValueError(f"No checkpoint in {mngr.directory} can be restored (newest, step {failures[0][0]}: "
                     f"{failures[0][1]}). If the run's settings changed, use a new --workdir; if the files are "
                     f"damaged, delete {mngr.directory} to start this stage over.")
  return state, dict(seconds=0.0, metrics={})


@jax.jit
def _all_finite(state) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)


def _first_non_finite(pending) -> tuple[int, list[str]] | None:
  """(step, metric names) of the first entry of [(step, metrics)] with a NaN/inf metric, else None."""
  for step, metrics in parallel.tree_to_host(pending):
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(float(v)))
    if bad:
      return step, bad
  return None


def run(step_fn: Callable, state, batch_at: Callable, *, mngr, writer, num_steps: int, log_every: int,
        meta: dict | None = None, fix: str = "lower the learning rate"):
  """Runs state["step"]..num_steps-1 with `state, metrics = step_fn(state, *batch_at(step))`.

  Metrics are checked for NaN/inf every `log_every` steps and before every checkpoint, and so is the state before
  it is saved, so no checkpoint holds a diverged state; the first non-finite step stops the run with an error
  naming the step, the metrics and `fix`.
  `meta` is the restored checkpoint's (seconds and metrics of earlier sessions). Returns (state, final metrics
  as floats prefixed 'train_', wall seconds over all sessions, steps run now)."""
  meta = meta or dict(seconds=0.0, metrics={})
  start = int(state["step"])
  progress = common.Progress(num_steps, start, writer)
  t0, last, pending = time.time(), None, []

  def check():
    bad = _first_non_finite(pending)
    if bad:
      raise FloatingPointError(
          f"Training diverged: {', '.join(bad[1])} became NaN/inf at step {bad[0]} (0-based). To fix: {fix}. "
          f"Nothing from that step on was saved (latest checkpoint: step {mngr.latest_step()}).")
    pending.clear()

  try:
    for step in range(start, num_steps):
      state, metrics = step_fn(state, *batch_at(step))
      pending.append((step, metrics))
      if last is not None and step % log_every == 0:
        writer.write_scalars(step, parallel.tree_to_host(last))  # the previous step's: no sync on this one
      last = metrics
      progress(step + 1)
      save = mngr.should_save(step + 1) or step + 1 == num_steps
      if (step + 1) % log_every == 0 or save:
        check()
      if save:
        if not bool(_all_finite(state)):  # the update of a finite step can still overflow
          raise FloatingPointError(
              f"Training diverged: the state after step {step} (0-based) holds NaN/inf although its metrics are "
              f"finite. To fix: {fix}. It was not saved (latest checkpoint: step {mngr.latest_step()}).")
        meta = dict(seconds=meta["seconds"] + time.time() - t0, metrics={k: float(v) for k, v in
                                                                        parallel.tree_to_host(metrics).items()})
        t0 = time.time()
        mngr.save(step + 1, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                                       META: ocp.args.JsonSave(meta)}), force=step + 1 == num_steps)
  finally:
    mngr.wait_until_finished()  # the checkpoints saved before a failure are complete
  final = {f"train_{k}": v for k, v in meta["metrics"].items()}
  return state, final, meta["seconds"], num_steps - start
