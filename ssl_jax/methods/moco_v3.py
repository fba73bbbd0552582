"""MoCo v3 (Chen, Xie & He 2021, "An Empirical Study of Training Self-Supervised Vision
Transformers"), here with the convolutional backbones.

The online network is backbone + projector (3-layer MLP) + predictor (2-layer MLP); the
momentum encoder is backbone + projector, the moving average theta_k <- m theta_k +
(1 - m) theta_q, with m rising from 0.99 to 1 on a half-cycle cosine over training. The
loss (Algorithm 1) is symmetric, ctr(q1, k2) + ctr(q2, k1), where ctr is InfoNCE of each
query against the momentum keys of the whole global batch (gathered from every device; the
positive is the key of the same image) scaled by 2 tau. There is no queue: the large batch
provides the negatives, and no BatchNorm signature can single out the positive because every
candidate key comes from the same batch.

BatchNorm is synchronised over the global batch in every network (the reference code
converts the whole model to SyncBN), and each view goes through the networks separately, as
in the reference code, so each view is normalised with its own statistics. The momentum
encoder runs BN in training mode and its running statistics are discarded: it never runs in
inference mode (evaluation uses the online encoder's).

`target_params` is a copy of the whole online tree because the trainer's moving average maps
over the online and target trees together; the copy of the predictor is averaged along but
never used (about 4% of a ResNet-50 MoCo v3's parameters).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from ssl_jax.losses.moco import batch_info_nce
from ssl_jax.methods.byol import EncoderProjectorPredictor, forward_views
from ssl_jax.methods.moco_v2 import mean_metrics
from ssl_jax.methods.simclr import EncoderWithProjector
from ssl_jax.models import DTYPES, build_encoder
from ssl_jax.models.heads import ProjectionMLP


@dataclasses.dataclass(frozen=True)
class MoCoV3:
  config: object  # the whole experiment ConfigDict; this method reads .model and .method
  run_length: object = None

  num_views: int = 2

  def _projector(self, axis_name):
    m = self.config.method
    return ProjectionMLP(hidden_dim=m.mlp_hidden_dim, output_dim=m.output_dim,
                         num_layers=m.projector_num_layers, last_bn=m.projector_last_bn,
                         axis_name=axis_name, dtype=DTYPES[self.config.model.dtype])

  def online_network(self, axis_name: str | None = None) -> EncoderProjectorPredictor:
    m = self.config.method
    return EncoderProjectorPredictor(
        encoder=build_encoder(self.config.model, axis_name),
        projector=self._projector(axis_name),
        predictor=ProjectionMLP(hidden_dim=m.mlp_hidden_dim, output_dim=m.output_dim,
                                num_layers=2, last_bn=m.predictor_last_bn,
                                axis_name=axis_name, dtype=DTYPES[self.config.model.dtype]))

  def momentum_network(self, axis_name: str | None = None) -> EncoderWithProjector:
    return EncoderWithProjector(encoder=build_encoder(self.config.model, axis_name),
                                projector=self._projector(axis_name))

  @classmethod
  def config_problems(cls, config) -> list[str]:
    problems = []
    if not 0.0 <= config.method.base_momentum <= 1.0:
      problems.append(f'method.base_momentum={config.method.base_momentum} must be in [0, 1] '
                      '(the paper: 0.99).')
    if config.augment.num_local_crops:
      problems.append('MoCo v3 uses two global views only: set augment.num_local_crops = 0.')
    return problems

  def init(self, rng, images):
    variables = self.online_network().init(rng, images, train=False)
    return variables['params'], variables.get('batch_stats', {}), {}

  def init_target(self, params):
    # The momentum encoder starts as a copy of the online one (reference code).
    return jax.tree.map(jnp.copy, params)

  def target_momentum(self, step):
    """m = 1 - (1 - m_0) (cos(pi k / K) + 1) / 2: from m_0 at step 0 to 1 at the last step
    (Chen, Xie & He 2021, Sec. 4; the reference code's adjust_moco_momentum, per step)."""
    one_minus_m = optax.cosine_decay_schedule(
        init_value=1.0 - self.config.method.base_momentum,
        decay_steps=self.run_length.total_steps)
    return 1.0 - one_minus_m(step)

  def loss(self, params, batch_stats, target_params, method_state, views, rng, step, axis_name):
    del rng, step  # deterministic given the views; m is applied by the trainer
    tau = self.config.method.temperature
    outputs, new_batch_stats = forward_views(self.online_network(axis_name), params,
                                             batch_stats, views[:2])
    q1, q2 = (p for _, p in outputs)
    momentum = {k: target_params[k] for k in ('encoder', 'projector')}
    momentum_stats = {k: batch_stats[k] for k in ('encoder', 'projector') if k in batch_stats}
    key_outputs, _ = forward_views(self.momentum_network(axis_name), momentum, momentum_stats,
                                   views[:2])
    k1, k2 = (jax.lax.stop_gradient(k) for _, k in key_outputs)
    loss_12, metrics_12 = batch_info_nce(q1, k2, tau, axis_name)
    loss_21, metrics_21 = batch_info_nce(q2, k1, tau, axis_name)
    # The 2 tau factor (Algorithm 1) cancels the 1 / tau in the logits' gradient, so changing
    # tau does not rescale the step the optimizer takes.
    loss = 2.0 * tau * (loss_12 + loss_21)
    return loss, (mean_metrics([metrics_12, metrics_21]), new_batch_stats, method_state)

  def encode(self, params, batch_stats, images):
    return self.online_network().apply({'params': params, 'batch_stats': batch_stats}, images,
                                       method=EncoderProjectorPredictor.encode)
