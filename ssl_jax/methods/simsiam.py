"""SimSiam (Chen & He 2021, "Exploring simple Siamese representation learning"): BYOL without
the momentum encoder. One network (encoder, projector whose output is batch-normalised, and a
bottleneck predictor) sees both views; each view's prediction regresses the other view's
projection through a stop-gradient, which alone prevents collapse (Sec. 4.1).

Each view is forwarded separately, as in the reference implementation, so BatchNorm uses
per-view (global-batch) statistics.

Deviation: the paper keeps the predictor's learning rate fixed while the rest decays (Sec.
4.2, Table 1: +0.4 points). The trainer builds one optimizer with one schedule for all
parameters, so here the predictor decays with everything else.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ssl_jax.losses import regression
from ssl_jax.methods.base import Method
from ssl_jax.methods.common import EncoderProjectorPredictor, forward_views, mlp, projector
from ssl_jax.models import build_encoder


@dataclasses.dataclass(frozen=True)
class SimSiam(Method):

  def network(self, axis_name: str | None = None) -> EncoderProjectorPredictor:
    m = self.config.method
    return EncoderProjectorPredictor(
        encoder=build_encoder(self.config.model, axis_name),
        # BN on the projector's output, without affine parameters, as the reference code.
        projector=projector(self.config, axis_name, last_bn=True),
        # The bottleneck (hidden < output) predictor of Sec. 3.
        predictor=mlp(self.config.model, m.predictor_hidden_dim, m.projector_output_dim,
                      axis_name))

  @classmethod
  def method_problems(cls, config) -> list[str]:
    # ProjectionMLP would silently build one layer for any count below 1.
    if config.method.projector_num_layers < 1:
      return ['method.projector_num_layers must be >= 1 (the paper: 3 on ImageNet, 2 on '
              f'CIFAR); got {config.method.projector_num_layers}.']
    return []

  def forward(self, params, batch_stats, views, rng, axis_name, first_row):
    outputs, batch_stats = forward_views(self.network(axis_name), params, batch_stats, views,
                                         rng, first_row)
    return {'z': [z for z, _ in outputs], 'p': [p for _, p in outputs]}, batch_stats

  def objective(self, params, method_state, outputs, targets, target_stats, rng, step,
                axis_name):
    del params, targets, target_stats, rng, step  # no target network, no schedules
    z1, z2 = outputs['z']
    p1, p2 = outputs['p']
    stop_gradient = self.config.method.stop_gradient
    # Eq. 2: L = D(p1, z2) / 2 + D(p2, z1) / 2.
    loss_12, m_12 = regression.negative_cosine(p1, z2, axis_name, stop_gradient)
    loss_21, m_21 = regression.negative_cosine(p2, z1, axis_name, stop_gradient)
    metrics = {
        'cosine': (m_12['cosine'] + m_21['cosine']) / 2,
        # Fig. 2 (middle): the spread of the normalised projections exposes collapse, which
        # the loss alone does not (a collapsed network reaches the minimum, -1).
        'z_spread': regression.embedding_spread(jnp.concatenate([z1, z2]), axis_name),
    }
    return (loss_12 + loss_21) / 2, (metrics, method_state)
