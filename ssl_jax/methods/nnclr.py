"""NNCLR (Dwibedi et al. 2021, "With a Little Help from My Friends: Nearest-Neighbor
Contrastive Learning of Visual Representations").

SimCLR with a nearest neighbour as the positive: each image's view-1 projection z1 is replaced
by its nearest neighbour NN(z1, Q) in a support set Q of projections of earlier batches, and
that neighbour must pick out the prediction p2 of the image's other view among the
predictions of the whole global batch (eq. 2; p = predictor(z), Sec. 3.3). The loss is
symmetrised with NN(z2, Q) against p1, the two terms averaged. Neighbours are looked up in
the stored support set and carry no gradient: gradients reach the encoder through the
predictions, which are gathered from every device as the candidates (in-batch negatives).

The support set is a FIFO queue in `method_state` (`losses/queue.py`): after the loss, the
normalised view-1 projections of the global batch, gathered from all devices, replace its
oldest entries, so it is the same on every device. It starts as random unit vectors (as in
the public implementations); projections of real images lie closer to each other than random
directions do, so from the second step on the neighbours are mostly real projections, long
before they fill the support set (`nn_cosine` shows it; README, "Notes from development").

Both views go through the network as one batch (as SimCLR, on whose code NNCLR builds), so
BatchNorm, synchronised over the global batch, normalises them with the same statistics.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ssl_jax import parallel
from ssl_jax.losses import queue as queue_lib
from ssl_jax.losses.info_nce import l2_normalize
from ssl_jax.losses.moco import batch_info_nce
from ssl_jax.methods.base import Method
from ssl_jax.methods.common import (EncoderProjectorPredictor, forward_together,
                                    mean_metrics, mlp, projector)
from ssl_jax.models import build_encoder


def nnclr_loss(z1, z2, p1, p2, support, temperature: float, axis_name: str | None = None):
  """(InfoNCE(NN(z1, Q), p2) + InfoNCE(NN(z2, Q), p1)) / 2 over the global batch.

  Args:
    z1, z2: this device's projections of views 1 and 2, [n, d] (normalised here).
    p1, p2: their predictions, [n, d]: the candidates, gathered from every device.
    support: the support set Q, [K, d] unit rows, the same on every device.
    temperature: tau.
    axis_name: mesh axis the batch is split over; None for one device.

  Returns:
    The loss (identical on every device) and metrics: `batch_info_nce`'s, averaged over
    the two terms, and `nn_cosine`, the mean cosine between a projection and its neighbour.
  """
  nn1, sim1 = queue_lib.nearest_neighbours(l2_normalize(z1), support)
  nn2, sim2 = queue_lib.nearest_neighbours(l2_normalize(z2), support)
  loss_12, metrics_12 = batch_info_nce(nn1, p2, temperature, axis_name)
  loss_21, metrics_21 = batch_info_nce(nn2, p1, temperature, axis_name)
  metrics = mean_metrics([metrics_12, metrics_21])
  # How close the neighbours are: near 1 once the support set holds similar images.
  big_n = parallel.psum(z1.shape[0] + z2.shape[0], axis_name)
  metrics['nn_cosine'] = parallel.psum(jnp.sum(sim1) + jnp.sum(sim2), axis_name) / big_n
  return (loss_12 + loss_21) / 2, metrics


@dataclasses.dataclass(frozen=True)
class NNCLR(Method):

  def network(self, axis_name: str | None = None) -> EncoderProjectorPredictor:
    m = self.config.method
    return EncoderProjectorPredictor(
        encoder=build_encoder(self.config.model, axis_name),
        projector=projector(self.config, axis_name),
        predictor=mlp(self.config.model, m.predictor_hidden_dim, m.projector_output_dim,
                      axis_name))

  @classmethod
  def method_problems(cls, config) -> list[str]:
    m = config.method
    if m.queue_size < config.batch_size:
      return [f'method.queue_size={m.queue_size} is smaller than batch_size='
              f'{config.batch_size}: every step adds the whole global batch to the support '
              'set. Set method.queue_size >= batch_size (the paper: 98304).']
    return []

  def init(self, rng, images):
    net_rng, queue_rng = jax.random.split(rng)
    params, batch_stats = self.init_networks(net_rng, images)
    m = self.config.method
    return params, batch_stats, queue_lib.init_queue(queue_rng, m.queue_size,
                                                     m.projector_output_dim)

  def forward(self, params, batch_stats, views, rng, axis_name, first_row):
    (z, p), batch_stats = forward_together(self.network(axis_name), params, batch_stats,
                                           views[:2], rng, first_row)
    return {'z': z, 'p': p}, batch_stats

  def objective(self, params, method_state, outputs, targets, target_stats, rng, step,
                axis_name):
    del params, targets, target_stats, rng, step  # no momentum network, no schedules
    z1, z2 = outputs['z']
    p1, p2 = outputs['p']
    loss, metrics = nnclr_loss(z1, z2, p1, p2, method_state['queue'],
                               self.config.method.temperature, axis_name)
    new_state = queue_lib.enqueue(method_state, l2_normalize(z1), axis_name)
    return loss, (metrics, new_state)
