"""The decoupled contrastive loss, DCL and DCLW (Yeh et al. 2022, "Decoupled Contrastive
Learning"), over the whole global batch gathered across devices.

NT-Xent's denominator holds the positive pair next to the negatives; its gradient is then
scaled by a factor that shrinks when the positive dominates the denominator (their eq. 3-4,
the "negative-positive coupling"), which hurts most with few negatives. DCL removes the
positive from the denominator (eq. 6). With the cosine s+ of the query and its positive, the
cosines s_j of its M = 2N - 2 negatives (every other embedding of the global batch, as in
NT-Xent) and the temperature t:

    loss = -w s+ / t + log sum_j exp(s_j / t)

averaged over all 2N queries. DCL has w = 1. DCLW weights the positive term with the
negative von Mises-Fisher weighting (their Sec. 4, "DCLW"):

    w_i = 2 - exp(s+_i / sigma) / mean_k exp(s+_k / sigma) = 2 - N softmax_i(s+ / sigma)

over the N images of the global batch (both views of image i share w_i), which raises the
weight of pairs that are still far apart (hard positives; w in (2 - N, 2), mean 1).

As lightly's DCLWLoss (lightly/loss/dcl_loss.py), the weights are constants for the gradient
(lightly detaches them); there, with gather_distributed, each GPU normalises them over its
own sub-batch, here over the global batch, so the loss does not depend on the device count
(on one device the two agree).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_jax import parallel
from ssl_jax.losses import info_nce

WEIGHTINGS = ('none', 'vmf')

# Keeps masked entries out of log-sum-exps; float32 exp(-1e9) is exactly 0.
_MASK_VALUE = -1e9


def vmf_weights(pos_cos: jnp.ndarray, sigma: float, axis_name: str | None) -> jnp.ndarray:
  """DCLW's positive weights 2 - N softmax(s+ / sigma) of this device's images, the softmax
  over all N images of the global batch; no gradient flows through them.

  Args:
    pos_cos: [n] cosine between the two views of each of this device's images.
    sigma: the weighting's temperature.
    axis_name: mesh axis to gather the other devices' cosines over; None for one device.
  """
  # Constants for the gradient, as lightly's detached weights: only the cosines carry one.
  scaled = jax.lax.stop_gradient(pos_cos) / sigma
  all_scaled = parallel.gather_rows(scaled, axis_name)               # [N]
  num_images = all_scaled.shape[0]
  return 2.0 - num_images * jnp.exp(scaled - jax.nn.logsumexp(all_scaled))


def decoupled_nt_xent(z1: jnp.ndarray, z2: jnp.ndarray, temperature: float,
                      weighting: str = 'none', sigma: float = 0.5,
                      axis_name: str | None = None
                      ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """DCL (weighting 'none') or DCLW (weighting 'vmf').

  Args:
    z1, z2: this device's embeddings of the two views, [n, d]; row i of both is one image.
    temperature: softmax temperature t.
    weighting: 'none' (w = 1) or 'vmf' (the negative von Mises-Fisher weights).
    sigma: the vMF weighting's temperature (0.5 in the paper and lightly).
    axis_name: mesh axis to gather negatives over; None for one device.

  Returns:
    The loss averaged over all 2N queries of the global batch (identical on every device),
    and NT-Xent's metrics (positive and negative cosines, contrastive accuracy).
  """
  if weighting not in WEIGHTINGS:
    raise ValueError(f'weighting must be one of {WEIGHTINGS}, got {weighting!r}.')
  p = info_nce.pair_logits(z1, z2, temperature, axis_name)
  log_neg = jax.nn.logsumexp(jnp.where(p.is_neg, p.logits, _MASK_VALUE), axis=1)   # [2n]
  pos_logit = p.pos_logit                                                          # [2n]
  if weighting == 'vmf':
    # Rows 0..n-1 are the view-1 queries of this device's images, n..2n-1 their view 2.
    n = z1.shape[0]
    pos_cos = jnp.sum(jnp.where(p.is_pos, p.cos, 0.0), axis=1)[:n]
    weights = vmf_weights(pos_cos, sigma, axis_name)
    pos_logit = jnp.concatenate([weights, weights]) * pos_logit
  per_query = log_neg - pos_logit
  loss = parallel.psum(jnp.sum(per_query), axis_name) / (2 * p.num_images)
  return loss, info_nce.pair_metrics(p, axis_name)
