"""Which leaves of the train state are split over the mesh's 'fsdp' axis, and how a device
reassembles them inside the step.

Parameters, their optimizer state, target networks and method state (queues, centres) follow
one rule, by shape: a leaf of at least `MIN_SHARDED_SIZE` elements is split along its largest
dimension that the fsdp axis divides (the output dimension on ties: a Dense kernel's features,
a convolution's output channels); smaller leaves (biases, normalisation scales, BatchNorm
statistics) stay replicated, where gathering them would cost more in latency than they save in
memory. An optimizer's moments have their parameter's shape, hence its sharding, so the update
runs on each device's slice alone.

Inside `shard_map` the step gathers every split leaf whole (`gather`) before the forward pass:
all_gather's transpose is a reduce-scatter, so each device receives only its slice of the
summed gradients, as in ZeRO-3 / FSDP. State the method returns is cut back to this device's
slice (`keep_own_slice`) so that it leaves `shard_map` as it came in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ssl_jax.parallel import FSDP_AXIS

# 2^14 float32 values, 64 KiB: a ResNet-50's BatchNorm vectors (at most 2048) and every bias
# stay replicated; its convolution kernels and a ViT's matrices are split.
MIN_SHARDED_SIZE = 2 ** 14


def _is_spec(x) -> bool:
  return isinstance(x, P)


def leaf_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
  """Where a leaf of `shape` lives: P() (replicated) or FSDP_AXIS on one dimension."""
  if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_SHARDED_SIZE:
    return P()
  divisible = [d for d, n in enumerate(shape) if n % fsdp_size == 0]
  if not divisible:
    return P()
  dim = max(divisible, key=lambda d: (shape[d], d))
  return P(*([None] * dim + [FSDP_AXIS]))


def tree_specs(tree, mesh: Mesh):
  """`leaf_spec` of every array leaf of `tree` (arrays or ShapeDtypeStructs) on `mesh`."""
  fsdp_size = dict(mesh.shape).get(FSDP_AXIS, 1)
  return jax.tree.map(lambda x: leaf_spec(tuple(x.shape), fsdp_size), tree)


def named(specs, mesh: Mesh):
  """NamedShardings on `mesh` for a tree of PartitionSpecs."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def _split_dim(spec: P) -> int | None:
  for dim, name in enumerate(spec):
    if name is not None:
      return dim
  return None


def gather(tree, specs):
  """Inside shard_map: each split leaf of `tree` whole, on every device (all_gather over the
  fsdp axis; its transpose hands each device its slice of the cotangent, summed)."""
  def whole(spec, x):
    dim = _split_dim(spec)
    return x if dim is None else jax.lax.all_gather(x, FSDP_AXIS, axis=dim, tiled=True)
  return jax.tree.map(whole, specs, tree, is_leaf=_is_spec)


def keep_own_slice(tree, specs):
  """Inside shard_map: the inverse of `gather` for state the step returns, which every
  device computed whole. Split leaves give back this device's slice; replicated ones are
  taken from the fsdp axis' first device, which makes them provably replicated (shard_map
  types a value computed from gathered leaves as varying over the axis, although every
  device holds the same). Adding zeros is exact, so the values are unchanged."""
  def own(spec, x):
    dim = _split_dim(spec)
    if dim is not None:
      size = x.shape[dim] // jax.lax.axis_size(FSDP_AXIS)
      start = jax.lax.axis_index(FSDP_AXIS) * size
      return jax.lax.dynamic_slice_in_dim(x, start, size, axis=dim)
    if FSDP_AXIS not in varying_axes(x):
      return x
    first = jax.lax.axis_index(FSDP_AXIS) == 0
    return jax.lax.psum(jnp.where(first, x, jnp.zeros_like(x)), FSDP_AXIS)
  return jax.tree.map(own, specs, tree, is_leaf=_is_spec)


def varying_axes(x) -> frozenset:
  """The mesh axes over which shard_map types `x` as varying (jax >= 0.9 keeps them in the
  aval's `mat`, earlier versions in `vma`)."""
  aval = jax.typeof(x)
  mat = getattr(aval, 'mat', None)
  return frozenset(mat.varying if mat is not None else getattr(aval, 'vma', ()))


def update_if(pred, update, state):
  """`lax.cond(pred, update, identity, state)` inside shard_map, for method state that a step
  sometimes recomputes (DeepCluster-v2's and PCL's k-means at an epoch start). Under fsdp
  the state arrives gathered, typed varying over the fsdp axis, while `update` may return
  values summed over every axis (invariant): cond needs both branches typed alike, so the
  update's results are cast to vary over the axes the state varies over (a type change;
  the values stay the same)."""
  def updated(s):
    def vary_like(x, like):
      axes = tuple(sorted(varying_axes(like) - varying_axes(x)))
      return jax.lax.pcast(x, axes, to='varying') if axes else x
    return jax.tree.map(vary_like, update(s), s)
  return jax.lax.cond(pred, updated, lambda s: s, state)


def replicated_specs(tree):
  """P() for every leaf: outputs that are the same everywhere (the loss, metrics)."""
  return jax.tree.map(lambda _: P(), tree)
