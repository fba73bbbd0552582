"""VICReg (Bardes et al. 2022): an encoder and an expander (projector) trained with an
invariance term between the two views' embeddings plus variance and covariance
regularisation of each view's embeddings over the global batch (eq. 1-6). No negatives,
predictor, momentum network, normalisation of the embeddings or method state.
"""

from __future__ import annotations

import dataclasses

from ssl_jax.losses.vicreg import vicreg_loss
from ssl_jax.methods.barlow_twins import embed_views_separately
from ssl_jax.methods.simclr import EncoderWithProjector
from ssl_jax.models import DTYPES, build_encoder
from ssl_jax.models.heads import ProjectionMLP


@dataclasses.dataclass(frozen=True)
class VICReg:
  config: object  # the whole experiment ConfigDict; this method reads .model and .method
  run_length: object = None

  num_views: int = 2

  @classmethod
  def config_problems(cls, config) -> list[str]:
    m = config.method
    problems = []
    if config.augment.num_local_crops:
      problems.append('vicreg compares exactly two views: set augment.num_local_crops = 0.')
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
    m = self.config.method
    # The reference expander's hidden linear layers have biases, redundant before BatchNorm;
    # its last layer has none. ProjectionMLP is the other way round, and with the same effect:
    # every term of the loss is invariant to a shift shared by both views (the invariance term
    # takes differences, the others centre over the batch), so the last bias gets no gradient.
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
    loss, metrics = vicreg_loss(z1, z2, m.invariance_weight, m.variance_weight,
                                m.covariance_weight, m.variance_epsilon, axis_name)
    return loss, (metrics, batch_stats, method_state)

  def encode(self, params, batch_stats, images):
    return self.network().apply({'params': params, 'batch_stats': batch_stats}, images,
                                method=EncoderWithProjector.encode)
