"""The one place for meshes, shardings and collectives.

Everything that crosses devices runs inside `jax.shard_map` over the mesh axis `DATA_AXIS`:
each device holds its local rows of the batch, and losses that need the whole batch gather
columns from the other devices. Every helper takes `axis_name=None` to mean "one device, no
collective", so the same loss code serves single-device references and sharded training.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D data-parallel mesh over the first `num_devices` devices (all by default)."""
  devices = jax.devices()
  if num_devices is not None:
    if num_devices > len(devices):
      raise ValueError(f'Asked for {num_devices} devices but only {len(devices)} are visible.')
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


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
