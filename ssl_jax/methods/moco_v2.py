"""MoCo v2 (He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation
Learning"; Chen, Fan, Girshick & He 2020, "Improved Baselines with Momentum Contrastive
Learning"), and MoCo v1 with `method.projector_hidden_dim = 0` (a linear head).

A query encoder f_q (encoder + MLP head fc-ReLU-fc, v2's addition) is trained with InfoNCE
(He et al., eq. 1) to pick, among the key of another view of its image and the K keys of a
queue, its own key. Keys come from a momentum encoder f_k, the moving average
theta_k <- m theta_k + (1 - m) theta_q (eq. 2) kept in `target_params` and updated by the
trainer after each step. The queue lives in `method_state`; after the loss, the keys of the
current global batch are gathered from all devices and replace the oldest K entries
(Algorithm 1), so the new queue is the same on every device.

Views. As in the paper, the loss is asymmetric per image: view 1 is the query, view 2 the
key, and the view-2 keys are enqueued. `method.symmetric = True` adds the swapped term
(query view 2 against the key of view 1) and averages the two; the queue still receives the
view-2 keys only, so it holds the same K / N batches either way.

BatchNorm. MoCo's "shuffling BN" (He et al., Sec. 3.3) computes BN per device and encodes the
keys in a shuffled order, so a query and its positive key are normalised with statistics of
different subsets; otherwise the statistics shared by the two act as a signature that tells
the positive apart from the queue's keys (which come from older batches), and the model
learns that instead of the images ("cheating"). Per-device BN makes the result depend on the
number of devices, which this project guarantees it does not. Both encoders therefore use
BatchNorm synchronised over the global batch (as MoCo v3 does). This weakens the signature,
since statistics of the whole global batch vary far less from batch to batch than those of a
per-device sub-batch, but does not remove it (the current keys still share the current
batch's statistics, the queued keys do not), so `contrastive_acc` close to 1 with a poor
kNN would be the sign of cheating. `method.shuffle_bn_group_size > 0` instead enables a
shuffled BN that does not depend on the device count: see `apply_in_groups`.

A key encoder that moves too fast cheats the same way without any help from BN: the queued
keys then come from visibly older encoders than the current keys, so a collapsing model can
still tell its positive apart by age: with m = 0.9 on a short Fashion-MNIST run,
contrastive_acc rose close to 1 while the embeddings collapsed, and m = 0.99 learned (README,
"Notes from development").

The key encoder runs BatchNorm in training mode, normalising with the current batch's
statistics as the reference implementation does. Its running statistics are discarded: it
never runs in inference mode (evaluation uses the query encoder and its running statistics),
and the reference implementation likewise never reads them. Its forward reads the query
encoder's running statistics as a placeholder, which training mode ignores.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssl_jax import parallel
from ssl_jax.losses import queue as queue_lib
from ssl_jax.losses.info_nce import l2_normalize
from ssl_jax.losses.moco import queue_info_nce
from ssl_jax.methods.base import Method
from ssl_jax.methods.common import EncoderWithProjector, forward_views, mean_metrics
from ssl_jax.models import DTYPES, build_encoder


class MLPHead(nn.Module):
  """MoCo v2's projection head (Chen et al. 2020, Sec. 2): fc -> ReLU -> fc, with biases and
  without BatchNorm, replacing MoCo v1's single fc layer, which `hidden_dim = 0` gives
  (He et al. 2020, Sec. 3.3: the fc output of 128 dimensions; configs/moco_v1.py)."""
  hidden_dim: int = 2048
  output_dim: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train  # no BatchNorm or dropout
    x = x.astype(self.dtype)
    if self.hidden_dim:
      x = nn.relu(nn.Dense(self.hidden_dim, dtype=self.dtype)(x))
    return nn.Dense(self.output_dim, dtype=self.dtype)(x).astype(jnp.float32)


def apply_in_groups(network: nn.Module, params, batch_stats, images, group_size: int,
                    groups_per_block: int, rng, axis_name: str | None, first_row=None):
  """`network` in training mode with BatchNorm over fixed groups of `group_size` rows: a
  shuffled BN (He et al. 2020, Sec. 3.3) that, unlike per-device BN, does not depend on the
  number of devices.

  The global batch is cut into blocks of `group_size * groups_per_block` consecutive rows and
  each block into `groups_per_block` groups. Without `rng` a group is consecutive rows (the
  queries: like one GPU's sub-batch in the paper); with `rng` the block's rows are first
  permuted (keyed by `rng` and the block's global index) and the outputs permuted back (the
  keys: like the paper's shuffle across GPUs), so a key is normalised with statistics that
  share about 1 / groups_per_block of the images of its query's group (the paper's 8 GPUs:
  1/8). Each device holds whole blocks, so this needs no communication and gives the same
  result for any device count (and any micro-batching into whole blocks: `first_row`, the
  global index of the first row, None for this device's first, places the blocks). `network` must be built without a mesh axis (BN local to
  the group, which vmap provides). Returns (outputs in input order, running statistics
  updated with the mean of all groups' statistics over the global batch).
  """
  n = images.shape[0]
  block = group_size * groups_per_block
  if n % block:
    raise ValueError(f'Shuffled BN needs whole blocks of {block} rows '
                     f'(method.shuffle_bn_group_size * method.shuffle_bn_groups) on every '
                     f'device and micro-batch, but one holds {n} rows: make batch_size / '
                     f'(devices x microbatches) a multiple of {block}.')
  num_blocks = n // block
  blocks = images.reshape((num_blocks, block) + images.shape[1:])
  if rng is not None:
    if first_row is None:
      first_row = parallel.global_row_offset(n, axis_name)
    block_ids = first_row // block + jnp.arange(num_blocks)
    perms = jax.vmap(lambda b: jax.random.permutation(jax.random.fold_in(rng, b), block))(
        block_ids)
    blocks = jax.vmap(lambda x, p: x[p])(blocks, perms)
  groups = blocks.reshape((num_blocks * groups_per_block, group_size) + images.shape[1:])

  def one_group(x):
    out, updates = network.apply({'params': params, 'batch_stats': batch_stats}, x,
                                 train=True, mutable=['batch_stats'])
    return out, updates['batch_stats']

  outputs, group_stats = jax.vmap(one_group)(groups)

  def restore_order(y):
    y = y.reshape((num_blocks, block) + y.shape[2:])
    if rng is not None:
      # Output j of a block is row perms[j]: scatter it back there.
      y = jax.vmap(lambda v, p: jnp.zeros_like(v).at[p].set(v))(y, perms)
    return y.reshape((n,) + y.shape[2:])

  new_stats = jax.tree.map(lambda s: parallel.pmean(jnp.mean(s, axis=0), axis_name),
                           group_stats)
  return jax.tree.map(restore_order, outputs), new_stats


@dataclasses.dataclass(frozen=True)
class MoCoV2(Method):
  # f_k is a moving average of all of f_q, with a constant m (He et al. 2020, Sec. 4.1:
  # m = 0.999), and starts as its copy (Algorithm 1: f_k.params = f_q.params).
  target_networks = ('encoder', 'projector')
  target_momentum_schedule = 'constant'

  def network(self, axis_name: str | None = None) -> EncoderWithProjector:
    m = self.config.method
    return EncoderWithProjector(
        encoder=build_encoder(self.config.model, axis_name),
        projector=MLPHead(hidden_dim=m.projector_hidden_dim, output_dim=m.projector_output_dim,
                          dtype=DTYPES[self.config.model.dtype]))

  @classmethod
  def method_problems(cls, config) -> list[str]:
    m, problems = config.method, []
    if m.projector_hidden_dim < 0:
      problems.append(f'method.projector_hidden_dim={m.projector_hidden_dim} must be >= 0: the '
                      "hidden width of v2's MLP head (2048), or 0 for MoCo v1's linear head.")
    if m.queue_size < config.batch_size:
      problems.append(
          f'method.queue_size={m.queue_size} is smaller than batch_size={config.batch_size}: '
          'every step enqueues the whole global batch. Set method.queue_size >= batch_size '
          '(the paper: 65536).')
    if m.shuffle_bn_group_size:
      block = m.shuffle_bn_group_size * m.shuffle_bn_groups
      k = config.get('microbatches', 1)
      if m.shuffle_bn_groups < 2 or config.batch_size % (block * k):
        problems.append(
            f'Shuffled BN (method.shuffle_bn_group_size={m.shuffle_bn_group_size}) needs '
            f'method.shuffle_bn_groups >= 2 and batch_size a multiple of group size x groups '
            f'= {block} (per device and micro-batch, too: x microbatches={k}), e.g. group '
            'size 32 and 8 groups for batch 256.')
    return problems

  def init(self, rng, images):
    net_rng, queue_rng = jax.random.split(rng)
    params, batch_stats = self.init_networks(net_rng, images)
    m = self.config.method
    return params, batch_stats, queue_lib.init_queue(queue_rng, m.queue_size,
                                                     m.projector_output_dim)

  def _embed(self, params, batch_stats, views, rng, axis_name, first_row, shuffle: bool):
    """Projections of each view and the running statistics after them: per view, with BN
    synchronised over the global batch, or over `apply_in_groups`'s fixed-size groups (the
    keys' groups shuffled)."""
    m = self.config.method
    if not m.shuffle_bn_group_size:
      # The queries' (online) forward gets the rng for drop path, the keys' none.
      outputs, batch_stats = forward_views(self.network(axis_name), params, batch_stats, views,
                                           None if shuffle else rng, first_row)
      return [z for _, z in outputs], batch_stats
    # BN per group, local to a device: the network is built without a mesh axis (and without
    # a dropout rng, so no drop path: a group does not know its rows' global indices).
    zs = []
    for i, view in enumerate(views):
      (_, z), batch_stats = apply_in_groups(
          self.network(None), params, batch_stats, view, m.shuffle_bn_group_size,
          m.shuffle_bn_groups, jax.random.fold_in(rng, i) if shuffle else None, axis_name,
          first_row)
      zs.append(z)
    return zs, batch_stats

  def forward(self, params, batch_stats, views, rng, axis_name, first_row):
    # Query i is matched with key i: q(view 1) with k(view 2), and if symmetric also
    # q(view 2) with k(view 1).
    query_views = list(views[:2]) if self.config.method.symmetric else [views[0]]
    queries, batch_stats = self._embed(params, batch_stats, query_views, rng, axis_name,
                                       first_row, shuffle=False)
    return {'q': queries}, batch_stats

  def target_forward(self, target_params, batch_stats, method_state, views, rng, axis_name,
                     first_row):
    del method_state
    key_views = [views[1], views[0]] if self.config.method.symmetric else [views[1]]
    keys, _ = self._embed(target_params, batch_stats, key_views, rng, axis_name, first_row,
                          shuffle=True)
    return {'k': [l2_normalize(k) for k in keys]}, {}

  def objective(self, params, method_state, outputs, targets, target_stats, rng, step,
                axis_name):
    del params, target_stats, rng, step  # m is constant and applied by the trainer
    m = self.config.method
    queries, keys = outputs['q'], targets['k']
    terms = [queue_info_nce(q, k, method_state['queue'], m.temperature, axis_name)
             for q, k in zip(queries, keys)]
    loss = sum(t[0] for t in terms) / len(terms)
    metrics = mean_metrics([t[1] for t in terms])
    # The queue takes the view-2 keys after the loss has used the old queue (Algorithm 1).
    new_state = queue_lib.enqueue(method_state, keys[0], axis_name)
    return loss, (metrics, new_state)
