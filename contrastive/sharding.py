"""Where every sharding decision of the codebase lives.

The model and the losses are written for one device; this module says how the
global batch is laid out over the mesh and how a per-device loss kernel meets
the rest of the global batch.

Layout: a 1-D (by default) mesh with axis `data`. Every batch array is
sharded on its leading axis over `data`; parameters, optimizer state and BN
statistics are replicated. BatchNorm inside `jax.jit` on batch-sharded arrays
reduces over the global batch (XLA inserts the all-reduce), which is SimCLR's
global BN without any axis names in the model.

Usage:
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    batch = sharding.make_global_batch(mesh, local_numpy_batch)
    loss = jax.jit(step)(state, batch)

  # In a loss: run `kernel(z_local, labels_local, axis_name)` per device.
  loss = sharding.map_batch_shards(kernel, z, labels)
"""

from collections.abc import Callable, Sequence
import math
from typing import Any

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = "data"


def make_mesh(axes: Sequence[tuple[str, int]] = ((DATA_AXIS, -1),),
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Builds a mesh from `[(name, size), ...]`; one size may be -1 (the rest).

  Axis types are Auto: XLA propagates the batch sharding through the model,
  and the one collective that matters (the loss's gather) is written
  explicitly with `shard_map`. (`jax.make_mesh` would default to Explicit.)
  """
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(name for name, _ in axes)
  sizes = [int(size) for _, size in axes]
  if sizes.count(-1) > 1:
    raise ValueError(f"At most one mesh axis may have size -1, got {axes}.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(
          f"Mesh {axes} does not divide the {len(devices)} devices.")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
        f"Mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} devices, "
        f"but {len(devices)} are available; set config.mesh accordingly.")
  if DATA_AXIS not in names:
    raise ValueError(f"config.mesh must have a '{DATA_AXIS}' axis, got {names}.")
  device_array = np.asarray(devices).reshape(sizes)
  return jax.sharding.Mesh(device_array, names,
                           axis_types=(AxisType.Auto,) * len(names))


def local_mesh() -> jax.sharding.Mesh:
  """A one-device mesh on this process, for small host-side computations."""
  return make_mesh(devices=jax.local_devices()[:1])


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis over `data`, everything else replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# Train-state entries with a row per training image (InterCLR's memory
# bank and its clusters): too large to copy onto every device at ImageNet
# scale, so their rows are split over `data` when they divide evenly.
PER_IMAGE_STATE = ("memory_bank", "bank_clusters")


def state_sharding(mesh: jax.sharding.Mesh, path, leaf) -> NamedSharding:
  """The sharding of one train-state leaf (`path` from `tree_map_with_path`):
  per-image rows over `data`, everything else replicated."""
  names = {getattr(entry, "key", None) for entry in path}
  rows = getattr(leaf, "shape", (0,))[:1]
  if (names & set(PER_IMAGE_STATE) and rows
      and rows[0] % mesh.shape[DATA_AXIS] == 0):
    return batch_sharding(mesh)
  return replicated(mesh)


def make_global_batch(mesh: jax.sharding.Mesh, local_batch: Any) -> Any:
  """Turns this process's numpy batch (a pytree) into global batch-sharded arrays.

  Each process passes only the rows it read; the global batch is the
  concatenation over processes in process order.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x),
      local_batch)


def check_batch_divisible(global_batch: int, mesh: jax.sharding.Mesh) -> None:
  """Raises a one-line error naming global/per-host/per-device sizes."""
  devices = mesh.shape[DATA_AXIS]
  processes = jax.process_count()
  if global_batch % devices or global_batch % processes:
    raise ValueError(
        f"Global batch {global_batch} must divide evenly over "
        f"{processes} process(es) and {devices} devices on mesh axis "
        f"'{DATA_AXIS}' (per host {global_batch / processes:g}, per device "
        f"{global_batch / devices:g}); choose a multiple of {devices}.")


def batch_axis_size() -> int:
  """Size of the `data` axis of the ambient mesh (1 without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or DATA_AXIS not in mesh.axis_names:
    return 1
  return mesh.shape[DATA_AXIS]


def constrain_batch(x: jax.Array, axis: int = 0) -> jax.Array:
  """Pins `axis` of `x` to the `data` axis of the ambient mesh (if any).

  For arrays whose batch dimension was moved by a reshape (e.g. GradCache's
  chunks), so that XLA keeps every device's rows where they are.
  """
  if batch_axis_size() == 1:
    return x
  return jax.lax.with_sharding_constraint(x, P(*([None] * axis), DATA_AXIS))


def map_batch_shards(kernel: Callable[..., Any], *args: Any) -> Any:
  """Runs `kernel(*local_args, axis_name=...)` on each device's batch shard.

  `args` are global arrays whose leading axis is the batch. With an ambient
  mesh (`jax.set_mesh`) whose `data` axis has more than one device, the kernel
  runs inside `shard_map` on the local rows with `axis_name='data'`: it must
  gather what it needs (`jax.lax.all_gather`) and return values that are
  already reduced over the axis (e.g. with `psum`). Without such a mesh it
  runs once on the whole batch with `axis_name=None`. Gradients flow through
  the gather: its transpose is a reduce-scatter, so every device receives the
  summed gradient of its own rows.
  """
  if batch_axis_size() == 1:
    return kernel(*args, axis_name=None)
  mapped = jax.shard_map(
      lambda *local: kernel(*local, axis_name=DATA_AXIS),
      in_specs=tuple(P(DATA_AXIS) for _ in args),
      out_specs=P(),
  )
  return mapped(*args)


def map_batch_rows(fn: Callable[..., Any], *args: Any) -> Any:
  """Runs `fn(*local_args, axis_name=...)` on each device's batch shard and
  returns its per-row outputs, still sharded on the batch.

  For per-example work that should stay on the device holding the rows
  (e.g. mixing images of the same shard), unlike `map_batch_shards` whose
  outputs are reduced over the axis. Without a multi-device `data` axis it
  runs once on the whole batch with `axis_name=None`.
  """
  if batch_axis_size() == 1:
    return fn(*args, axis_name=None)
  mapped = jax.shard_map(
      lambda *local: fn(*local, axis_name=DATA_AXIS),
      in_specs=tuple(P(DATA_AXIS) for _ in args),
      out_specs=P(DATA_AXIS),
  )
  return mapped(*args)
