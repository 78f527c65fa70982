"""Device mesh and shardings for data-parallel jobs (jit + NamedSharding; the pmap successor API)."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA = "data"


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """1-D mesh over the first `num_devices` devices (all by default), axis name 'data'."""
  devices = jax.devices()
  n = len(devices) if not num_devices else num_devices
  if n > len(devices):
    raise ValueError(f"Asked for {n} devices but only {len(devices)} exist. On CPU, simulate more with "
                     f"XLA_FLAGS=--xla_force_host_platform_device_count={n}.")
  return jax.sharding.Mesh(np.array(devices[:n]), (DATA,), axis_types=(AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def check_batch_divisible(batch_size: int, mesh) -> None:
  n = mesh.devices.size
  if not isinstance(batch_size, int) or batch_size <= 0:
    raise ValueError(f"A batch size must be a positive integer; got {batch_size!r}.")
  if batch_size % n:
    raise ValueError(f"Global batch size {batch_size} is not divisible by the {n} devices of the mesh; "
                     f"choose a multiple of {n}.")


def shard_batch(tree, mesh):
  """Places host numpy arrays (global batch, leading axis) on the mesh, split along 'data'."""
  sharding = batch_sharded(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), tree)


def maybe_initialize_distributed(enabled: bool) -> None:
  """Multi-host: `jax.distributed.initialize()` (auto-detects TPU pods, Slurm, k8s) before any device use."""
  if enabled:
    jax.distributed.initialize()


def jit_train_step(fn, mesh, state, num_batch_args: int = 2, num_const_args: int = 0):
  """jit of `fn(state, *batch, *consts) -> (state, metrics)`: state replicated and donated, batch split over
  'data', consts (e.g. a frozen teacher's params) replicated.

  XLA inserts the gradient all-reduce, so the step equals the single-device step on the global batch."""
  rep, bat = replicated(mesh), batch_sharded(mesh)
  state_sharding = jax.tree.map(lambda _: rep, state)
  return jax.jit(fn, in_shardings=(state_sharding, *[bat] * num_batch_args, *[rep] * num_const_args),
                 out_shardings=(state_sharding, rep), donate_argnums=(0,))
