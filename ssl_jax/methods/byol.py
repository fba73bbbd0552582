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

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ssl_jax.losses import regression
from ssl_jax.methods.simclr import EncoderWithProjector
from ssl_jax.models import DTYPES, build_encoder
from ssl_jax.models.heads import ProjectionMLP


class EncoderProjectorPredictor(nn.Module):
  """The online network of BYOL and SimSiam: features -> projection z -> prediction p.

  The encoder and projector submodules carry the same names as in `EncoderWithProjector`, so
  a subset of these parameters is a valid `EncoderWithProjector` (the target network).
  """
  encoder: nn.Module
  projector: nn.Module
  predictor: nn.Module

  def __call__(self, x, train: bool = True):
    z = self.projector(self.encoder(x, train=train), train=train)
    return z, self.predictor(z, train=train)

  def encode(self, x):
    return self.encoder(x, train=False)


def forward_views(network: nn.Module, params, batch_stats, views):
  """Each view through `network` in training mode, one after the other (BatchNorm statistics
  per view); returns the list of outputs and the running statistics after all views."""
  outputs = []
  for view in views:
    out, updates = network.apply({'params': params, 'batch_stats': batch_stats}, view,
                                 train=True, mutable=['batch_stats'])
    batch_stats = updates['batch_stats']
    outputs.append(out)
  return outputs, batch_stats


@dataclasses.dataclass(frozen=True)
class BYOL:
  config: object  # the whole experiment ConfigDict; this method reads .model and .method
  run_length: object = None

  num_views: int = 2

  def _mlp(self, hidden_dim, output_dim, axis_name):
    return ProjectionMLP(hidden_dim=hidden_dim, output_dim=output_dim, num_layers=2,
                         axis_name=axis_name, dtype=DTYPES[self.config.model.dtype])

  def online_network(self, axis_name: str | None = None) -> EncoderProjectorPredictor:
    m = self.config.method
    return EncoderProjectorPredictor(
        encoder=build_encoder(self.config.model, axis_name),
        projector=self._mlp(m.projector_hidden_dim, m.projector_output_dim, axis_name),
        predictor=self._mlp(m.predictor_hidden_dim, m.projector_output_dim, axis_name))

  def target_network(self, axis_name: str | None = None) -> EncoderWithProjector:
    m = self.config.method
    return EncoderWithProjector(
        encoder=build_encoder(self.config.model, axis_name),
        projector=self._mlp(m.projector_hidden_dim, m.projector_output_dim, axis_name))

  @classmethod
  def config_problems(cls, config) -> list[str]:
    problems = []
    if config.augment.num_local_crops:
      problems.append('BYOL uses two global views only: set augment.num_local_crops = 0.')
    if not 0.0 <= config.method.target_momentum_base <= 1.0:
      problems.append('method.target_momentum_base must be in [0, 1] (the paper: 0.996).')
    return problems

  def init(self, rng, images):
    variables = self.online_network().init(rng, images, train=False)
    return variables['params'], variables.get('batch_stats', {}), {}

  def init_target(self, params):
    # A copy of the whole online tree: the trainer's EMA (optax.incremental_update) maps over
    # the online and target trees together, so they must have the same structure. The copy of
    # the predictor is averaged along but never used: the target has no predictor.
    return jax.tree.map(jnp.copy, params)

  def target_momentum(self, step):
    """tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2 (Grill et al. 2020, Sec. 3.2)."""
    one_minus_tau = optax.cosine_decay_schedule(
        init_value=1.0 - self.config.method.target_momentum_base,
        decay_steps=self.run_length.total_steps)
    return 1.0 - one_minus_tau(step)

  def loss(self, params, batch_stats, target_params, method_state, views, rng, step, axis_name):
    del rng, step  # BYOL's loss is deterministic given the views; tau lives in the trainer.
    outputs, new_batch_stats = forward_views(self.online_network(axis_name), params,
                                             batch_stats, views)
    p1, p2 = (p for _, p in outputs)
    target = {k: target_params[k] for k in ('encoder', 'projector')}
    target_stats = {k: batch_stats[k] for k in ('encoder', 'projector') if k in batch_stats}
    target_outputs, _ = forward_views(self.target_network(axis_name), target, target_stats,
                                      views)
    z1, z2 = (jax.lax.stop_gradient(z) for _, z in target_outputs)
    # Eq. 2 and its symmetrised twin (view roles swapped); the paper's total loss is the sum.
    loss_12, m_12 = regression.normalized_regression(p1, z2, axis_name)
    loss_21, m_21 = regression.normalized_regression(p2, z1, axis_name)
    metrics = {
        'cosine': (m_12['cosine'] + m_21['cosine']) / 2,
        'target_spread': regression.embedding_spread(jnp.concatenate([z1, z2]), axis_name),
    }
    return loss_12 + loss_21, (metrics, new_batch_stats, method_state)

  def encode(self, params, batch_stats, images):
    return self.online_network().apply({'params': params, 'batch_stats': batch_stats}, images,
                                       method=EncoderProjectorPredictor.encode)
