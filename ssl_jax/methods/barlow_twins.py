"""Barlow Twins (Zbontar et al. 2021): an encoder and a projector trained so that the
cross-correlation matrix of the two views' embeddings, over the global batch, is close to the
identity (eq. 1-2). No negatives, predictor, momentum network or method state.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax

from ssl_jax.losses.barlow_twins import barlow_twins_loss
from ssl_jax.methods.simclr import EncoderWithProjector
from ssl_jax.models import DTYPES, build_encoder
from ssl_jax.models.heads import ProjectionMLP


def embed_views_separately(network: nn.Module, params, batch_stats, views):
  """Projector outputs of each view, each view its own forward pass.

  The reference code runs the network once per view, so every BatchNorm normalises a view
  with that view's (global-batch) statistics and the running averages are updated once per
  view; concatenating the views would mix the two views' statistics.
  """
  outputs = []
  for view in views:
    (_, z), updates = network.apply({'params': params, 'batch_stats': batch_stats}, view,
                                    train=True, mutable=['batch_stats'])
    batch_stats = updates['batch_stats']
    outputs.append(z)
  return outputs, batch_stats


@dataclasses.dataclass(frozen=True)
class BarlowTwins:
  config: object  # the whole experiment ConfigDict; this method reads .model and .method
  run_length: object = None

  num_views: int = 2

  @classmethod
  def config_problems(cls, config) -> list[str]:
    m = config.method
    problems = []
    if config.augment.num_local_crops:
      problems.append('barlow_twins compares exactly two views: set '
                      'augment.num_local_crops = 0.')
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
    m = self.config.method
    # The reference projector's last linear layer has no bias; ProjectionMLP's has one, but
    # the loss centres each dimension over the batch, so that bias's gradient is zero (up to
    # rounding) and it stays at its initial zero.
    return EncoderWithProjector(
        encoder=build_encoder(self.config.model, axis_name),
        projector=ProjectionMLP(hidden_dim=m.projector_hidden_dim,
                                output_dim=m.projector_output_dim,
                                num_layers=m.projector_num_layers, last_bn=False,
                                axis_name=axis_name, dtype=DTYPES[self.config.model.dtype]))

  def init(self, rng, images):
    variables = self.network().init(rng, images, train=False)
    return variables['params'], variables.get('batch_stats', {}), {}

  def loss(self, params, batch_stats, target_params, method_state, views, rng, step, axis_name):
    del target_params, rng, step  # deterministic given the views, no schedules
    (z1, z2), batch_stats = embed_views_separately(self.network(axis_name), params,
                                                   batch_stats, views[:2])
    m = self.config.method
    loss, metrics = barlow_twins_loss(z1, z2, m.redundancy_weight, axis_name)
    metrics = dict(metrics, barlow_twins_loss=jax.lax.stop_gradient(loss))
    # The scale sets the effective learning rate of biases and BatchNorm parameters (LARS
    # leaves the weights' step unchanged when the decay is scaled alike): configs/barlow_twins.py.
    return m.get('loss_scale', 1.0) * loss, (metrics, batch_stats, method_state)

  def encode(self, params, batch_stats, images):
    return self.network().apply({'params': params, 'batch_stats': batch_stats}, images,
                                method=EncoderWithProjector.encode)
