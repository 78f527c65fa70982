"""Device mesh and shardings for data-parallel jobs (jit + NamedSharding; the pmap successor API)."""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA = "data"


def _data_mesh(devices, num_devices: int | None, what: str) -> jax.sharding.Mesh:
  n = num_devices or len(devices)
  if n > len(devices):
    raise ValueError(f"Asked for {n} devices but only {len(devices)} {what} exist. On CPU, simulate more with "
                     f"XLA_FLAGS=--xla_force_host_platform_device_count={n}.")
  return jax.sharding.Mesh(np.array(devices[:n]), (DATA,), axis_types=(AxisType.Auto,))


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """1-D mesh over the first `num_devices` devices of every process (all by default), axis name 'data'."""
  return _data_mesh(jax.devices(), num_devices, "devices")


def local_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """The same over this process's devices only: for work each host does on its own (no collectives)."""
  return _data_mesh(jax.local_devices(), num_devices, "local devices")


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
  """Places host numpy arrays (the global batch, leading axis, the same on every process) on the mesh, split
  along 'data'; with several processes each one transfers only the rows of its own devices."""
  sharding = batch_sharded(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx]), tree)


def to_host(x) -> np.ndarray:
  """The global value of a (possibly multi-process) array as numpy, on every process: its own shards when it
  has them all, one replica when replicated, else gathered from every process (`process_allgather`); host
  values pass through."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  if x.sharding.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def tree_to_host(tree):
  return jax.tree.map(to_host, tree)


def maybe_initialize_distributed(enabled: bool, coordinator_address: str = "", num_processes: int = 0,
                                 process_id: int = -1) -> None:
  """Multi-host, before any device use: `jax.distributed.initialize()` when `enabled` (auto-detects Cloud TPU
  pods, Slurm, Kubernetes) or when a coordinator is given (clusters JAX cannot detect, and the loopback test:
  every process gets the same address and process count and its own id). Otherwise one process."""
  if coordinator_address:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"A coordinator address needs --num_processes >= 1 and 0 <= --process_id < num_processes; "
                       f"got {num_processes} and {process_id}.")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif enabled:
    jax.distributed.initialize()


def jit_train_step(fn, mesh, state, num_batch_args: int = 2, num_const_args: int = 0):
  """jit of `fn(state, *batch, *consts) -> (state, metrics)`: state replicated and donated, batch split over
  'data', consts (e.g. a frozen teacher's params) replicated.

  XLA inserts the gradient all-reduce, so the step equals the single-device step on the global batch."""
  rep, bat = replicated(mesh), batch_sharded(mesh)
  state_sharding = jax.tree.map(lambda _: rep, state)
  return jax.jit(fn, in_shardings=(state_sharding, *[bat] * num_batch_args, *[rep] * num_const_args),
                 out_shardings=(state_sharding, rep), donate_argnums=(0,))
