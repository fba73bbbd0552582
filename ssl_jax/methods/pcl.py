"""PCL (Li et al. 2021, "Prototypical contrastive learning of unsupervised representations";
the reference is salesforce/PCL: main_pcl.py and pcl/builder.py): MoCo v2 with ProtoNCE
added to its InfoNCE (Sec. 3.2: L_ProtoNCE, whose instance-wise term is InfoNCE).

  * Network, momentum key encoder, queue, shuffled or synchronised BN and InfoNCE: MoCo v2's
    (methods/moco_v2.py, which this class extends through the method registry).
  * Memory bank: each training example's momentum-encoder key (l2-normalised, view 2),
    written at its dataset index ('index', `paired_inputs`) every time the example is seen
    (`clustering/memory_bank.py`).
  * At the start of each epoch e >= `method.proto_warmup_epochs` (the reference's
    `warmup_epoch`, at least 1 so that the bank is full), spherical k-means
    (`ssl_jax.clustering`, `method.kmeans_iterations` iterations, one run per K of
    `method.num_clusters`) on the memory bank gives every example one cluster per
    granularity, the centroids (unit prototypes c) and each cluster's concentration phi
    (Sec. 3.3, `losses.proto_nce.concentration`), kept in the method state until the next
    epoch.
  * Loss: InfoNCE + the mean over granularities of ProtoNCE (`losses.proto_nce.proto_nce`):
    each query against the prototypes of the global batch's clusters and
    `method.num_negative_prototypes` (r) negative prototypes drawn uniformly among the
    clusters that are no positive of the global batch, logits divided by phi. During the
    warm-up epochs the loss is InfoNCE alone, as the reference's.

Where this differs from the reference:
  * Features: the reference clusters features extracted just before, by a pass of the
    momentum encoder (eval mode) over the training set with the evaluation transform (a
    centre crop). The step here stays one pure function, so the bank holds the momentum
    encoder's key of each example's last training view (augmented, BN in training mode),
    written as the example is seen: at an epoch start it holds every example's latest key,
    from encoders up to one epoch old. Examples never seen when k-means runs (the epoch's
    dropped remainder) have no cluster and are left out of ProtoNCE.
  * k-means: spherical (cosine assignment, unit centroids: `clustering/kmeans.py`), one
    seeded run per K, rows split over devices, where the reference runs faiss' Euclidean
    k-means (20 iterations, the best of 5 restarts) on one GPU. phi is measured to the unit
    centroid (`concentration` says why).
  * Columns: the reference's processes each contrast their own rows with the positives of
    their own sub-batch and their own r negatives; here every device scores its rows
    against the global batch's positives and one draw of r negatives (keyed by config.seed
    and the step), so the loss does not depend on the number of devices. The negatives then
    need r <= K - batch_size (the reference's draw fails for r > K - its positives).
  * Symmetric MoCo (`method.symmetric`) adds ProtoNCE of the second query too, averaged.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ssl_jax import parallel, sharding
from ssl_jax.clustering import own_rows, spherical_kmeans_replicated
from ssl_jax.clustering.memory_bank import bank_size, init_bank, num_clusters, write_rows
from ssl_jax.losses.proto_nce import concentration, proto_nce, sample_negatives
from ssl_jax.methods import method_class
from ssl_jax.methods.common import mean_metrics

# PCL is MoCo v2 plus ProtoNCE: it extends MoCo v2's class, found through the registry
# (methods import no other method's module).
MoCoV2 = method_class('moco_v2')
# fold_in tag ('pcln') of the negative prototypes' draw, apart from other seeded streams.
_NEGATIVES_STREAM = 0x70636C6E


@dataclasses.dataclass(frozen=True)
class PCL(MoCoV2):
  paired_inputs = ('index',)  # each row's dataset index: its memory slot and its clusters

  @classmethod
  def method_problems(cls, config) -> list[str]:
    m, problems = config.method, super().method_problems(config)
    k = m.num_clusters
    ks = list(k) if isinstance(k, (list, tuple)) else [k]
    if not ks or any(int(x) != x or x < 1 for x in ks):
      problems.append(f'method.num_clusters={k} must list a positive number of clusters '
                      'per granularity (the paper: (25000, 50000, 100000)).')
    elif not 1 <= m.num_negative_prototypes <= min(ks) - config.batch_size:
      problems.append(
          f'method.num_negative_prototypes={m.num_negative_prototypes} must be between 1 '
          f'and min(method.num_clusters) - batch_size = {min(ks)} - {config.batch_size}: '
          'the negatives are drawn among the clusters that are no positive of the global '
          'batch. Lower it, or raise the smallest K (the paper: r = 16000, K >= 25000, '
          'batch 256).')
    if int(m.proto_warmup_epochs) != m.proto_warmup_epochs or m.proto_warmup_epochs < 1:
      problems.append(f'method.proto_warmup_epochs={m.proto_warmup_epochs} must be a whole '
                      'number of epochs >= 1: k-means needs a memory bank filled by an epoch '
                      'of InfoNCE (the paper: 20).')
    if m.kmeans_iterations < 1:
      problems.append('method.kmeans_iterations must be at least 1 (the reference: 20).')
    return problems

  def init(self, rng, images):
    n = bank_size('pcl', self.config, self.run_length)  # fails first
    d = self.config.method.projector_output_dim
    params, batch_stats, queue_state = super().init(rng, images)
    ks = num_clusters(self.config)
    t = self.config.method.temperature
    state = {
        **queue_state,
        **init_bank(n, d),
        'assignments': jnp.full((len(ks), n), -1, jnp.int32),  # -1: no cluster yet
        'prototypes': {f'k{g}': jnp.zeros((k, d), jnp.float32) for g, k in enumerate(ks)},
        'concentration': {f'k{g}': jnp.full((k,), t, jnp.float32) for g, k in enumerate(ks)},
    }
    return params, batch_stats, state

  def target_forward(self, target_params, batch_stats, method_state, views, rng, axis_name,
                     first_row):
    # The index (the last input, `paired_inputs`) rides with the outputs that get no
    # gradient (an integer has none).
    targets, stats = super().target_forward(target_params, batch_stats, method_state,
                                            views[:-1], rng, axis_name, first_row)
    return {**targets, 'index': views[-1]}, stats

  def objective(self, params, method_state, outputs, targets, target_stats, rng, step,
                axis_name):
    m = self.config.method
    spe = self.run_length.steps_per_epoch
    epoch = step // spe
    proto_on = epoch >= int(m.proto_warmup_epochs)
    state = sharding.update_if(proto_on & (step % spe == 0),
                               lambda s: self._cluster(s, epoch, axis_name), method_state)
    queue = {'queue': state['queue'], 'ptr': state['ptr']}
    info_nce, (metrics, queue) = super().objective(params, queue, outputs, targets,
                                                   target_stats, rng, step, axis_name)
    proto, proto_metrics = self._proto_nce(state, outputs['q'], targets['index'], step,
                                           proto_on, axis_name)
    # The bank takes the view-2 keys after the loss, as the queue does.
    memory, filled = write_rows(state['memory'], state['filled'], targets['k'][0],
                                targets['index'], axis_name)
    new_state = {**state, **queue, 'memory': memory, 'filled': filled}
    metrics = {**metrics, **proto_metrics, 'info_nce': info_nce, 'proto_nce': proto}
    return info_nce + proto, (metrics, new_state)

  def batch_clusters_and_negatives(self, state, index, step, proto_on, axis_name):
    """The cluster of every example of the global batch per granularity (int32 [G, N]; all
    -1 unless `proto_on`) and each granularity's r negative clusters, drawn from
    (config.seed, step, granularity) among the clusters that are none of them: the same on
    every device."""
    index = parallel.gather_rows_replicated(index, axis_name)  # the global batch's
    batch_clusters = jnp.where(proto_on, jnp.take(state['assignments'], index, axis=1), -1)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(self.config.seed),
                                                _NEGATIVES_STREAM), step)
    negatives = [sample_negatives(jax.random.fold_in(key, g), batch_clusters[g], k,
                                  self.config.method.num_negative_prototypes)
                 for g, k in enumerate(num_clusters(self.config))]
    return batch_clusters, negatives

  def _proto_nce(self, state, queries, index, step, proto_on, axis_name):
    """The mean over granularities of ProtoNCE, for every query (0 before the first
    k-means: no example has a cluster, and `proto_on` is False)."""
    batch_clusters, negatives = self.batch_clusters_and_negatives(state, index, step, proto_on,
                                                                  axis_name)
    losses, metrics = [], []
    for g in range(len(negatives)):
      for q in queries:
        loss, metric = proto_nce(q, batch_clusters[g], negatives[g],
                                 state['prototypes'][f'k{g}'],
                                 state['concentration'][f'k{g}'], axis_name)
        losses.append(loss)
        metrics.append(metric)
    return sum(losses) / len(losses), mean_metrics(metrics)

  def _cluster(self, state, epoch, axis_name):
    """k-means of every granularity on the memory bank, and phi of every cluster."""
    ks = num_clusters(self.config)
    memory = state['memory']
    key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), epoch)
    results = spherical_kmeans_replicated(
        memory, ks, key, num_iterations=self.config.method.kmeans_iterations,
        valid=state['filled'], axis_name=axis_name)
    local_memory, _ = own_rows(memory, axis_name)
    prototypes, phis = {}, {}
    for g, r in enumerate(results):
      centroids = r.centroids.astype(memory.dtype)
      local_assignments, real = own_rows(r.assignments, axis_name)
      phis[f'k{g}'] = concentration(local_memory, jnp.where(real, local_assignments, -1),
                                    centroids, self.config.method.temperature, axis_name)
      prototypes[f'k{g}'] = centroids
    return {**state,
            'assignments': jnp.stack([r.assignments for r in results]),
            'prototypes': prototypes, 'concentration': phis}

