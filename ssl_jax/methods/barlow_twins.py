"""Barlow Twins (Zbontar et al. 2021): an encoder and a projector trained so that the
cross-correlation matrix of the two views' embeddings, over the global batch, is close to the
identity (eq. 1-2). No negatives, predictor, momentum network or method state.
"""

from __future__ import annotations

import dataclasses

import jax

from ssl_jax.losses.barlow_twins import barlow_twins_loss
from ssl_jax.methods.base import Method
from ssl_jax.methods.common import (EncoderWithProjector, encoder_with_projector,
                                    forward_views)


@dataclasses.dataclass(frozen=True)
class BarlowTwins(Method):

  @classmethod
  def method_problems(cls, config) -> list[str]:
    m = config.method
    problems = []
    if m.projector_num_layers < 1:
      problems.append('method.projector_num_layers must be >= 1.')
    if m.redundancy_weight < 0:
      problems.append('method.redundancy_weight (lambda) must be >= 0.')
    if not m.get('loss_scale', 1.0) > 0:
      problems.append('method.loss_scale must be positive (0.0048 / 0.2 reproduces the '
                      "reference code's bias learning rate; see configs/barlow_twins.py).")
    if config.batch_size < 2:
      problems.append('barlow_twins standardises over the batch: batch_size must be >= 2.')
    return problems

  def network(self, axis_name: str | None = None) -> EncoderWithProjector:
    # The reference projector's last linear layer has no bias; ProjectionMLP's has one, but
    # the loss centres each dimension over the batch, so that bias's gradient is zero (up to
    # rounding) and it stays at its initial zero.
    return encoder_with_projector(self.config, axis_name, last_bn=False)

  def forward(self, params, batch_stats, views, rng, axis_name, first_row):
    outputs, batch_stats = forward_views(self.network(axis_name), params, batch_stats,
                                         views[:2], rng, first_row)
    return {'z': [z for _, z in outputs]}, batch_stats

  def objective(self, params, method_state, outputs, targets, target_stats, rng, step,
                axis_name):
    del params, targets, target_stats, rng, step  # deterministic, no schedules
    z1, z2 = outputs['z']
    m = self.config.method
    loss, metrics = barlow_twins_loss(z1, z2, m.redundancy_weight, axis_name)
    metrics = dict(metrics, barlow_twins_loss=jax.lax.stop_gradient(loss))
    # The scale sets the effective learning rate of biases and BatchNorm parameters (LARS
    # leaves the weights' step unchanged when the decay is scaled alike): configs/barlow_twins.py.
    return m.get('loss_scale', 1.0) * loss, (metrics, method_state)
