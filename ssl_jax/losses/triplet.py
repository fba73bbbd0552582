"""Triplet loss with semi-hard negative mining (Schroff et al. 2015, FaceNet, eq. 1 and
Sec. 3.2), over the global batch gathered across devices.

Every l2-normalised embedding of the global batch is an anchor (both views, as TF-Addons'
`triplet_semihard_loss` does given image ids as labels); its positive is the other view of
the same image and its candidate negatives are both views of every other image. With squared
Euclidean distances d, the semi-hard negative is the closest candidate farther than the
positive (d_an > d_ap, FaceNet's eq. 4; only those within the margin, d_an < d_ap + margin,
give a non-zero loss). When there is none, the loss falls back as TF-Addons does, to the
farthest candidate (`fallback='easiest'`, the default), or to the closest one
(`fallback='hardest'`). The loss is mean_anchors relu(d_ap - d_an + margin).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_jax import parallel, precision
from ssl_jax.losses.info_nce import l2_normalize

# Squared distances of unit vectors lie in [0, 4]; these stand in for +-infinity in masked
# minima and maxima without making their gradients NaN.
_FAR = 1e9

FALLBACKS = ('easiest', 'hardest')


def semihard_triplet(z1: jnp.ndarray, z2: jnp.ndarray, margin: float = 0.2,
                     fallback: str = 'easiest', axis_name: str | None = None
                     ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """Semi-hard triplet loss, every embedding of the batch an anchor.

  Args:
    z1, z2: this device's embeddings of the two views, [n, d]; row i of both is one image.
    margin: alpha, the margin enforced between positive and negative distances.
    fallback: negative used when an anchor has no semi-hard one: 'easiest' (the farthest
      candidate, as TF-Addons) or 'hardest' (the closest).
    axis_name: mesh axis to gather candidates over; None for one device.

  Returns:
    The loss averaged over the 2N anchors of the global batch, and metrics: mean anchor-
    positive and anchor-negative distances of the triplets used, the fraction of anchors that
    had a negative farther than the positive, and the fraction with a non-zero loss.
  """
  if fallback not in FALLBACKS:
    raise ValueError(f'fallback must be one of {FALLBACKS}, got {fallback!r}.')
  n = z1.shape[0]
  u1, u2 = l2_normalize(z1), l2_normalize(z2)
  anchors = jnp.concatenate([u1, u2], axis=0)                            # [2n, d]
  c1 = parallel.gather_rows(u1, axis_name)                               # [N, d]
  c2 = parallel.gather_rows(u2, axis_name)
  big_n = c1.shape[0]
  candidates = jnp.concatenate([c1, c2], axis=0)                         # [2N, d]
  # |a - c|^2 expanded, so the [2n, 2N] matrix never needs a [2n, 2N, d] intermediate; the
  # clip removes the small negatives rounding leaves for (near-)identical vectors.
  sq = jnp.sum(candidates * candidates, axis=1)
  dist = jnp.maximum(jnp.sum(anchors * anchors, axis=1)[:, None] + sq[None, :]
                     - 2.0 * precision.matmul(anchors, candidates.T), 0.0)  # [2n, 2N]

  # Anchor row r < n is view 1 of global image (offset + r), row n + r its view 2; column c
  # is view 1 of image c for c < N, view 2 of image c - N otherwise.
  image = parallel.global_row_offset(n, axis_name) + jnp.arange(n)
  anchor_image = jnp.concatenate([image, image])
  pos_col = jnp.concatenate([big_n + image, image])
  col_image = jnp.concatenate([jnp.arange(big_n), jnp.arange(big_n)])
  own_image = col_image[None, :] == anchor_image[:, None]
  d_ap = jnp.take_along_axis(dist, pos_col[:, None], axis=1)             # [2n, 1]
  # The selection is a stop-gradient choice of which distance to use; the gradient then
  # flows through the chosen d_an (and d_ap) only, as in FaceNet.
  semihard = ~own_image & (dist > d_ap)
  has_semihard = jnp.any(semihard, axis=1)
  d_semihard = jnp.min(jnp.where(semihard, dist, _FAR), axis=1)
  if fallback == 'easiest':
    d_fallback = jnp.max(jnp.where(own_image, -_FAR, dist), axis=1)
  else:
    d_fallback = jnp.min(jnp.where(own_image, _FAR, dist), axis=1)
  d_an = jnp.where(has_semihard, d_semihard, d_fallback)
  d_ap = d_ap[:, 0]
  per_anchor = jax.nn.relu(d_ap - d_an + margin)

  def mean(x):
    return parallel.psum(jnp.sum(x), axis_name) / (2 * big_n)

  loss = mean(per_anchor)
  metrics = {
      'pos_distance': mean(d_ap),
      'neg_distance': mean(d_an),
      'semihard_fraction': mean(has_semihard.astype(jnp.float32)),
      'active_fraction': mean((per_anchor > 0).astype(jnp.float32)),
  }
  return loss, jax.lax.stop_gradient(metrics)
