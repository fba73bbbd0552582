"""InfoNCE of queries against keys: MoCo's two forms, with negatives from a queue or from the
global batch.

`queue_info_nce` is MoCo (He et al. 2020, eq. 1; Chen et al. 2020, "Improved baselines"):
each query's positive is the key of the other view of its image, its negatives the K keys in
the queue. `batch_info_nce` is MoCo v3's ctr(q, k) (Chen, Xie & He 2021, Algorithm 1) and
NNCLR's loss (Dwibedi et al. 2021, eq. 2): the keys of the whole global batch are the
candidates, and the positive of query i is key i.

Under `shard_map` each device holds n of the N queries; it computes its own rows (against
the replicated queue, or against all N keys gathered from every device) and the loss is
summed over devices, so it equals the single-device computation on the global batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_jax import parallel, precision
from ssl_jax.losses.info_nce import l2_normalize


def _global_mean(x: jnp.ndarray, count, axis_name: str | None) -> jnp.ndarray:
  return parallel.psum(jnp.sum(x), axis_name) / count


def queue_info_nce(queries: jnp.ndarray, keys: jnp.ndarray, queue: jnp.ndarray,
                   temperature: float, axis_name: str | None = None
                   ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """-log exp(q.k+ / T) / (exp(q.k+ / T) + sum_queue exp(q.k / T)), averaged over the global
  batch (He et al. 2020, eq. 1).

  Args:
    queries, keys: this device's rows, [n, d]; row i of `keys` is query i's positive. Both
      are l2-normalised here.
    queue: [K, d] unit-norm negative keys, the same on every device.
    temperature: tau.
    axis_name: mesh axis the batch is split over; None for one device.

  Returns:
    The loss (identical on every device) and metrics: mean cosine of the positive pairs and
    of query-queue pairs, and how often the positive is the most similar candidate.
  """
  queue = precision.to_float32(queue)
  q = l2_normalize(queries)
  k = l2_normalize(keys)
  pos = jnp.sum(q * k, axis=1, keepdims=True)                   # [n, 1]
  neg = precision.matmul(q, queue.T)                             # [n, K]
  # The positive is column 0: MoCo's reference code puts it first and uses label 0.
  logits = jnp.concatenate([pos, neg], axis=1) / temperature
  per_query = jax.nn.logsumexp(logits, axis=1) - logits[:, 0]
  big_n = parallel.psum(q.shape[0], axis_name)
  metrics = {
      'pos_cosine': _global_mean(pos, big_n, axis_name),
      'neg_cosine': _global_mean(neg, big_n * queue.shape[0], axis_name),
      'contrastive_acc': _global_mean(jnp.argmax(logits, axis=1) == 0, big_n, axis_name),
  }
  return _global_mean(per_query, big_n, axis_name), jax.lax.stop_gradient(metrics)


def batch_info_nce(queries: jnp.ndarray, keys: jnp.ndarray, temperature: float,
                   axis_name: str | None = None
                   ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """-log exp(q_i.k_i / T) / sum_j exp(q_i.k_j / T) over the N keys of the global batch,
  averaged over the global batch's N queries.

  Args:
    queries, keys: this device's rows, [n, d]; global query i's positive is global key i.
      Both are l2-normalised here. Gradients flow to the keys as well (through the gather):
      NNCLR trains its predictions as keys; MoCo v3 passes stop-gradient'ed momentum keys.
    temperature: tau.
    axis_name: mesh axis the batch is split over; None for one device.

  Returns:
    The loss (identical on every device) and metrics as `queue_info_nce`'s, the negatives
    being the N - 1 other keys of the global batch.
  """
  n = queries.shape[0]
  q = l2_normalize(queries)
  all_keys = parallel.gather_rows(l2_normalize(keys), axis_name)   # [N, d]
  big_n = all_keys.shape[0]
  cos = precision.matmul(q, all_keys.T)                            # [n, N]
  pos_col = parallel.global_row_offset(n, axis_name) + jnp.arange(n)
  is_pos = jnp.arange(big_n)[None, :] == pos_col[:, None]
  logits = cos / temperature
  pos_logit = jnp.sum(jnp.where(is_pos, logits, 0.0), axis=1)
  per_query = jax.nn.logsumexp(logits, axis=1) - pos_logit
  metrics = {
      'pos_cosine': _global_mean(jnp.where(is_pos, cos, 0.0), big_n, axis_name),
      'neg_cosine': _global_mean(jnp.where(is_pos, 0.0, cos), big_n * max(big_n - 1, 1),
                                 axis_name),
      'contrastive_acc': _global_mean(jnp.argmax(logits, axis=1) == pos_col, big_n,
                                      axis_name),
  }
  return _global_mean(per_query, big_n, axis_name), jax.lax.stop_gradient(metrics)
