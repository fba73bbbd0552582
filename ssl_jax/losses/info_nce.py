"""NT-Xent / InfoNCE (SimCLR, Chen et al. 2020, eq. 1) with negatives gathered across devices.

With a global batch of N images, two views each, every one of the 2N embeddings is a query:
its positive is the other view of the same image and its 2(N - 1) negatives are all the other
embeddings of the global batch. Under `shard_map`, each device holds n = N / devices images;
it gathers all 2N embeddings as columns and computes only its own 2n rows, so the work and
memory per device is 2n x 2N and the result equals the single-device computation.

`pair_logits` and `pair_metrics` are the pieces shared with the other estimators of the
negative term (`losses/negatives.py`); `info_nce_with_negatives` is the MoCo-style variant
whose negatives are an explicit set of vectors (AdCo's learnable bank) next to the batch keys.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ssl_jax import parallel, precision

# Large but finite: -inf would make softmax gradients NaN on fully masked rows, and
# float32 exp(-1e9) is exactly 0.
_MASK_VALUE = -1e9


def l2_normalize(x: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
  """x / ||x|| along the last axis, in float32 (or float64) whatever x's dtype: the
  normalisation of embeddings is a float32 island (`precision`)."""
  x = precision.to_float32(x)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


class PairLogits(NamedTuple):
  """This device's 2n query rows against the 2N gathered columns of a two-view batch."""
  cos: jnp.ndarray        # [2n, 2N] cosine similarities
  logits: jnp.ndarray     # [2n, 2N] cos / temperature, the query's own column masked out
  is_self: jnp.ndarray    # [2n, 2N] bool: the query itself
  is_pos: jnp.ndarray     # [2n, 2N] bool: the other view of the query's image
  pos_col: jnp.ndarray    # [2n] column of each query's positive
  num_images: int         # N, the global batch

  @property
  def is_neg(self) -> jnp.ndarray:
    return ~(self.is_self | self.is_pos)

  @property
  def pos_logit(self) -> jnp.ndarray:
    return jnp.sum(jnp.where(self.is_pos, self.logits, 0.0), axis=1)


def pair_logits(z1: jnp.ndarray, z2: jnp.ndarray, temperature: float,
                axis_name: str | None = None) -> PairLogits:
  """Similarities of this device's queries (both views) with every embedding of the batch."""
  n = z1.shape[0]
  z1, z2 = precision.to_float32((z1, z2))
  q = l2_normalize(jnp.concatenate([z1, z2], axis=0))                 # [2n, d] local queries
  k1 = parallel.gather_rows(l2_normalize(z1), axis_name)                # [N, d]
  k2 = parallel.gather_rows(l2_normalize(z2), axis_name)
  big_n = k1.shape[0]
  keys = jnp.concatenate([k1, k2], axis=0)                               # [2N, d] all columns
  cos = precision.matmul(q, keys.T)                                      # [2n, 2N]
  is_self, is_pos, pos_col = pair_columns(n, big_n, axis_name)
  logits = jnp.where(is_self, _MASK_VALUE, cos / temperature)
  return PairLogits(cos, logits, is_self, is_pos, pos_col, big_n)


def pair_columns(n: int, big_n: int, axis_name: str | None):
  """(is_self [2n, 2N], is_pos [2n, 2N], pos_col [2n]): where this device's 2n queries (its
  rows of view 1, then of view 2) find themselves and their positive among the 2N gathered
  columns (all of view 1, then all of view 2).

  Query r < n is view 1 of global image (offset + r): its own column is offset + r and its
  positive is N + offset + r; for view-2 queries the two swap."""
  offset = parallel.global_row_offset(n, axis_name)
  image = offset + jnp.arange(n)
  self_col = jnp.concatenate([image, big_n + image])
  pos_col = jnp.concatenate([big_n + image, image])
  cols = jnp.arange(2 * big_n)
  return cols[None, :] == self_col[:, None], cols[None, :] == pos_col[:, None], pos_col


def pair_metrics(p: PairLogits, axis_name: str | None) -> dict[str, jnp.ndarray]:
  """Mean cosine of positive and of negative pairs, and the contrastive top-1 accuracy (how
  often the positive is the most similar candidate), over the global batch."""
  num_queries = 2 * p.num_images
  pos_cos = jnp.sum(jnp.where(p.is_pos, p.cos, 0.0))
  neg_cos = jnp.sum(jnp.where(p.is_neg, p.cos, 0.0))
  correct = jnp.sum(jnp.argmax(p.logits, axis=1) == p.pos_col)
  metrics = {
      'pos_cosine': parallel.psum(pos_cos, axis_name) / num_queries,
      'neg_cosine': parallel.psum(neg_cos, axis_name) / (num_queries * (2 * p.num_images - 2)),
      'contrastive_acc': parallel.psum(correct, axis_name) / num_queries,
  }
  return jax.lax.stop_gradient(metrics)


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
  p = pair_logits(z1, z2, temperature, axis_name)
  per_query = jax.nn.logsumexp(p.logits, axis=1) - p.pos_logit
  loss = parallel.psum(jnp.sum(per_query), axis_name) / (2 * p.num_images)
  return loss, pair_metrics(p, axis_name)


def info_nce_with_negatives(q: jnp.ndarray, k: jnp.ndarray, negatives: jnp.ndarray,
                            temperature: float, axis_name: str | None = None
                            ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """InfoNCE of queries against the batch's keys and an explicit set of negatives (MoCo's
  eq. 1 with AdCo's candidates: Hu et al. 2021, as in their released code).

  Query i's positive is key i; its negatives are the other N - 1 keys of the global batch
  (gathered across devices) and the K rows of `negatives` (l2-normalised here, so a bank of
  free vectors can be optimised directly). The loss is differentiable in all three inputs.

  Args:
    q, k: this device's queries and keys, [n, d], already l2-normalised.
    negatives: [K, d], the same on every device.
    temperature: softmax temperature.
    axis_name: mesh axis to gather keys over; None for one device.

  Returns:
    The cross-entropy averaged over the N queries of the global batch, and metrics: mean
    cosine of the positive pairs and of the queries with the explicit negatives, and the
    top-1 accuracy over all N + K candidates.
  """
  n = q.shape[0]
  q, k, negatives = precision.to_float32((q, k, negatives))
  keys = parallel.gather_rows(k, axis_name)                              # [N, d]
  big_n = keys.shape[0]
  batch_cos = precision.matmul(q, keys.T)                                # [n, N]
  bank_cos = precision.matmul(q, l2_normalize(negatives).T)              # [n, K]
  logits = jnp.concatenate([batch_cos, bank_cos], axis=1) / temperature
  pos_col = parallel.global_row_offset(n, axis_name) + jnp.arange(n)
  pos_logit = jnp.take_along_axis(logits, pos_col[:, None], axis=1)[:, 0]
  per_query = jax.nn.logsumexp(logits, axis=1) - pos_logit
  loss = parallel.psum(jnp.sum(per_query), axis_name) / big_n

  pos_cos = jnp.take_along_axis(batch_cos, pos_col[:, None], axis=1)
  correct = jnp.sum(jnp.argmax(logits, axis=1) == pos_col)
  metrics = {
      'pos_cosine': parallel.psum(jnp.sum(pos_cos), axis_name) / big_n,
      'bank_cosine': parallel.psum(jnp.sum(bank_cos), axis_name) / (big_n * bank_cos.shape[1]),
      'contrastive_acc': parallel.psum(correct, axis_name) / big_n,
  }
  return loss, jax.lax.stop_gradient(metrics)
