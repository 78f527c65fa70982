"""The shared training loop: divergence stops it before a bad checkpoint, damaged checkpoints fall back, and a
resumed run reports the seconds and metrics of all its sessions."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffq.jobs import loop


class NullWriter:
  def write_scalars(self, step, scalars):
    pass


def toy(nan_at=None, loss_is_finite=False):
  """state w += 1 per step; from step `nan_at` on the update is NaN, and so is the loss unless `loss_is_finite`
  (a loss computed before an update that overflows)."""
  @jax.jit
  def step_fn(state, x):
    w = state["w"] + x
    bad = (nan_at is not None) & (state["step"] >= (nan_at if nan_at is not None else 0))
    loss = jnp.where(bad & (not loss_is_finite), jnp.nan, jnp.sum(w))
    return dict(step=state["step"] + 1, w=jnp.where(bad, jnp.nan, w)), dict(loss=loss, grad_norm=jnp.float32(1))
  return step_fn, dict(step=jnp.zeros((), jnp.int32), w=jnp.zeros(3))


def run(workdir, num_steps, nan_at=None, every=2, **kw):
  cfg = ml_collections.ConfigDict(dict(keep_checkpoints=5, checkpoint_every=every))
  mngr = loop.checkpoint_manager(workdir, cfg)
  step_fn, state = toy(nan_at, **kw)
  state, meta = loop.restore_latest(mngr, state)
  out = loop.run(step_fn, state, lambda s: (jnp.ones(3),), mngr=mngr, writer=NullWriter(), num_steps=num_steps,
                 log_every=1000, meta=meta, fix="lower --config.lr")
  return out, mngr


def test_divergence_stops_the_run_before_any_diverged_checkpoint(tmp_path):
  with pytest.raises(FloatingPointError, match=r"loss became NaN/inf at step 5 .*lower --config.lr"):
    run(str(tmp_path), 12, nan_at=5)
  mngr = loop.open_readonly(str(tmp_path))
  assert mngr.latest_step() == 4  # steps 0..4 finished; the state after step 5 (NaN) was never saved
  state, _ = loop.restore_latest(mngr, set_aside=False)
  assert np.isfinite(np.asarray(state["w"])).all()


def test_a_state_that_overflows_under_finite_metrics_is_not_saved(tmp_path):
  with pytest.raises(FloatingPointError, match=r"state after step 5 .* holds NaN/inf although its metrics"):
    run(str(tmp_path), 12, nan_at=5, loss_is_finite=True)
  assert loop.open_readonly(str(tmp_path)).latest_step() == 4


def test_checkpoints_of_the_single_item_format_still_resume(tmp_path):
  import orbax.checkpoint as ocp
  old = ocp.CheckpointManager(str(tmp_path / "checkpoints"), options=ocp.CheckpointManagerOptions(create=True))
  old.save(2, args=ocp.args.StandardSave(dict(step=jnp.int32(2), w=jnp.full(3, 2.0))))
  old.wait_until_finished()
  (state, final, _, steps_run), _ = run(str(tmp_path), 4)
  assert steps_run == 2 and np.asarray(state["w"]).tolist() == [4.0] * 3 and final["train_loss"] == 12.0


def test_resumed_run_reports_all_sessions(tmp_path):
  (_, first, s1, n1), _ = run(str(tmp_path), 4)
  (state, again, s2, n2), _ = run(str(tmp_path), 4)  # nothing left: seconds and metrics from the checkpoint
  assert n1 == 4 and n2 == 0 and again == first and s2 == s1 > 0 and first["train_loss"] == 12.0
  (state, final, s3, n3), _ = run(str(tmp_path), 6)
  assert n3 == 2 and s3 > s1 and final["train_loss"] == 18.0 and int(state["step"]) == 6


def _damage(step_dir):
  """Truncate every data file of a saved state item (what a preempted or half-copied write leaves)."""
  hit = 0
  for root, _, files in os.walk(os.path.join(step_dir, loop.STATE)):
    for name in files:
      path = os.path.join(root, name)
      if os.path.getsize(path) > 16 and "METADATA" not in name:
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)
        hit += 1
  assert hit


def test_a_damaged_checkpoint_falls_back_to_the_previous_one_and_is_set_aside(tmp_path):
  run(str(tmp_path), 4)
  _damage(str(tmp_path / "checkpoints" / "4"))
  (state, _, _, steps_run), mngr = run(str(tmp_path), 4)  # resumes from step 2, redoes steps 2 and 3
  assert steps_run == 2 and np.asarray(state["w"]).tolist() == [4.0] * 3
  assert os.listdir(tmp_path / "corrupt_checkpoints") and mngr.latest_step() == 4


def test_no_restorable_checkpoint_is_a_clear_error_and_moves_nothing(tmp_path):
  run(str(tmp_path), 2, every=2)
  for step in loop.open_readonly(str(tmp_path)).all_steps():
    _damage(str(tmp_path / "checkpoints" / str(step)))
  with pytest.raises(ValueError, match=r"No checkpoint in .* can be restored .* delete"):
    run(str(tmp_path), 4)
  assert not (tmp_path / "corrupt_checkpoints").exists()
