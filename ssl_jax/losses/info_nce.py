"""NT-Xent / InfoNCE (SimCLR, Chen et al. 2020, eq. 1) with negatives gathered across devices.

With a global batch of N images, two views each, every one of the 2N embeddings is a query:
its positive is the other view of the same image and its 2(N - 1) negatives are all the other
embeddings of the global batch. Under `shard_map`, each device holds n = N / devices images;
it gathers all 2N embeddings as columns and computes only its own 2n rows, so the work and
memory per device is 2n x 2N and the result equals the single-device computation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_jax import parallel

# Large but finite: -inf would make softmax gradients NaN on fully masked rows, and
# float32 exp(-1e9) is exactly 0.
_MASK_VALUE = -1e9


def l2_normalize(x: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def nt_xent(z1: jnp.ndarray, z2: jnp.ndarray, temperature: float,
            axis_name: str | None = None) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """NT-Xent over the global batch.

  Args:
    z1, z2: this device's embeddings of the two views, [n, d]; row i of both is one image.
    temperature: softmax temperature tau.
    axis_name: mesh axis to gather negatives over; None for one device.

  Returns:
    The loss averaged over all 2N queries of the global batch (identical on every device),
    and metrics: mean cosine similarity of positive and of negative pairs, and the
    contrastive top-1 accuracy (how often the positive is the most similar candidate).
  """
  n = z1.shape[0]
  q = l2_normalize(jnp.concatenate([z1, z2], axis=0))                 # [2n, d] local queries
  k1 = parallel.gather_rows(l2_normalize(z1), axis_name)                # [N, d]
  k2 = parallel.gather_rows(l2_normalize(z2), axis_name)
  big_n = k1.shape[0]
  keys = jnp.concatenate([k1, k2], axis=0)                               # [2N, d] all columns
  cos = q @ keys.T                                                       # [2n, 2N]

  # Query r < n is view 1 of global image (offset + r): its own column is offset + r and its
  # positive is N + offset + r; for view-2 queries the two swap.
  offset = parallel.global_row_offset(n, axis_name)
  image = offset + jnp.arange(n)
  self_col = jnp.concatenate([image, big_n + image])
  pos_col = jnp.concatenate([big_n + image, image])
  cols = jnp.arange(2 * big_n)
  is_self = cols[None, :] == self_col[:, None]
  is_pos = cols[None, :] == pos_col[:, None]

  logits = jnp.where(is_self, _MASK_VALUE, cos / temperature)
  pos_logit = jnp.sum(jnp.where(is_pos, logits, 0.0), axis=1)
  per_query = jax.nn.logsumexp(logits, axis=1) - pos_logit
  num_queries = 2 * big_n
  loss = parallel.psum(jnp.sum(per_query), axis_name) / num_queries

  is_neg = ~(is_self | is_pos)
  pos_cos = jnp.sum(jnp.where(is_pos, cos, 0.0))
  neg_cos = jnp.sum(jnp.where(is_neg, cos, 0.0))
  correct = jnp.sum(jnp.argmax(logits, axis=1) == pos_col)
  metrics = {
      'pos_cosine': parallel.psum(pos_cos, axis_name) / num_queries,
      'neg_cosine': parallel.psum(neg_cos, axis_name) / (num_queries * (2 * big_n - 2)),
      'contrastive_acc': parallel.psum(correct, axis_name) / num_queries,
  }
  return loss, jax.lax.stop_gradient(metrics)
