"""Triplet loss with semi-hard negative mining (Schroff et al. 2015, FaceNet) as a
self-supervised method: the two augmented views of an image are the anchor-positive pair and
every other image of the global batch is a candidate negative (`losses/triplet.py`).

The networks are SimCLR's (encoder and projection MLP); only the loss differs.
"""

from __future__ import annotations

import dataclasses


from ssl_jax.losses.triplet import FALLBACKS, semihard_triplet
from ssl_jax.methods.base import Method
from ssl_jax.methods.common import (EncoderWithProjector, encoder_with_projector,
                                    forward_together)


@dataclasses.dataclass(frozen=True)
class Triplet(Method):

  def network(self, axis_name: str | None = None) -> EncoderWithProjector:
    return encoder_with_projector(self.config, axis_name)

  @classmethod
  def method_problems(cls, config) -> list[str]:
    m = config.method
    problems = []
    if not m.margin > 0:
      problems.append(f'method.margin={m.margin} must be positive (0.2 in FaceNet).')
    if m.fallback not in FALLBACKS:
      problems.append(f'method.fallback={m.fallback!r} is unknown; use one of {FALLBACKS}.')
    return problems

  def forward(self, params, batch_stats, views, rng, axis_name, first_row):
    # One pass over both views, so BatchNorm normalises them with the same statistics.
    (_, z), batch_stats = forward_together(self.network(axis_name), params, batch_stats,
                                           views, rng, first_row)
    return {'z': z}, batch_stats

  def objective(self, params, method_state, outputs, targets, target_stats, rng, step,
                axis_name):
    del params, targets, target_stats, rng, step
    z1, z2 = outputs['z']
    m = self.config.method
    loss, metrics = semihard_triplet(z1, z2, m.margin, m.fallback, axis_name)
    return loss, (metrics, method_state)
