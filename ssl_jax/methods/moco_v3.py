"""MoCo v3 (Chen, Xie & He 2021, "An Empirical Study of Training Self-Supervised Vision
Transformers"), here with the convolutional backbones.

The online network is backbone + projector (3-layer MLP) + predictor (2-layer MLP); the
momentum encoder is backbone + projector, the moving average theta_k <- m theta_k +
(1 - m) theta_q, with m rising from 0.99 to 1 on a half-cycle cosine over training. The
loss (Algorithm 1) is symmetric, ctr(q1, k2) + ctr(q2, k1), where ctr is InfoNCE of each
query against the momentum keys of the whole global batch (gathered from every device; the
positive is the key of the same image) scaled by 2 tau. There is no queue: the large batch
provides the negatives, and no BatchNorm signature can single out the positive because every
candidate key comes from the same batch.

BatchNorm is synchronised over the global batch in every network (the reference code
converts the whole model to SyncBN), and each view goes through the networks separately, as
in the reference code, so each view is normalised with its own statistics. The momentum
encoder runs BN in training mode and its running statistics are discarded: it never runs in
inference mode (evaluation uses the online encoder's).
"""

from __future__ import annotations

import dataclasses


from ssl_jax.losses.moco import batch_info_nce
from ssl_jax.methods.base import Method
from ssl_jax.methods.common import (EncoderProjectorPredictor, EncoderWithProjector,
                                    forward_views, mean_metrics, mlp, projector)
from ssl_jax.models import build_encoder


@dataclasses.dataclass(frozen=True)
class MoCoV3(Method):
  # The momentum encoder averages the backbone and projector; it has no predictor.
  target_networks = ('encoder', 'projector')

  def network(self, axis_name: str | None = None) -> EncoderProjectorPredictor:
    m = self.config.method
    return EncoderProjectorPredictor(
        encoder=build_encoder(self.config.model, axis_name),
        projector=projector(self.config, axis_name),
        predictor=mlp(self.config.model, m.predictor_hidden_dim, m.projector_output_dim,
                      axis_name, last_bn=m.predictor_last_bn))

  def target_network(self, axis_name: str | None = None) -> EncoderWithProjector:
    return EncoderWithProjector(encoder=build_encoder(self.config.model, axis_name),
                                projector=projector(self.config, axis_name))

  def forward(self, params, batch_stats, views, rng, axis_name, first_row):
    outputs, batch_stats = forward_views(self.network(axis_name), params, batch_stats,
                                         views[:2], rng, first_row)
    return {'q': [q for _, q in outputs]}, batch_stats

  def target_forward(self, target_params, batch_stats, method_state, views, rng, axis_name,
                     first_row):
    del method_state, rng  # the momentum encoder gets no dropout rng: no drop path
    placeholder_stats = {k: batch_stats[k] for k in self.target_networks if k in batch_stats}
    outputs, _ = forward_views(self.target_network(axis_name), target_params,
                               placeholder_stats, views[:2], first_row=first_row)
    return {'k': [k for _, k in outputs]}, {}

  def objective(self, params, method_state, outputs, targets, target_stats, rng, step,
                axis_name):
    del params, target_stats, rng, step  # m is applied by the trainer
    tau = self.config.method.temperature
    q1, q2 = outputs['q']
    k1, k2 = targets['k']
    loss_12, metrics_12 = batch_info_nce(q1, k2, tau, axis_name)
    loss_21, metrics_21 = batch_info_nce(q2, k1, tau, axis_name)
    # The 2 tau factor (Algorithm 1) cancels the 1 / tau in the logits' gradient, so changing
    # tau does not rescale the step the optimizer takes.
    loss = 2.0 * tau * (loss_12 + loss_21)
    return loss, (mean_metrics([metrics_12, metrics_21]), method_state)
