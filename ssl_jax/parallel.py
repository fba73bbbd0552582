"""The one place for meshes and collectives (`sharding` says which state leaves are split).

The mesh has two axes, ('data', 'fsdp'). The batch is split over both (`BATCH_AXES`), so
every device holds its own rows; parameters, optimizer state and target networks are split
over 'fsdp' only (size 1, the default, keeps them replicated: plain data parallelism).
Everything that crosses devices runs inside `jax.shard_map`: losses that need the whole batch
gather columns from the other devices over the batch axes. Every helper takes
`axis_name=None` to mean "one device, no collective", so the same loss code serves
single-device references and sharded training; `axis_name` may be one mesh axis or a tuple.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'
FSDP_AXIS = 'fsdp'
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


def make_mesh(num_devices: int | None = None, fsdp: int = 1) -> Mesh:
  """A (devices / fsdp) x fsdp mesh ('data', 'fsdp') over the first `num_devices` devices
  (all by default). Devices are laid out by `mesh_utils`, which on TPU keeps each fsdp group
  on neighbouring chips: its gathers are the step's most frequent collectives."""
  devices = jax.devices()
  if num_devices is not None:
    if num_devices > len(devices):
      raise ValueError(f'Asked for {num_devices} devices but only {len(devices)} are visible.')
    devices = devices[:num_devices]
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f'mesh.fsdp={fsdp} must be a positive divisor of the {len(devices)} '
                     'devices.')
  shape = (len(devices) // fsdp, fsdp)
  try:
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (AssertionError, NotImplementedError, ValueError):
    # Subsets of a TPU slice that its topology cannot tile: plain device order.
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, BATCH_AXES)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The axes that split the batch: all of the mesh's."""
  return tuple(mesh.axis_names)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device of the mesh."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def global_batch_from_host(local_batch, mesh: Mesh):
  """Assembles each host's slice of the batch into one global array sharded over the mesh.

  On one host this is a plain device_put; on several, every host passes its own rows and the
  result is the global batch, in process order.
  """
  sharding = batch_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def axis_index(axis_name: str | None):
  return 0 if axis_name is None else jax.lax.axis_index(axis_name)


def gather_rows(x: jnp.ndarray, axis_name: str | None) -> jnp.ndarray:
  """Concatenates every device's rows of `x` in device order: [n, ...] -> [devices * n, ...].

  Its transpose (used by autodiff) sums the cotangents of all devices and hands each device
  those of its own rows, so gradients flow back to the device that produced each column.
  """
  if axis_name is None:
    return x
  return jax.lax.all_gather(x, axis_name, axis=0, tiled=True)


def gather_rows_replicated(x: jnp.ndarray, axis_name: str | None) -> jnp.ndarray:
  """Every device's rows of `x` in device order, typed as replicated across `axis_name`.

  `gather_rows` (all_gather) gives the same values, but shard_map types its result
  as device-varying, so it cannot become state returned with out_specs P(). A psum is
  replicated by construction; each device contributes its rows at its offset and zeros
  elsewhere, and adding zeros is exact, so the result is bit-identical to the gather.
  """
  if axis_name is None:
    return x
  n = x.shape[0]
  total = psum(n, axis_name)
  padded = jnp.zeros((total,) + x.shape[1:], x.dtype)
  padded = jax.lax.dynamic_update_slice_in_dim(
      padded, x, global_row_offset(n, axis_name), axis=0)
  return psum(padded, axis_name)


def global_row_offset(local_rows: int, axis_name: str | None):
  """Index, in the gathered array, of this device's first row."""
  return axis_index(axis_name) * local_rows


def psum(x, axis_name: str | None):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def pmean(x, axis_name: str | None):
  return x if axis_name is None else jax.lax.pmean(x, axis_name)
