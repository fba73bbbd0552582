"""DeepCluster-v2 (Caron et al. 2020, "Unsupervised learning of visual features by contrasting
cluster assignments", App. B; the reference is facebookresearch/swav's
main_deepclusterv2.py): every crop of an image predicts the cluster that k-means gave the
image at the start of the epoch, for each of several clusterings (heads).

  * Network: encoder, projector and l2 normalisation (z, unit), multi-crop as SwAV's (crops of
    one resolution through the encoder together; 2 global crops, then local crops).
  * Memory bank: each training example's z of the two global crops, written at its dataset
    index ('index', `paired_inputs`) every time the example is seen (no gradient).
  * At the start of each epoch (step e * steps_per_epoch, e >= 1), spherical k-means
    (`ssl_jax.clustering`, 10 iterations) on the memory bank gives every example one cluster
    per head; head h clusters the memory of global crop h mod 2, as the reference does. Its
    centroids become the head's prototypes C_h until the next epoch: they live in the method
    state, overwritten by k-means and never trained by gradient (the reference freezes its
    prototype layers for more iterations than it runs).
  * Loss (the reference's): for each head h, the cross-entropy of the scores z C_h^T / tau of
    every crop against the example's cluster, averaged over crops and examples; then averaged
    over heads. Examples without a cluster (never seen when k-means ran) are left out, as
    the reference's ignore_index.

Epoch 0 is the reference's `init_memory`: a pass over the data that fills the memory bank
with the initial network's embeddings (train mode) before the first k-means. Here it is the
first epoch of steps, in which no example has a cluster yet (the loss is 0) and the optimizer
leaves the encoder and projector untouched (`frozen_steps`: no update, no weight decay, a
fresh optimizer at step `steps_per_epoch`), so the step stays one pure function and the run
is the reference's with one more epoch. solo-learn likewise trains on no loss in its epoch 0.

Everything is identical on any number of devices: the memory bank, assignments and
centroids are replicated state, updated from the gathered global batch; k-means splits the
memory's rows over the devices and sums over them, its initial rows drawn from (config.seed,
epoch) among the global rows. Where the reference's memory holds the examples seen in the
last epoch (by position), this one holds every example's latest embedding (by index): the
examples that an epoch of steps misses keep the previous epoch's, rather than no cluster.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssl_jax import parallel, precision, sharding
from ssl_jax.clustering import spherical_kmeans_replicated
from ssl_jax.clustering.memory_bank import bank_size, num_clusters, write_rows
from ssl_jax.losses.info_nce import l2_normalize
from ssl_jax.methods.base import Method
from ssl_jax.methods.common import forward_multi_crop, projector
from ssl_jax.models import build_encoder


class MultiCropProjection(nn.Module):
  """Encoder per resolution group (global crops, then local crops), then the projector and
  l2 normalisation on all crops at once: unit z."""
  encoder: nn.Module
  projector: nn.Module

  def __call__(self, global_crops, local_crops=None, train: bool = True):
    features = [self.encoder(global_crops, train=train)]
    if local_crops is not None:
      features.append(self.encoder(local_crops, train=train))
    return l2_normalize(self.projector(jnp.concatenate(features, axis=0), train=train))

  def encode(self, x):
    return self.encoder(x, train=False)


def cluster_cross_entropy(scores, clusters, temperature: float, axis_name):
  """Eq. of App. B: -log softmax(scores / tau)[cluster], summed over this device's rows that
  have a cluster (>= 0) and divided by the number of such rows in the global batch.

  scores: a list of [n, K] (one per crop); clusters: int32 [n], the same for every crop.
  Returns (loss, rows with a cluster in the global batch, counted once per crop)."""
  has = clusters >= 0
  target = jnp.maximum(clusters, 0)
  total = 0.0
  for s in scores:
    logits = precision.to_float32(s) / temperature
    picked = jnp.take_along_axis(logits, target[:, None], axis=1)[:, 0]
    total = total + jnp.sum(jnp.where(has, jax.nn.logsumexp(logits, axis=1) - picked, 0.0))
  count = parallel.psum(len(scores) * jnp.sum(has.astype(jnp.float32)), axis_name)
  return parallel.psum(total, axis_name) / jnp.maximum(count, 1.0), count


@dataclasses.dataclass(frozen=True)
class DeepClusterV2(Method):
  multi_crop = True
  paired_inputs = ('index',)  # each row's dataset index: its memory slot and its clusters

  def network(self, axis_name: str | None = None) -> MultiCropProjection:
    return MultiCropProjection(encoder=build_encoder(self.config.model, axis_name),
                               projector=projector(self.config, axis_name))

  @classmethod
  def method_problems(cls, config) -> list[str]:
    m = config.method
    if 'num_clusters' not in m:
      # Workdirs of this method written before the field took PCL's name hold the old one.
      old = (' (method.num_prototypes here, its former name: rename it, in the config.json '
             'of an older workdir too)') if 'num_prototypes' in m else ''
      return [f'method.num_clusters is missing: one number of k-means clusters per head, '
              f'e.g. (3000, 3000, 3000){old}.']
    problems = []
    k = m.num_clusters
    heads = list(k) if isinstance(k, (list, tuple)) else [k]
    if not heads or any(int(x) != x or x < 1 for x in heads):
      problems.append(f'method.num_clusters={k} must list a positive number of clusters '
                      'per head (the paper: (3000, 3000, 3000)).')
    if m.kmeans_iterations < 1:
      problems.append('method.kmeans_iterations must be at least 1 (the paper: 10).')
    return problems

  def init(self, rng, images):
    params, batch_stats = self.init_networks(rng, images)
    n = bank_size('deepcluster_v2', self.config, self.run_length)
    d = self.config.method.projector_output_dim
    heads = num_clusters(self.config)
    state = {
        'memory': jnp.zeros((self.num_views, n, d), jnp.float32),  # z of each global crop
        'filled': jnp.zeros((n,), bool),  # which examples the memory has seen
        'assignments': jnp.full((len(heads), n), -1, jnp.int32),  # -1: no cluster yet
        'centroids': {f'head{h}': jnp.zeros((k, d), jnp.float32) for h, k in enumerate(heads)},
    }
    return params, batch_stats, state

  def frozen_steps(self):
    """Epoch 0 fills the memory bank (the reference's `init_memory`): the networks wait."""
    spe = self.run_length.steps_per_epoch
    return {**super().frozen_steps(), ('encoder',): spe, ('projector',): spe}

  def forward(self, params, batch_stats, views, rng, axis_name, first_row):
    crops = views[:-1]  # the last input is 'index' (`paired_inputs`)
    z, batch_stats = forward_multi_crop(self.network(axis_name), params, batch_stats, crops,
                                        self.num_views, rng, first_row)
    return {'z': z}, batch_stats

  def target_forward(self, target_params, batch_stats, method_state, views, rng, axis_name,
                     first_row):
    # The index rides with the outputs that get no gradient (an integer has none).
    del target_params, batch_stats, method_state, rng, axis_name, first_row
    return {'index': views[-1]}, {}

  def objective(self, params, method_state, outputs, targets, target_stats, rng, step,
                axis_name):
    del params, target_stats, rng  # the prototypes are state; k-means is seeded by the epoch
    m = self.config.method
    spe = self.run_length.steps_per_epoch
    state = sharding.update_if((step > 0) & (step % spe == 0),
                               lambda s: self._cluster(s, step // spe, axis_name), method_state)
    index, z = targets['index'], outputs['z']
    losses = []
    for h in range(len(num_clusters(self.config))):
      prototypes = state['centroids'][f'head{h}']
      scores = [precision.matmul(zc, prototypes.T.astype(zc.dtype)) for zc in z]
      loss, count = cluster_cross_entropy(scores, state['assignments'][h][index],
                                          m.temperature, axis_name)
      losses.append(loss)
    loss = sum(losses) / len(losses)
    rows = parallel.psum(jnp.float32(index.shape[0] * len(z)), axis_name)
    new_state = self._remember(state, [jax.lax.stop_gradient(zc) for zc in z[:self.num_views]],
                               index, axis_name)
    return loss, ({'clustered_fraction': count / rows}, new_state)

  def _cluster(self, state, epoch, axis_name):
    """k-means of every head on the memory bank: new assignments and prototypes."""
    heads = num_clusters(self.config)
    memory = state['memory']
    key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), epoch)
    results = spherical_kmeans_replicated(
        [memory[h % self.num_views] for h in range(len(heads))], heads, key,
        num_iterations=self.config.method.kmeans_iterations, valid=state['filled'],
        axis_name=axis_name)
    return {**state,
            'assignments': jnp.stack([r.assignments for r in results]),
            'centroids': {f'head{h}': r.centroids.astype(memory.dtype)
                          for h, r in enumerate(results)}}

  def _remember(self, state, z_global, index, axis_name):
    """Writes the global batch's z of each global crop at its examples' slots."""
    memory, filled = write_rows(state['memory'], state['filled'], jnp.stack(z_global), index,
                                axis_name)
    return {**state, 'memory': memory, 'filled': filled}
