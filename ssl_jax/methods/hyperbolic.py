"""Hyperbolic contrastive learning (Ermolov et al. 2022, "Hyperbolic Vision Transformers:
Combining Improvements in Metric Learning"): SimCLR's encoder and projector, the projection
mapped into the Poincaré ball of curvature -c (feature clipping, exponential map at the
origin), and NT-Xent over the global batch with the negative geodesic distance over a
temperature as the similarity (`losses/hyperbolic.py`).

Config: `method.curvature` (c > 0, the ball has radius 1/sqrt(c)), `method.temperature`,
`method.clip_radius` (Guo et al. 2022's r), and the `projector_*` fields.

Their metric-learning setting takes positives from class labels (samples of one class in
the batch); here, self-supervised, the positive of a view is the other view of its image.
Evaluation reads the encoder's features (kNN, probes), as for every method.
"""

from __future__ import annotations

import dataclasses

from ssl_jax.losses.hyperbolic import hyperbolic_nt_xent
from ssl_jax.methods.base import Method
from ssl_jax.methods.common import (EncoderWithProjector, encoder_with_projector,
                                    forward_together)


@dataclasses.dataclass(frozen=True)
class HyperbolicContrastive(Method):

  @classmethod
  def method_problems(cls, config) -> list[str]:
    m = config.method
    problems = []
    if not m.get('curvature', 0.0) > 0:
      problems.append(f'method.curvature={m.get("curvature")} must be > 0: the Poincaré ball '
                      'has curvature -c and radius 1/sqrt(c) (Ermolov et al. use c = 0.1); '
                      'for the sphere, use method.name=simclr.')
    if not m.get('clip_radius', 0.0) > 0:
      problems.append(f'method.clip_radius={m.get("clip_radius")} must be > 0: the norm the '
                      'projections are clipped to before the exponential map (Ermolov et al. '
                      'use 2.3); a large value (e.g. 1e3) turns clipping off.')
    if not m.get('temperature', 0.0) > 0:
      problems.append(f'method.temperature={m.get("temperature")} must be > 0: the logits are '
                      '-distance / temperature (Ermolov et al. use 0.2).')
    return problems

  def network(self, axis_name: str | None = None) -> EncoderWithProjector:
    return encoder_with_projector(self.config, axis_name)

  def forward(self, params, batch_stats, views, rng, axis_name, first_row):
    # Both views in one batch, as SimCLR: BatchNorm normalises them with the same statistics.
    (_, z), batch_stats = forward_together(self.network(axis_name), params, batch_stats,
                                           views, rng, first_row)
    return {'z': z}, batch_stats

  def objective(self, params, method_state, outputs, targets, target_stats, rng, step,
                axis_name):
    del params, targets, target_stats, rng, step  # deterministic given the projections
    m = self.config.method
    z1, z2 = outputs['z']
    loss, metrics = hyperbolic_nt_xent(z1, z2, m.curvature, m.temperature, m.clip_radius,
                                       axis_name)
    return loss, (metrics, method_state)
