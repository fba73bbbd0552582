"""Spherical k-means (ssl_jax/clustering/kmeans.py) against a float64 numpy transcription of
DeepCluster-v2's `cluster_memory`, on 8 devices against 1, an empty cluster, and one iteration
computed by hand."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ssl_jax import parallel
from ssl_jax.clustering import initial_indices, spherical_kmeans, spherical_kmeans_replicated


def reference_kmeans(x, start, num_iterations, valid=None):
  """main_deepclusterv2.py's cluster_memory in float64 numpy, one process, the initial rows
  given: E step num_iterations + 1 times, M step (normalised mean; an empty cluster keeps its
  centroid) between them; rows not valid assigned -1."""
  x = np.asarray(x, np.float64)
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  valid = np.ones(len(x), bool) if valid is None else np.asarray(valid)
  centroids = x[np.asarray(start)].copy()
  for it in range(num_iterations + 1):
    assign = np.argmax(x @ centroids.T, axis=1)
    if it == num_iterations:
      break
    for k in range(len(centroids)):
      members = (assign == k) & valid
      if members.any():
        mean = x[members].mean(axis=0)
        centroids[k] = mean / np.linalg.norm(mean)
  return centroids, np.where(valid, assign, -1)


def clustered_features(n=240, d=8, seed=0):
  """n points around 6 random directions: clusters that k-means moves between."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(6, d))
  return (centres[rng.integers(0, 6, n)] + 0.7 * rng.normal(size=(n, d))).astype(np.float32)


def test_runs_equal_a_float64_numpy_reference():
  features = [clustered_features(seed=0), clustered_features(seed=1)]
  valid = np.random.default_rng(2).random(240) > 0.1
  ks = (5, 12, 3)
  per_run = [features[0], features[1], features[0]]
  key = jax.random.PRNGKey(7)
  results = jax.jit(lambda f, v: spherical_kmeans(f, ks, key, num_iterations=6, valid=v,
                                                  chunk_rows=64))(per_run, valid)
  for run, (k, x, got) in enumerate(zip(ks, per_run, results)):
    start = np.asarray(initial_indices(jax.random.fold_in(key, run), jnp.asarray(valid), k))
    assert len(set(start.tolist())) == k and valid[start].all()  # distinct valid rows
    centroids, assign = reference_kmeans(x, start, 6, valid)
    np.testing.assert_array_equal(np.asarray(got.assignments), assign, err_msg=f'run {run}')
    np.testing.assert_allclose(np.asarray(got.centroids), centroids, atol=2e-6,
                               err_msg=f'run {run}')
    # Not vacuous: the centroids moved away from the initial rows.
    x64 = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert np.abs(centroids - x64[start]).max() > 0.1


def test_eight_devices_equal_one():
  x = clustered_features(n=256)
  valid = np.arange(256) % 7 != 3
  ks = (6, 9)
  key = jax.random.PRNGKey(3)
  run = functools.partial(spherical_kmeans, num_clusters=ks, key=key, num_iterations=5,
                          chunk_rows=16)
  one = jax.jit(lambda x, v: run(x, valid=v))(x, valid)
  mesh = parallel.make_mesh(8)
  axis = parallel.DATA_AXIS
  many = jax.jit(jax.shard_map(
      lambda x, v: [(r.centroids, r.assignments) for r in run(x, valid=v, axis_name=axis)],
      mesh=mesh, in_specs=(P(axis), P(axis)), out_specs=[(P(), P(axis))] * len(ks)))(x, valid)
  for (c8, a8), r1 in zip(many, one):
    np.testing.assert_array_equal(np.asarray(a8), np.asarray(r1.assignments))
    np.testing.assert_allclose(np.asarray(c8), np.asarray(r1.centroids), atol=1e-6)


def test_replicated_features_on_eight_devices_equal_one():
  """N = 203 rows (not a multiple of 8: the last device's block is padding), whole on every
  device: the gathered assignments and the centroids are those of one device."""
  x = clustered_features(n=203)
  valid = np.arange(203) % 5 != 0
  key = jax.random.PRNGKey(4)
  run = functools.partial(spherical_kmeans_replicated, num_clusters=(7,), key=key,
                          num_iterations=4, chunk_rows=8)
  one = jax.jit(lambda x, v: run(x, valid=v))(x, valid)[0]
  axis = parallel.DATA_AXIS
  c8, a8 = jax.jit(jax.shard_map(
      lambda x, v: tuple(run(x, valid=v, axis_name=axis)[0]), mesh=parallel.make_mesh(8),
      in_specs=(P(), P()), out_specs=(P(), P())))(x, valid)
  assert a8.shape == (203,)
  np.testing.assert_array_equal(np.asarray(a8), np.asarray(one.assignments))
  np.testing.assert_allclose(np.asarray(c8), np.asarray(one.centroids), atol=1e-6)
  start = np.asarray(initial_indices(jax.random.fold_in(key, 0), jnp.asarray(valid), 7))
  np.testing.assert_array_equal(np.asarray(one.assignments),
                                reference_kmeans(x, start, 4, valid)[1])


def test_an_empty_cluster_keeps_its_centroid():
  """Rows 0 and 1 are the same point: started on both, the cluster of the later index gets
  no row (argmax takes the first of equal scores) and keeps its centroid, not a zero or
  NaN mean."""
  x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], np.float32)
  (result,) = spherical_kmeans(jnp.asarray(x), (3,), None, num_iterations=2,
                               start_rows=[jnp.array([2, 0, 1])])
  np.testing.assert_array_equal(np.asarray(result.assignments), [1, 1, 0, 0])
  mean = (x[2] + x[3]) / np.linalg.norm(x[2] + x[3])
  np.testing.assert_allclose(np.asarray(result.centroids), [mean, x[0], x[1]], atol=1e-7)


def test_one_iteration_by_hand():
  """Unit rows r0 = (1, 0), r1 = (0.8, 0.6), r2 = (0, 1), r3 = (-0.6, 0.8), started on rows 0
  and 2. E step: r0, r1 nearer (1, 0); r2, r3 nearer (0, 1). M step: normalised means
  (1.8, 0.6) / sqrt(3.6) = (3, 1) / sqrt(10) and (-0.6, 1.8) / sqrt(3.6) = (-1, 3) / sqrt(10).
  Final E step: the same assignments (scores 0.949 vs 0.316 for every row). Unnormalised
  rows (x 2, x 0.5) give the same: the features are l2-normalised first."""
  x = np.array([[2.0, 0.0], [0.8, 0.6], [0.0, 0.5], [-0.6, 0.8]], np.float32)
  (result,) = spherical_kmeans(jnp.asarray(x), (2,), None, num_iterations=1,
                               start_rows=[jnp.array([0, 2])])
  np.testing.assert_array_equal(np.asarray(result.assignments), [0, 0, 1, 1])
  np.testing.assert_allclose(np.asarray(result.centroids),
                             np.array([[3.0, 1.0], [-1.0, 3.0]]) / np.sqrt(10.0), atol=1e-7)
  # Zero iterations: the initial rows, normalised, and their assignments.
  (start,) = spherical_kmeans(jnp.asarray(x), (2,), None, num_iterations=0,
                              start_rows=[jnp.array([0, 2])])
  np.testing.assert_allclose(np.asarray(start.centroids), [[1.0, 0.0], [0.0, 1.0]])
  np.testing.assert_array_equal(np.asarray(start.assignments), [0, 0, 1, 1])
