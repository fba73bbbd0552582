"""ProtoNCE (Li et al. 2021, "Prototypical contrastive learning of unsupervised
representations", Sec. 3.2; the reference is salesforce/PCL's pcl/builder.py and main_pcl.py):
each query is contrasted with the prototype (k-means centroid) of its example's cluster
against r prototypes of other clusters, each prototype's logit divided by its cluster's
concentration phi (Sec. 3.3) instead of one temperature.

  L_ProtoNCE = -1/M sum_m log exp(v.c_s / phi_s) / sum_{j in {s} + r negatives} exp(v.c_j / phi_j)

averaged over the M granularities (the k-means runs with different K) and added to MoCo's
InfoNCE by the method (methods/pcl.py).

Under `shard_map` each device scores its own rows against the same columns (the prototypes
of the global batch's clusters, then the r negatives), so the loss equals the single-device
computation on the global batch; phi's per-cluster sums are taken over each device's rows
of the memory bank and summed over devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_jax import parallel, precision, sharding
from ssl_jax.losses.info_nce import l2_normalize

# alpha of phi's estimate (Sec. 3.3): it smooths phi so that small clusters do not get an
# overly large one (the reference: log(len(dist) + 10)).
CONCENTRATION_SMOOTHING = 10.0
# The reference clamps phi to its 10th-90th percentile over the clusters "for stability".
CONCENTRATION_PERCENTILES = (10.0, 90.0)


def _per_cluster_sums(values, assignments, num_clusters: int, chunk_rows: int):
  """Sums of `values` [n] and counts of the rows of each cluster (`assignments` int32 [n],
  -1: none) over this device's rows, as one-hot reductions in chunks of rows: deterministic
  on every backend (a scatter-add is not on GPUs), like the k-means sums."""
  n = values.shape[0]
  chunk = max(1, min(chunk_rows, n))
  pad = -n % chunk
  values = jnp.pad(values, (0, pad)).reshape(-1, chunk)
  assignments = jnp.pad(assignments, (0, pad), constant_values=-1).reshape(-1, chunk)
  clusters = jnp.arange(num_clusters)

  def one_chunk(carry, inputs):
    v, a = inputs
    members = a[:, None] == clusters[None, :]                    # [chunk, K]
    sums, counts = carry
    return (sums + jnp.sum(jnp.where(members, v[:, None], 0.0), axis=0),
            counts + jnp.sum(members, axis=0, dtype=jnp.int32)), None

  zeros = (jnp.zeros((num_clusters,), values.dtype), jnp.zeros((num_clusters,), jnp.int32))
  axes = tuple(sharding.varying_axes(values))
  if axes:  # under shard_map the carry varies over the devices from the start
    zeros = jax.lax.pcast(zeros, axes, to='varying')
  (sums, counts), _ = jax.lax.scan(one_chunk, zeros, (values, assignments))
  return sums, counts


def concentration(features, assignments, centroids, temperature: float, axis_name=None,
                  chunk_rows: int = 4096):
  """phi of every cluster (Sec. 3.3, as the reference computes it), the same on every device.

  phi_c = mean_{z in c} ||v_z - c||_2 / log(Z_c + alpha), for Z_c > 1 members; a cluster
  of at most one member gets the largest phi of the others; then clipped to the 10th-90th
  percentile over the clusters and scaled so that the mean is `temperature`.

  The distance is to the unit centroid c: the prototype that the k-means assigned by and
  that ProtoNCE scores against (||v - c||^2 = 2 - 2 v.c for unit v). The reference measures
  it to faiss' unnormalised (Euclidean) centroid before normalising it; with spherical
  k-means the unit centroid is the cluster's centre, and the paper's estimate writes
  ||v'_z - c||.

  Args:
    features: this device's rows of the embeddings [n, d] (l2-normalised here).
    assignments: int32 [n], each row's cluster (-1: the row takes no part).
    centroids: [K, d] unit prototypes, the same on every device.
    temperature: the mean of the returned phi (the InfoNCE temperature tau).
    axis_name: the mesh axes the rows are split over (None: one device).
    chunk_rows: rows reduced at a time (memory: a chunk's [chunk, K] one-hot).

  Returns:
    phi [K], replicated.
  """
  v = l2_normalize(precision.to_float32(features))
  own = jnp.take(centroids, jnp.maximum(assignments, 0), axis=0)
  distance = jnp.sqrt(jnp.maximum(2.0 - 2.0 * jnp.sum(v * own, axis=1), 0.0))
  sums, counts = _per_cluster_sums(distance, assignments, centroids.shape[0], chunk_rows)
  sums, counts = parallel.psum((sums, counts), axis_name)
  several = counts > 1
  phi = jnp.where(several, sums / jnp.maximum(counts, 1).astype(sums.dtype)
                  / jnp.log(counts.astype(sums.dtype) + CONCENTRATION_SMOOTHING), 0.0)
  phi = jnp.where(several, phi, jnp.max(phi))
  low, high = jnp.percentile(phi, jnp.asarray(CONCENTRATION_PERCENTILES, phi.dtype))
  phi = jnp.clip(phi, low, high)
  mean = jnp.mean(phi)
  # All distances 0 (every cluster a single repeated point): no spread to rank, one tau.
  return jnp.where(mean > 0, temperature * phi / jnp.where(mean > 0, mean, 1.0), temperature)


def sample_negatives(key, positives, num_clusters: int, num_negatives: int):
  """r distinct cluster ids drawn uniformly among the clusters not in `positives` (int32,
  the global batch's clusters; -1 entries ignored), as the reference's
  `sample(set(all) - set(pos), r)`: the clusters sorted by (positive, random bits), the
  first r. A function of (key, positives) alone, so the same on every device; random bits
  rather than uniform floats, so the same also when traced in float64 (tests' references).
  Needs r <= K - (distinct positives); `PCL.method_problems` checks r <= K - batch size."""
  bits = jax.random.bits(key, (num_clusters,), jnp.uint32)
  slot = jnp.where(positives >= 0, positives, num_clusters)  # out of range: dropped
  is_positive = jnp.zeros((num_clusters,), bool).at[slot].set(True, mode='drop')
  return jnp.lexsort((bits, is_positive))[:num_negatives].astype(jnp.int32)


def proto_nce(queries, clusters, negatives, prototypes, phi, axis_name=None):
  """ProtoNCE of one granularity (one term of Sec. 3.2's sum over granularities; the
  reference's `logits_proto`).

  Columns: the prototypes of the global batch's clusters, in global-batch order (an
  example's column is its row; examples of one cluster repeat its prototype, as in the
  reference), then the r negatives. Logits v.c_j / phi_j; label: the row's own column.
  Rows without a cluster (-1: not in the memory bank when k-means ran) are left out, and
  their columns masked.

  Args:
    queries: this device's rows [n, d] (l2-normalised here).
    clusters: int32 [N], the cluster of every example of the global batch (replicated).
    negatives: int32 [r], the negative clusters (replicated, `sample_negatives`).
    prototypes: [K, d] unit centroids; phi: [K] concentrations (replicated, no gradient).
    axis_name: the mesh axis the batch is split over (None: one device).

  Returns:
    (loss: the mean over the global batch's rows with a cluster, identical on every device,
     metrics: 'proto_acc', how often the largest logit is the row's own prototype, and
     'clustered_fraction', the fraction of rows with a cluster).
  """
  q = l2_normalize(queries)
  n, big_n = q.shape[0], clusters.shape[0]
  columns = jnp.concatenate([jnp.maximum(clusters, 0), negatives])
  selected = precision.to_float32(jnp.take(prototypes, columns, axis=0))
  logits = precision.matmul(q, selected.T) / jnp.take(phi, columns)[None, :]
  column_ok = jnp.concatenate([clusters >= 0, jnp.ones(negatives.shape, bool)])
  logits = jnp.where(column_ok[None, :], logits, -jnp.inf)
  label = parallel.global_row_offset(n, axis_name) + jnp.arange(n)
  has = jnp.take(clusters, label) >= 0
  picked = jnp.take_along_axis(logits, label[:, None], axis=1)[:, 0]
  per_row = jnp.where(has, jax.nn.logsumexp(logits, axis=1) - jnp.where(has, picked, 0.0),
                      0.0)
  count = parallel.psum(jnp.sum(has.astype(jnp.float32)), axis_name)
  loss = parallel.psum(jnp.sum(per_row), axis_name) / jnp.maximum(count, 1.0)
  # A hit: the largest logit is a copy of the row's own prototype (examples of one cluster
  # share it, so comparing columns would count ties between copies as misses).
  own = jnp.take(clusters, label)
  hits = has & (jnp.take(columns, jnp.argmax(logits, axis=1)) == own)
  metrics = {'proto_acc': parallel.psum(jnp.sum(hits.astype(jnp.float32)), axis_name)
                          / jnp.maximum(count, 1.0),
             'clustered_fraction': count / big_n}
  return loss, jax.lax.stop_gradient(metrics)
