"""SimCLR (Chen et al. 2020): an encoder and a projection MLP trained with NT-Xent between
two augmented views of each image, with negatives from the whole global batch."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from ssl_jax.losses.info_nce import nt_xent
from ssl_jax.models import DTYPES, build_encoder
from ssl_jax.models.heads import ProjectionMLP


class EncoderWithProjector(nn.Module):
  encoder: nn.Module
  projector: nn.Module

  def __call__(self, x, train: bool = True):
    features = self.encoder(x, train=train)
    return features, self.projector(features, train=train)

  def encode(self, x):
    return self.encoder(x, train=False)


@dataclasses.dataclass(frozen=True)
class SimCLR:
  config: object  # the whole experiment ConfigDict; this method reads .model and .method
  run_length: object = None

  num_views: int = 2

  def network(self, axis_name: str | None = None) -> EncoderWithProjector:
    m = self.config.method
    return EncoderWithProjector(
        encoder=build_encoder(self.config.model, axis_name),
        projector=ProjectionMLP(hidden_dim=m.projector_hidden_dim,
                                output_dim=m.projector_output_dim,
                                num_layers=m.projector_num_layers, last_bn=m.projector_last_bn,
                                axis_name=axis_name, dtype=DTYPES[self.config.model.dtype]))

  def init(self, rng, images):
    variables = self.network().init(rng, images, train=False)
    return variables['params'], variables.get('batch_stats', {}), {}

  def loss(self, params, batch_stats, target_params, method_state, views, rng, step, axis_name):
    del target_params, rng, step  # SimCLR's loss is deterministic given the views.
    n = views[0].shape[0]
    # Both views go through the network as one batch, so BatchNorm normalises them with the
    # same statistics (as the reference implementation does).
    (_, z), updates = self.network(axis_name).apply(
        {'params': params, 'batch_stats': batch_stats}, jnp.concatenate(views, axis=0),
        train=True, mutable=['batch_stats'])
    loss, metrics = nt_xent(z[:n], z[n:], self.config.method.temperature, axis_name)
    return loss, (metrics, updates['batch_stats'], method_state)

  def encode(self, params, batch_stats, images):
    return self.network().apply({'params': params, 'batch_stats': batch_stats}, images,
                                method=EncoderWithProjector.encode)
