"""BYOL (Grill et al. 2020, "Bootstrap your own latent"): an online network (encoder,
projector, predictor) regresses the projection that a slowly moving target network (encoder,
projector; an exponential moving average of the online ones) gives for another view of the
same image. No negatives: the predictor and the moving target prevent collapse.

Forward passes are per view, as in the reference implementation, so BatchNorm normalises each
view with its own (global-batch) statistics; with BYOL's asymmetric augmentation the two views
have different statistics, and pooling them would give each view's features an offset that
depends on the other view's augmentation.

The target network runs BatchNorm in training mode, on the global batch's statistics, as the
paper's does. Its running statistics are discarded: nothing ever runs the target in
inference mode (evaluation uses the online encoder and the online running statistics), so
keeping them would only cost state. The target's forward reads the online running statistics
as a placeholder, which in training mode do not affect its output.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ssl_jax.losses import regression
from ssl_jax.methods.base import Method
from ssl_jax.methods.common import (EncoderProjectorPredictor, EncoderWithProjector,
                                    forward_views, mlp)
from ssl_jax.models import build_encoder


@dataclasses.dataclass(frozen=True)
class BYOL(Method):
  # The target averages the encoder and projector; it has no predictor.
  target_networks = ('encoder', 'projector')

  def _mlp(self, hidden_dim, axis_name):
    return mlp(self.config.model, hidden_dim, self.config.method.projector_output_dim,
               axis_name)

  def network(self, axis_name: str | None = None) -> EncoderProjectorPredictor:
    m = self.config.method
    return EncoderProjectorPredictor(
        encoder=build_encoder(self.config.model, axis_name),
        projector=self._mlp(m.projector_hidden_dim, axis_name),
        predictor=self._mlp(m.predictor_hidden_dim, axis_name))

  def target_network(self, axis_name: str | None = None) -> EncoderWithProjector:
    return EncoderWithProjector(
        encoder=build_encoder(self.config.model, axis_name),
        projector=self._mlp(self.config.method.projector_hidden_dim, axis_name))

  def forward(self, params, batch_stats, views, rng, axis_name, first_row):
    outputs, batch_stats = forward_views(self.network(axis_name), params, batch_stats, views,
                                         rng, first_row)
    return {'p': [p for _, p in outputs]}, batch_stats

  def target_forward(self, target_params, batch_stats, method_state, views, rng, axis_name,
                     first_row):
    del method_state, rng  # the target gets no dropout rng: no drop path
    placeholder_stats = {k: batch_stats[k] for k in self.target_networks if k in batch_stats}
    outputs, _ = forward_views(self.target_network(axis_name), target_params,
                               placeholder_stats, views, first_row=first_row)
    return {'z': [z for _, z in outputs]}, {}

  def objective(self, params, method_state, outputs, targets, target_stats, rng, step,
                axis_name):
    del params, target_stats, rng, step  # tau lives in the trainer
    p1, p2 = outputs['p']
    z1, z2 = targets['z']
    # Eq. 2 and its symmetrised twin (view roles swapped); the paper's total loss is the sum.
    loss_12, m_12 = regression.normalized_regression(p1, z2, axis_name)
    loss_21, m_21 = regression.normalized_regression(p2, z1, axis_name)
    metrics = {
        'cosine': (m_12['cosine'] + m_21['cosine']) / 2,
        'target_spread': regression.embedding_spread(jnp.concatenate([z1, z2]), axis_name),
    }
    return loss_12 + loss_21, (metrics, method_state)
