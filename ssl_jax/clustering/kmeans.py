"""Spherical k-means on device, its rows split over devices, as DeepCluster-v2 clusters its
memory bank (Caron et al. 2020, SwAV paper App. B; the reference is `cluster_memory` in
facebookresearch/swav's main_deepclusterv2.py).

Following the reference:
  * the features are l2-normalised, and a row goes to the centroid of largest dot product
    (cosine: the E step);
  * a centroid becomes the l2-normalised mean of its rows (the M step); a cluster that gets
    no row keeps its previous centroid;
  * `num_iterations` M steps, the centroids starting as K rows of the features; the returned
    assignments are those of the last centroids (the reference's loop runs the E step
    num_iterations + 1 times and stops before the last M step);
  * distributed as the reference's all_reduce: each device assigns its own rows against all
    centroids, and the per-cluster sums and counts are summed over `axis_name`.

Where this differs:
  * the initial rows are a seeded draw of K distinct *global* row indices (uniform among the
    valid rows, `initial_indices`), not a permutation of rank 0's local memory, so that the
    result does not depend on the number of devices (up to the float32 rounding of the sums,
    taken per device and then across devices);
  * an empty cluster keeps its previous centroid exactly (the reference re-normalises it,
    a change of a rounding error);
  * rows can be marked invalid (`valid`): they take no part and are assigned -1, as the
    reference's -100 marks examples missing from the memory;
  * rows are processed in chunks of `chunk_rows` (memory: a chunk's [chunk, K] scores), and
    the sums are one-hot matrix products, deterministic on every backend (a scatter-add is
    not on GPUs).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from ssl_jax import parallel, precision, sharding
from ssl_jax.losses.info_nce import l2_normalize


class KMeansResult(NamedTuple):
  centroids: jax.Array    # [K, d], unit rows, the same on every device
  assignments: jax.Array  # int32 [rows]: each row's centroid, -1 for a row not valid


def initial_indices(key, valid: jax.Array, num_clusters: int) -> jax.Array:
  """K distinct global row indices, uniform among the rows where `valid` (bool [N], all the
  global rows) is True: the rows whose features start as the centroids. Invalid rows come
  last, so they are drawn only if fewer than K rows are valid. A function of (key, valid)
  alone, so the same on any number of devices; random bits rather than uniform floats, so
  the same also when traced in float64 (tests' references). Equal bits keep row order."""
  bits = jax.random.bits(key, valid.shape, jnp.uint32)
  return jnp.lexsort((bits, ~valid))[:num_clusters].astype(jnp.int32)


def _global_rows(x: jax.Array, indices: jax.Array, axis_name) -> jax.Array:
  """Rows `indices` (global) of the row-sharded `x`: each device contributes those it holds,
  zeros for the others, summed over devices (exact: one nonzero term each)."""
  n = x.shape[0]
  local = indices - parallel.global_row_offset(n, axis_name)
  mine = (local >= 0) & (local < n)
  rows = jnp.where(mine[:, None], x[jnp.clip(local, 0, n - 1)], 0.0)
  return parallel.psum(rows, axis_name)


def _chunks(x: jax.Array, valid: jax.Array, chunk_rows: int):
  """x [n, d] and valid [n] as [chunks, chunk, ...], padded with invalid zero rows."""
  n = x.shape[0]
  chunk = max(1, min(chunk_rows, n))
  pad = -n % chunk
  x = jnp.pad(x, ((0, pad), (0, 0)))
  valid = jnp.pad(valid, (0, pad))
  return x.reshape(-1, chunk, x.shape[1]), valid.reshape(-1, chunk)


def _assign(x_chunks, valid_chunks, centroids, with_sums: bool):
  """E step on this device's rows: each valid row's nearest centroid by dot product (-1 for
  invalid rows); with `with_sums`, also this device's per-cluster sums [K, d] and counts [K]
  of those rows."""
  k = centroids.shape[0]

  def chunk(carry, inputs):
    x, valid = inputs
    nearest = jnp.argmax(precision.matmul(x, centroids.T), axis=1).astype(jnp.int32)
    if with_sums:
      sums, counts = carry
      members = (nearest[:, None] == jnp.arange(k)[None, :]) & valid[:, None]
      sums = sums + precision.matmul(members.astype(x.dtype).T, x)
      carry = sums, counts + jnp.sum(members, axis=0, dtype=jnp.int32)
    return carry, jnp.where(valid, nearest, -1)

  zeros = (jnp.zeros(centroids.shape, x_chunks.dtype), jnp.zeros((k,), jnp.int32))
  # Under shard_map the sums of this device's rows vary over the devices (the scan's carry
  # must be typed so from the start).
  axes = tuple(sharding.varying_axes(x_chunks))
  if axes:
    zeros = jax.lax.pcast(zeros, axes, to='varying')
  carry, nearest = jax.lax.scan(chunk, zeros, (x_chunks, valid_chunks))
  return nearest.reshape(-1), carry


def _kmeans(x_chunks, valid_chunks, centroids, num_iterations: int, axis_name):
  def m_step(_, centroids):
    _, (sums, counts) = _assign(x_chunks, valid_chunks, centroids, with_sums=True)
    sums, counts = parallel.psum((sums, counts), axis_name)
    means = l2_normalize(sums / jnp.maximum(counts, 1)[:, None].astype(sums.dtype))
    return jnp.where(counts[:, None] > 0, means, centroids)  # an empty cluster keeps its own

  centroids = jax.lax.fori_loop(0, num_iterations, m_step, centroids)
  nearest, _ = _assign(x_chunks, valid_chunks, centroids, with_sums=False)
  return centroids, nearest


def spherical_kmeans(features, num_clusters: Sequence[int], key, *, num_iterations: int = 10,
                     valid: jax.Array | None = None, axis_name=None, chunk_rows: int = 4096,
                     start_rows: Sequence[jax.Array] | None = None) -> list[KMeansResult]:
  """One k-means run per entry of `num_clusters` (DeepCluster-v2's heads, PCL's several K),
  on this device's rows of the features.

  Args:
    features: this device's rows [n, d] (the global matrix is every device's rows in device
      order), or a sequence of such arrays, one per run (DeepCluster-v2 clusters each head on
      the memory of another crop); l2-normalised here.
    num_clusters: K of each run; each must be at most the number of valid global rows.
    key: the runs' randomness (run r draws its initial rows with fold_in(key, r)).
    num_iterations: M steps of each run (the reference: 10).
    valid: bool [n], this device's rows that take part (None: all).
    axis_name: the mesh axes the rows are split over (None: one device).
    chunk_rows: rows scored against the centroids at a time.
    start_rows: the global indices of each run's initial rows (default: the seeded draw of
      `initial_indices`, which uses `key`).

  Returns:
    A `KMeansResult` per run: the centroids (replicated) and this device's rows' assignments.
  """
  runs = list(num_clusters)
  if isinstance(features, (list, tuple)):
    if len(features) != len(runs):
      raise ValueError(f'{len(features)} feature arrays for {len(runs)} k-means runs.')
    per_run = list(features)
  else:
    per_run = [features] * len(runs)
  n = per_run[0].shape[0]
  valid = jnp.ones((n,), bool) if valid is None else valid.astype(bool)
  # Replicated: the initial draw is a function of the global rows' validity alone.
  global_valid = parallel.gather_rows_replicated(valid.astype(jnp.int32), axis_name) > 0
  results = []
  for run, (k, x) in enumerate(zip(runs, per_run)):
    x = jnp.where(valid[:, None], l2_normalize(x), 0.0)
    rows = (initial_indices(jax.random.fold_in(key, run), global_valid, k)
            if start_rows is None else jnp.asarray(start_rows[run], jnp.int32))
    start = _global_rows(x, rows, axis_name)
    x_chunks, valid_chunks = _chunks(x, valid, chunk_rows)
    centroids, nearest = _kmeans(x_chunks, valid_chunks, start, num_iterations, axis_name)
    results.append(KMeansResult(centroids, nearest[:n]))
  return results


def own_rows(x: jax.Array, axis_name) -> tuple[jax.Array, jax.Array]:
  """This device's block of the rows of `x` [N, ...] (the same on every device), padded with
  zero rows to a multiple of the device count: (rows [ceil(N / devices), ...], bool mask of
  the real ones). Device i holds rows [i * ceil(N / devices), ...)."""
  total = x.shape[0]
  devices = 1 if axis_name is None else jax.lax.axis_size(axis_name)
  rows = -(-total // devices)
  padded = jnp.pad(x, ((0, rows * devices - total),) + ((0, 0),) * (x.ndim - 1))
  start = parallel.global_row_offset(rows, axis_name)
  real = start + jnp.arange(rows) < total
  return jax.lax.dynamic_slice_in_dim(padded, start, rows, axis=0), real


def spherical_kmeans_replicated(features, num_clusters: Sequence[int], key, *,
                                num_iterations: int = 10, valid: jax.Array | None = None,
                                axis_name=None, chunk_rows: int = 4096) -> list[KMeansResult]:
  """`spherical_kmeans` of features that every device holds whole ([N, d], or one such
  array per run; `valid` bool [N]): each device clusters its block of rows (`own_rows`), and
  the assignments of all N rows are gathered back, the same on every device (replicated:
  state a step can keep)."""
  per_run = list(features) if isinstance(features, (list, tuple)) else features
  total = (per_run[0] if isinstance(per_run, list) else per_run).shape[0]
  valid = jnp.ones((total,), bool) if valid is None else valid.astype(bool)
  local_valid, real = own_rows(valid, axis_name)
  local_valid = local_valid & real
  if isinstance(per_run, list):
    local = [own_rows(x, axis_name)[0] for x in per_run]
  else:
    local = own_rows(per_run, axis_name)[0]
  results = spherical_kmeans(local, num_clusters, key, num_iterations=num_iterations,
                             valid=local_valid, axis_name=axis_name, chunk_rows=chunk_rows)
  return [KMeansResult(r.centroids,
                       parallel.gather_rows_replicated(r.assignments, axis_name)[:total])
          for r in results]
