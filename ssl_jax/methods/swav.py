"""SwAV (Caron et al. 2020, "Unsupervised learning of visual features by contrasting cluster
assignments"): crops of an image are mapped to unit embeddings z and scored against K
trainable unit prototypes C; the global crops' scores are turned into balanced soft cluster
codes by Sinkhorn-Knopp (eq. 3), and every crop predicts the codes of the other crops of the
same image (swapped prediction, eq. 1-2), with multi-crop (Sec. 3.2): two global crops, which
get codes, and low-resolution local crops, which only predict.

As in the reference implementation:
  * crops of one resolution go through the encoder together (global crops, then local
    crops), and the projection head then sees all crops as one batch;
  * the prototypes are l2-normalised after every optimizer step (`after_update`), and the
    optimizer skips them during the first `freeze_prototypes_steps` steps (`frozen_steps`);
  * with `queue_size` > 0, from epoch `queue_start_epoch` on, the embeddings of the global
    crops of the last steps join the Sinkhorn problem (scored against the current prototypes)
    once the queue is full, which keeps the equipartition meaningful for small batches.
    The queue holds the global batch's embeddings (gathered from all devices, newest first),
    so it is the same on every device and the codes do not depend on the device count.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssl_jax import parallel, precision
from ssl_jax.losses.info_nce import l2_normalize
from ssl_jax.losses.sinkhorn import sinkhorn_knopp, swapped_prediction
from ssl_jax.methods.base import Method
from ssl_jax.methods.common import forward_multi_crop, mlp
from ssl_jax.models import build_encoder


class Prototypes(nn.Module):
  """K prototype vectors, the columns of `kernel` [d, K]; scores = z @ kernel (no bias).

  Initialised and kept at unit norm (`normalize_prototypes`), so the scores of unit
  embeddings are cosines.
  """
  num_prototypes: int

  @nn.compact
  def __call__(self, z):
    kernel = self.param('kernel', _unit_columns_init, (z.shape[-1], self.num_prototypes),
                        jnp.float32)
    # Full float32 precision: Sinkhorn and the swapped prediction divide these by 0.05.
    return precision.matmul(z.astype(jnp.float32), kernel)


def _unit_columns_init(key, shape, dtype=jnp.float32):
  return normalize_prototypes(jax.random.normal(key, shape, dtype))


def normalize_prototypes(kernel: jnp.ndarray) -> jnp.ndarray:
  return kernel * jax.lax.rsqrt(jnp.maximum(jnp.sum(kernel * kernel, axis=0, keepdims=True),
                                            1e-12))


class MultiCropSwAVNetwork(nn.Module):
  """Encoder per resolution group, then projector, l2 normalisation and prototype scores on
  all crops at once."""
  encoder: nn.Module
  projector: nn.Module
  prototypes: nn.Module

  def __call__(self, global_crops, local_crops=None, train: bool = True):
    features = [self.encoder(global_crops, train=train)]
    if local_crops is not None:
      features.append(self.encoder(local_crops, train=train))
    z = l2_normalize(self.projector(jnp.concatenate(features, axis=0), train=train))
    return z, self.prototypes(z)

  def encode(self, x):
    return self.encoder(x, train=False)


@dataclasses.dataclass(frozen=True)
class SwAV(Method):
  multi_crop = True

  def network(self, axis_name: str | None = None) -> MultiCropSwAVNetwork:
    m = self.config.method
    return MultiCropSwAVNetwork(
        encoder=build_encoder(self.config.model, axis_name),
        projector=mlp(self.config.model, m.projector_hidden_dim, m.projector_output_dim,
                      axis_name),
        prototypes=Prototypes(m.num_prototypes))

  @classmethod
  def method_problems(cls, config) -> list[str]:
    m = config.method
    problems = []
    if m.num_prototypes < 1:
      problems.append('method.num_prototypes must be positive (the paper: 3000).')
    if m.epsilon <= 0:
      problems.append('method.epsilon must be positive (the paper: 0.05).')
    if m.sinkhorn_iterations < 1:
      problems.append('method.sinkhorn_iterations must be at least 1 (the paper: 3).')
    if m.freeze_prototypes_steps < 0:
      problems.append('method.freeze_prototypes_steps must be >= 0 (0 disables freezing).')
    if m.queue_size < 0:
      problems.append('method.queue_size must be >= 0 (0 disables the queue).')
    if m.queue_start_epoch < 0:
      problems.append('method.queue_start_epoch must be >= 0.')
    if m.queue_size > 0 and m.queue_size < config.batch_size:
      problems.append(f'method.queue_size={m.queue_size} is shorter than one global batch '
                      f'({config.batch_size}): set it to 0 (no queue) or a multiple of '
                      'batch_size (the paper: 3840 for batch 256).')
    return problems

  def init(self, rng, images):
    params, batch_stats = self.init_networks(rng, images)
    m = self.config.method
    state = {}
    if m.queue_size:
      state = {'queue': jnp.zeros((self.num_views, m.queue_size, m.projector_output_dim),
                                  jnp.float32),
               'queue_filled': jnp.zeros((), jnp.int32)}
    return params, batch_stats, state

  def frozen_steps(self) -> dict[tuple[str, ...], int]:
    """The prototypes are frozen for the first `freeze_prototypes_steps`, which helps the
    codes settle first: the reference sets their .grad to None, so its SGD/LARS skips them
    entirely (no weight decay, no momentum) until then."""
    return {**super().frozen_steps(),
            ('prototypes',): self.config.method.freeze_prototypes_steps}

  def after_update(self, params):
    """Projects the prototypes back to the unit sphere (the reference does so before each
    forward; after each update is the same sequence of weights)."""
    kernel = params['prototypes']['kernel']
    return {**params, 'prototypes': {'kernel': normalize_prototypes(kernel)}}

  def forward(self, params, batch_stats, views, rng, axis_name, first_row):
    (z, scores), batch_stats = forward_multi_crop(self.network(axis_name), params,
                                                  batch_stats, views, self.num_views, rng,
                                                  first_row)
    return {'z': z[:self.num_views], 'scores': scores}, batch_stats

  def objective(self, params, method_state, outputs, targets, target_stats, rng, step,
                axis_name):
    del targets, target_stats, rng  # no target network; rng only drives drop path
    m = self.config.method
    g = self.num_views
    # The prototypes are frozen in the optimizer (`frozen_steps`), not here.
    scores = outputs['scores']
    z_global = [jax.lax.stop_gradient(z) for z in outputs['z']]

    prototypes = jax.lax.stop_gradient(params['prototypes']['kernel'])
    codes = []
    new_state = method_state
    if m.queue_size:
      queue = method_state['queue']
      use_queue = method_state['queue_filled'] >= m.queue_size
      for v in range(g):
        codes.append(sinkhorn_knopp(scores[v], m.epsilon, m.sinkhorn_iterations, axis_name,
                                    extra_scores=precision.matmul(queue[v], prototypes),
                                    use_extra=use_queue))
      new_state = self._enqueue(method_state, z_global, step, axis_name)
    else:
      codes = [sinkhorn_knopp(scores[v], m.epsilon, m.sinkhorn_iterations, axis_name)
               for v in range(g)]

    loss, metrics = swapped_prediction(scores, codes, m.temperature, axis_name)
    return loss, (metrics, new_state)

  def _enqueue(self, method_state, z_global, step, axis_name):
    """Newest first, as the reference's queue: the global batch's embeddings of each global
    crop (gathered in device order, the single-device row order) push out the oldest."""
    m = self.config.method
    queue = method_state['queue']
    length = m.queue_size
    # The replicated gather: all_gather's result is typed device-varying, which shard_map
    # refuses as state returned replicated (out_specs P()).
    fresh = jnp.stack([parallel.gather_rows_replicated(z, axis_name)
                       for z in z_global])  # [g, N, d]
    big_n = fresh.shape[1]
    pushed = jnp.concatenate([fresh, queue], axis=1)[:, :length]
    active = step >= round(m.queue_start_epoch * self.run_length.steps_per_epoch)
    return {
        'queue': jnp.where(active, pushed, queue),
        'queue_filled': jnp.where(active, jnp.minimum(method_state['queue_filled'] + big_n,
                                                      length),
                                  method_state['queue_filled']),
    }
