"""VICReg (Bardes et al. 2022): an encoder and an expander (projector) trained with an
invariance term between the two views' embeddings plus variance and covariance
regularisation of each view's embeddings over the global batch (eq. 1-6). No negatives,
predictor, momentum network, normalisation of the embeddings or method state.
"""

from __future__ import annotations

import dataclasses

from ssl_jax.losses.vicreg import vicreg_loss
from ssl_jax.methods.base import Method
from ssl_jax.methods.common import (EncoderWithProjector, encoder_with_projector,
                                    forward_views)


@dataclasses.dataclass(frozen=True)
class VICReg(Method):

  @classmethod
  def method_problems(cls, config) -> list[str]:
    m = config.method
    problems = []
    if m.projector_num_layers < 1:
      problems.append('method.projector_num_layers must be >= 1.')
    for name in ('invariance_weight', 'variance_weight', 'covariance_weight'):
      if m[name] < 0:
        problems.append(f'method.{name} must be >= 0.')
    if m.variance_epsilon <= 0:
      problems.append('method.variance_epsilon must be positive (it keeps the gradient of '
                      'sqrt(Var) finite).')
    if config.batch_size < 2:
      problems.append('vicreg uses the unbiased (N - 1) covariance: batch_size must be >= 2.')
    return problems

  def network(self, axis_name: str | None = None) -> EncoderWithProjector:
    # The reference expander's hidden linear layers have biases, redundant before BatchNorm;
    # its last layer has none. ProjectionMLP is the other way round, and with the same effect:
    # every term of the loss is invariant to a shift shared by both views (the invariance term
    # takes differences, the others centre over the batch), so the last bias gets no gradient.
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
    loss, metrics = vicreg_loss(z1, z2, m.invariance_weight, m.variance_weight,
                                m.covariance_weight, m.variance_epsilon, axis_name)
    return loss, (metrics, method_state)
