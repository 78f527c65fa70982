"""What every job shares: clu metric writers, progress with ETA, atomic metrics.json."""
from __future__ import annotations

import json
import logging as py_logging
import math
import os
import time

import jax
from absl import logging

from diffq.io.npz import atomic_write


class _DropLibraryInfo(py_logging.Filter):
  """Keeps warnings and errors from orbax/tensorstore but drops their per-save info chatter."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def quiet_library_logs() -> None:
  logging.get_absl_handler().addFilter(_DropLibraryInfo())


def metric_writer(workdir: str):
  """clu writer: TensorBoard events + log lines on process 0, logging only elsewhere (imports TF lazily)."""
  from clu import metric_writers
  os.makedirs(workdir, exist_ok=True)
  return metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)


class Progress:
  """Logs `step/total`, rate and ETA every `every_seconds`; also clu's ReportProgress (steps/sec scalar)."""

  def __init__(self, total: int, start: int = 0, writer=None, every_seconds: float = 30.0, unit: str = "steps"):
    from clu import periodic_actions
    self.total, self.start, self.unit, self.every = total, start, unit, every_seconds
    self.t0 = self.last = time.time()
    self.report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer, every_secs=every_seconds)

  def __call__(self, step: int) -> None:
    self.report(step)
    now = time.time()
    if now - self.last >= self.every or step == self.total:
      self.last = now
      rate = (step - self.start) / max(now - self.t0, 1e-9)
      eta = (self.total - step) / rate if rate > 0 else float("inf")
      logging.info("%d/%d %s (%.1f%%), %.2f %s/s, elapsed %s, ETA %s", step, self.total, self.unit,
                   100.0 * step / self.total, rate, self.unit, _hms(now - self.t0), _hms(eta))


def _hms(seconds: float) -> str:
  if seconds == float("inf"):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def write_json(path: str, obj) -> None:
  """Atomic strict-JSON write (process 0 only): NaN/inf are refused, never written as bare tokens."""
  if jax.process_index() != 0:
    return

  def write(tmp):
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=1, sort_keys=True, allow_nan=False)

  atomic_write(path, write)


def write_metrics(workdir: str, metrics: dict) -> None:
  """workdir/metrics.json with flat keys; a non-finite metric means the run failed, so nothing is written."""
  flat = {k: (float(v) if not isinstance(v, (str, bool, int)) else v) for k, v in metrics.items()}
  bad = sorted(k for k, v in flat.items() if isinstance(v, float) and not math.isfinite(v))
  if bad:
    raise FloatingPointError(f"Metrics {bad} are NaN/inf, so the run failed; {workdir}/metrics.json was not "
                             "written.")
  write_json(os.path.join(workdir, "metrics.json"), flat)
