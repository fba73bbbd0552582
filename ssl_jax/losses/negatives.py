"""Debiased (Chuang et al. 2020) and hard-negative (Robinson et al. 2021) estimators of the
negative term of NT-Xent, over the whole global batch gathered across devices.

NT-Xent treats every other embedding of the batch as a negative, although some of them are
images of the query's own (unknown) class. With the positive pos = exp(s+ / t), the M = 2N - 2
negatives neg_j = exp(s_j / t) and the class prior tau_plus, the debiased estimate of the
negative term (Chuang et al. 2020, eq. 6 / Algorithm 1) subtracts the positives expected
among them and is floored at its theoretical minimum:

    Ng = max((sum_j neg_j - M tau_plus pos) / (1 - tau_plus),  M e^{-1/t})
    loss = -log(pos / (pos + Ng))

Hard-negative sampling (Robinson et al. 2021, eq. 3-5 and their code) replaces sum_j neg_j by
an importance-weighted sum whose weights are proportional to neg_j^beta, normalised to mean
1 over the negatives: sum_j M softmax_j(beta s_j / t) neg_j. As in their code, gradients
flow through the weights. beta = 0 is the debiased loss, and tau_plus = beta = 0 is NT-Xent.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ssl_jax import parallel
from ssl_jax.losses import info_nce

# Keeps masked entries out of log-sum-exps; float32 exp(-1e9) is exactly 0.
_MASK_VALUE = -1e9


def _masked_logsumexp(x, mask):
  return jax.nn.logsumexp(jnp.where(mask, x, _MASK_VALUE), axis=1)


def debiased_nt_xent(z1: jnp.ndarray, z2: jnp.ndarray, temperature: float,
                     tau_plus: float = 0.1, beta: float = 0.0,
                     axis_name: str | None = None
                     ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """The debiased (beta = 0) or hard-negative (beta > 0) contrastive loss.

  Args:
    z1, z2: this device's embeddings of the two views, [n, d]; row i of both is one image.
    temperature: softmax temperature t.
    tau_plus: class prior, the probability that a random negative shares the query's class.
    beta: concentration of the importance weights on hard negatives.
    axis_name: mesh axis to gather negatives over; None for one device.

  Returns:
    The loss averaged over all 2N queries of the global batch, and NT-Xent's metrics.
  """
  if not 0.0 <= tau_plus < 1.0:
    raise ValueError(f'tau_plus must be in [0, 1), got {tau_plus}.')
  p = info_nce.pair_logits(z1, z2, temperature, axis_name)
  is_neg = p.is_neg
  num_neg = 2 * p.num_images - 2
  pos_logit = p.pos_logit
  # Everything is computed in log space, so no exp(s / t) can overflow or underflow
  # whatever the temperature. log of sum_j M w_j neg_j with w = softmax(beta * logits):
  log_neg = (math.log(num_neg) + _masked_logsumexp((1.0 + beta) * p.logits, is_neg)
             - _masked_logsumexp(beta * p.logits, is_neg))
  # Subtracting the expected positives: Ng = neg (1 - r) / (1 - tau_plus) with
  # r = M tau_plus pos / neg. Where r >= 1 the estimate is non-positive and the floor wins;
  # log r is replaced there so that neither value nor gradient sees log(<= 0).
  log_m_tau = math.log(num_neg * tau_plus) if tau_plus > 0 else -math.inf
  log_r = pos_logit - log_neg + log_m_tau
  valid = log_r < 0
  safe_log_r = jnp.where(valid, log_r, -1.0)
  # log(1 - r) as log(-expm1(log r)): log1p(-exp(x)) rounds exp(x) to 1 for x just below 0,
  # and its log(0) would turn the zero gradient of the losing branch of max() into a NaN.
  log_estimate = log_neg + jnp.log(-jnp.expm1(safe_log_r)) - math.log1p(-tau_plus)
  log_floor = math.log(num_neg) - 1.0 / temperature
  log_ng = jnp.where(valid, jnp.maximum(log_estimate, log_floor), log_floor)
  per_query = jnp.logaddexp(pos_logit, log_ng) - pos_logit
  loss = parallel.psum(jnp.sum(per_query), axis_name) / (2 * p.num_images)
  return loss, info_nce.pair_metrics(p, axis_name)
