"""Networks and helpers that several methods share; no method file imports another."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssl_jax.methods.base import Method
from ssl_jax.models import DTYPES, build_encoder
from ssl_jax.models.heads import ProjectionMLP


class EncoderWithProjector(nn.Module):
  """features -> projection z. SimCLR's network, and the target network of BYOL and MoCo."""
  encoder: nn.Module
  projector: nn.Module

  def __call__(self, x, train: bool = True):
    features = self.encoder(x, train=train)
    return features, self.projector(features, train=train)

  def encode(self, x):
    return self.encoder(x, train=False)


class EncoderProjectorPredictor(nn.Module):
  """The online network of BYOL, SimSiam, MoCo v3 and NNCLR: features -> projection z ->
  prediction p.

  The encoder and projector submodules carry the same names as in `EncoderWithProjector`, so
  those two subtrees of these parameters are a valid `EncoderWithProjector` (the target).
  """
  encoder: nn.Module
  projector: nn.Module
  predictor: nn.Module

  def __call__(self, x, train: bool = True):
    z = self.projector(self.encoder(x, train=train), train=train)
    return z, self.predictor(z, train=train)

  def encode(self, x):
    return self.encoder(x, train=False)


def mlp(model_config, hidden_dim: int, output_dim: int, axis_name: str | None,
        num_layers: int = 2, last_bn: bool = False) -> ProjectionMLP:
  """A projector or predictor MLP (BatchNorm in its hidden layers, synchronised over
  `axis_name`, or LayerNorm: `model.head_norm`) in the model's compute dtype."""
  return ProjectionMLP(hidden_dim=hidden_dim, output_dim=output_dim, num_layers=num_layers,
                       last_bn=last_bn, axis_name=axis_name, dtype=DTYPES[model_config.dtype],
                       norm=model_config.get('head_norm', 'batch'))


def projector(config, axis_name: str | None, last_bn: bool | None = None) -> ProjectionMLP:
  """The projector of `config.method`'s `projector_*` fields."""
  m = config.method
  return mlp(config.model, m.projector_hidden_dim, m.projector_output_dim, axis_name,
             num_layers=m.get('projector_num_layers', 2),
             last_bn=m.get('projector_last_bn', False) if last_bn is None else last_bn)


def encoder_with_projector(config, axis_name: str | None,
                           last_bn: bool | None = None) -> EncoderWithProjector:
  """`config.model`'s encoder and `config.method`'s projector."""
  return EncoderWithProjector(encoder=build_encoder(config.model, axis_name),
                              projector=projector(config, axis_name, last_bn))


def forward_views(network: nn.Module, params, batch_stats, views, rng=None, first_row=None):
  """Each view through `network` in training mode, one after the other, as the reference
  implementations of BYOL, SimSiam, MoCo, Barlow Twins and VICReg do: every BatchNorm then
  normalises a view with that view's own (global-batch) statistics, and the running averages
  are updated once per view. Returns the list of outputs and the running statistics after
  all views.

  `rng`: the loss's, for the online network: view v's forward gets the dropout rngs of call v
  (`Method.dropout_rngs`); None (target networks): no dropout rng, so no drop path.
  `first_row`: the global index of the views' first example (`Method.forward`; None: this
  device's first row of the whole batch)."""
  outputs = []
  for v, view in enumerate(views):
    out, updates = concatenated_views(network, view.shape[0], first_row).apply(
        {'params': params, 'batch_stats': batch_stats}, view, train=True,
        mutable=['batch_stats'], rngs=Method.dropout_rngs(rng, v))
    batch_stats = updates['batch_stats']
    outputs.append(out)
  return outputs, batch_stats


def forward_together(network: nn.Module, params, batch_stats, views, rng=None,
                     first_row=None):
  """All `views` through `network` in one training-mode call, concatenated along the rows, as
  SimCLR's reference does: BatchNorm normalises them with the same statistics. Returns each
  output leaf split back per view (`split_views`: a list with one view's rows each) and the
  running statistics. `rng` and `first_row` as for `forward_views` (one call: call 0)."""
  out, updates = concatenated_views(network, views[0].shape[0], first_row).apply(
      {'params': params, 'batch_stats': batch_stats}, jnp.concatenate(views, axis=0),
      train=True, mutable=['batch_stats'], rngs=Method.dropout_rngs(rng, 0))
  return jax.tree.map(lambda x: split_views(x, len(views)), out), updates['batch_stats']


def forward_multi_crop(network: nn.Module, params, batch_stats, views, num_global: int,
                       rng=None, first_row=None):
  """Multi-crop views through `network` in one training-mode call, `network(global_crops,
  local_crops)` with each group concatenated along the rows (local crops None when there are
  none), as SwAV's, DINO's and DeepCluster-v2's references encode them grouped by resolution.
  Returns each output leaf split back per view (`split_views`, globals first) and the running
  statistics. `rng` and `first_row` as for `forward_views` (one call: call 0)."""
  local_crops = (jnp.concatenate(views[num_global:], axis=0) if len(views) > num_global
                 else None)
  out, updates = concatenated_views(network, views[0].shape[0], first_row).apply(
      {'params': params, 'batch_stats': batch_stats},
      jnp.concatenate(views[:num_global], axis=0), local_crops, train=True,
      mutable=['batch_stats'], rngs=Method.dropout_rngs(rng, 0))
  return jax.tree.map(lambda x: split_views(x, len(views)), out), updates['batch_stats']


def concatenated_views(network: nn.Module, rows_per_view: int, first_row=None) -> nn.Module:
  """`network` for a batch of views concatenated along the rows, `rows_per_view` rows each
  (this call's rows of each view), whose first example has index `first_row` in the global
  batch (None: this device's first row, `parallel.global_row_offset`): every submodule with
  a `rows_per_view` attribute (the ViT) is told both, for its drop-path masks to follow each
  example's place in the global batch (`models.vit.drop_path_mask`) rather than its row in
  the concatenation or in a micro-batch. Modules without one are returned as they are."""
  updates = {}
  for field in dataclasses.fields(network):
    value = getattr(network, field.name, None)
    if field.name == 'rows_per_view':
      updates.update(rows_per_view=rows_per_view, first_row=first_row)
    elif field.name != 'parent' and isinstance(value, nn.Module):
      told = concatenated_views(value, rows_per_view, first_row)
      if told is not value:
        updates[field.name] = told
  return network.clone(**updates) if updates else network


def split_views(x, num_views: int) -> list:
  """The per-view blocks of rows of an output computed on views concatenated along the rows
  (the layout `Method.forward`'s outputs take)."""
  n = x.shape[0] // num_views
  return [x[v * n:(v + 1) * n] for v in range(num_views)]


def mean_metrics(metrics: list[dict]) -> dict:
  """The element-wise mean of several metrics dicts (a symmetrised loss's two terms)."""
  return jax.tree.map(lambda *xs: sum(xs) / len(xs), *metrics)
