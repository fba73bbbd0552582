"""The cached-embedding gradient (`ssl_jax.microbatch`, `config.microbatches`): with K
micro-batches the loss, gradients, metrics and method state equal the whole batch's.

* Without BatchNorm (the tiny ViT, LayerNorm heads, drop path on): equal to K = 1 with K = 2
  on 8 devices, for two methods that run their networks differently (every method, and
  K = 2, 4, 8 on 1 device and 4 on 8, under -m slow); every method's outputs are laid out
  per view (by shapes).
* With BatchNorm: equal to the plain autodiff of the loss whose networks run one micro-batch
  at a time (BatchNorm statistics over the same micro-batch groups), written here with a
  Python loop and no custom VJP.
* The train step: two SGD steps with K = 2 on a 4 x 2 fsdp mesh with the online probe equal
  K = 1's states.

Planted bugs these tests caught (then reverted), in `ssl_jax/microbatch.py`: the
micro-batches' outputs merged interleaved (`merge_rows` transposing [K, m] before the
reshape: the per-method K = 2 tests; with one row per micro-batch it is invisible, hence 2
rows); every micro-batch's drop-path masks keyed from the device's first row (`first_row`
without the micro-batch's offset: the per-method tests); the objective's own parameter
gradient dropped, and the loss cotangent ignored (the objective-gradient test); the running
statistics of the last micro-batch kept instead of the mean (the BatchNorm test).
"""

from __future__ import annotations

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import method_harness as mh
from ssl_jax import config_lib, microbatch, parallel
from ssl_jax.methods import METHODS, Method, RunLength, build_method, method_class
from ssl_jax.methods.simclr import SimCLR

BATCH = 32
# Every method, plus the SimCLR variant whose objective differs (hard negatives), on the tiny
# ViT; but LiT, whose image tower is the locked one of a workdir, and whose forward is CLIP's.
CONFIGS = sorted(set(METHODS) - {'lit'}) + ['simclr_hard_negatives']


@pytest.fixture(scope='module', autouse=True)
def tiny_vit_registered():
  with mh.tiny_vit_registered():
    yield


class _Cached:
  """A method whose `loss` is the cached-embedding one (what the train step uses for K > 1)."""

  def __init__(self, method, num_microbatches):
    self.loss = microbatch.cached_loss(method, num_microbatches)


class _GhostBatchReference:
  """The K-micro-batch loss by plain autodiff: each micro-batch through the networks in a
  Python loop (BatchNorm over its rows of every device), outputs concatenated, the objective
  on them, running statistics averaged over the micro-batches. No custom VJP, no scan."""

  def __init__(self, method, num_microbatches):
    self.method, self.k = method, num_microbatches

  def loss(self, params, batch_stats, target_params, method_state, views, rng, step, axis_name):
    method, k = self.method, self.k
    m = views[0].shape[0] // k
    first = parallel.global_row_offset(views[0].shape[0], axis_name)
    parts = []
    for i in range(k):
      chunk = [v[i * m:(i + 1) * m] for v in views]
      outputs, stats = method.forward(params, batch_stats, chunk, rng, axis_name,
                                      first + i * m)
      targets, target_stats = method.target_forward(target_params, batch_stats, method_state,
                                                    chunk, rng, axis_name, first + i * m)
      parts.append((outputs, stats, targets, target_stats))
    outputs, targets = (jax.tree.map(lambda *xs: jnp.concatenate(xs), *[p[j] for p in parts])
                        for j in (0, 2))
    stats, target_stats = (jax.tree.map(lambda *xs: sum(xs) / k, *[p[j] for p in parts])
                           for j in (1, 3))
    loss, (metrics, new_state) = method.objective(
        params, method_state, outputs, jax.lax.stop_gradient(targets), target_stats, rng, step,
        axis_name)
    return loss, (metrics, stats, new_state)


def _layer_norm_config(name: str):
  """The tiny ViT with LayerNorm heads and drop path 0.3: no batch statistics anywhere, and
  per-example masks that must follow each example's global index."""
  config = mh.tiny_vit_config(name, drop_path_rate=0.3, batch_size=BATCH)
  config.model.head_norm = 'layer'
  if name == 'swav':  # the queue joins from the first step: its update is tested too
    config.method.queue_size, config.method.queue_start_epoch = 2 * BATCH, 0
  return config


def _assert_equal_results(actual, expected, what):
  """loss, grads, metrics, batch_stats and method_state within float32 rounding (rtol 1e-5 of
  each leaf's largest entry): a row in the wrong place or a wrong mask moves them by far more."""
  for i, part in enumerate(('loss', 'grads', 'metrics', 'batch_stats', 'method_state')):
    mh.assert_trees_close(actual[i], expected[i], rtol=1e-5, atol=1e-6, what=f'{what} {part}')


def _compare(config, reference_of, num_devices, ks):
  method, params, batch_stats, target, state = mh.init_method(config)
  views = mh.make_views(config, method, BATCH)
  args = (params, batch_stats, target, state, views, num_devices)
  expected = {k: mh.sharded_loss_and_grads(reference_of(method, k), *args) for k in ks}
  for k in ks:
    got = mh.sharded_loss_and_grads(_Cached(method, k), *args)
    _assert_equal_results(got, expected[k], f'{config.method.name}, K={k}, '
                                             f'{num_devices} devices:')
  # Not vacuous: the gradient is not zero.
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(expected[ks[0]][1])) > 0


def _whole_batch(method, k):
  del k
  return method


# Two ways of running the networks in the default run (views in one call; a call per view,
# a queue and a momentum encoder), about 12 s each on 2 cores; the others under -m slow.
FAST = {'triplet'}


@pytest.mark.parametrize('name', [n if n in FAST else pytest.param(n, marks=pytest.mark.slow)
                                  for n in CONFIGS])
def test_without_batch_norm_equals_the_whole_batch(name):
  """K = 2 on 8 devices (2 rows per micro-batch and device) equals K = 1: catches outputs a
  method does not lay out per view (merged in the wrong order), drop-path masks keyed by the
  micro-batch's rows, a per-device gradient summed twice or not at all, a method state
  updated per micro-batch."""
  _compare(_layer_norm_config(name), _whole_batch, 8, (2,))


@pytest.mark.parametrize('name', CONFIGS)
def test_outputs_are_per_view_rows(name):
  """Every method's `forward` and `target_forward` outputs have the rows of one view as
  their leading axis (what lets micro-batches concatenate), checked by shapes alone: catches
  an output left as the views' concatenation."""
  config = _layer_norm_config(name)
  method = build_method(config, RunLength(total_steps=1, steps_per_epoch=1,
                                          num_examples=mh.NUM_EXAMPLES))
  size = config.augment.crop_size
  params, batch_stats, state = jax.eval_shape(
      lambda r: method.init(r, jnp.zeros((2, size, size, 1))), jax.random.PRNGKey(0))
  target = jax.eval_shape(method.init_target, params)
  views = mh.make_views(config, method, BATCH)
  rng = jax.random.PRNGKey(0)
  outputs, _ = jax.eval_shape(lambda p: method.forward(p, batch_stats, views, rng, None, 0),
                              params)
  targets, _ = jax.eval_shape(lambda t: method.target_forward(t, batch_stats, state, views,
                                                              rng, None, 0), target)
  leaves = jax.tree.leaves((outputs, targets))
  assert leaves and all(leaf.shape[0] == BATCH for leaf in leaves), (name, leaves)


def test_rolled_loop_equals_the_whole_batch():
  """The accelerators' path (`microbatch.unrolled` False: the micro-batches in a
  `jax.lax.scan`, which the CPU unrolls for speed) on the triplet loss, K = 2 on 8
  devices."""
  with mock.patch.object(microbatch, 'unrolled', lambda: False):
    _compare(_layer_norm_config('triplet'), _whole_batch, 8, (2,))


@pytest.mark.slow
@pytest.mark.parametrize('name', CONFIGS)
def test_without_batch_norm_equals_the_whole_batch_everywhere(name):
  """K = 2, 4, 8 on 1 device and K = 4 on 8 devices (one row per micro-batch and device)."""
  config = _layer_norm_config(name)
  for num_devices, ks in ((1, (2, 4, 8)), (8, (4,))):
    method, params, batch_stats, target, state = mh.init_method(config)
    views = mh.make_views(config, method, BATCH)
    args = (params, batch_stats, target, state, views, num_devices)
    whole = mh.sharded_loss_and_grads(method, *args)
    for k in ks:
      got = mh.sharded_loss_and_grads(_Cached(method, k), *args)
      _assert_equal_results(got, whole, f'{name}, K={k}, {num_devices} devices:')


# BatchNorm everywhere (ConvNet, BatchNorm heads): one method per way of running the networks.
# Config overrides per case.
BATCH_NORM_CASES = {
    'simclr': {},                      # both views in one call
    'moco_v2': {'method.shuffle_bn_group_size': 2,   # shuffled BN groups
                'method.shuffle_bn_groups': 2},
    'byol': {},                        # a call per view, a target network
    # Multi-crop (which the ConvNet CPU recipe leaves out); the teacher's own running
    # statistics.
    'dino': {'augment.num_local_crops': 2},
}


@pytest.mark.parametrize('name', [n if n in ('simclr', 'moco_v2') else
                                  pytest.param(n, marks=pytest.mark.slow)
                                  for n in BATCH_NORM_CASES])
def test_with_batch_norm_equals_ghost_batches(name):
  """K = 2 on 4 devices (4 rows per micro-batch and device: one shuffled-BN block) equals the plain autodiff of the loss with BatchNorm over the same
  micro-batch groups (`_GhostBatchReference`): catches a wrong custom VJP (a micro-batch's
  gradient dropped, scaled or pulled back through the wrong rows), running statistics not
  averaged over the micro-batches, shuffled-BN groups placed by the micro-batch instead of
  the global rows. And K = 2 differs from K = 1 (BatchNorm's statistics do change), except
  with shuffled BN, whose groups are smaller than a micro-batch."""
  config = mh.shrink(mh.load_config(name), batch_size=BATCH)
  config.update_from_flattened_dict(BATCH_NORM_CASES[name])
  _compare(config, _GhostBatchReference, 4, (2,))
  method, params, batch_stats, target, state = mh.init_method(config)
  views = mh.make_views(config, method, BATCH)
  args = (params, batch_stats, target, state, views, 4)
  whole = mh.sharded_loss_and_grads(method, *args)
  ghost = mh.sharded_loss_and_grads(_GhostBatchReference(method, 2), *args)
  if name == 'moco_v2':
    # Shuffled BN's groups (4 rows) lie within a micro-batch: K does not change them.
    _assert_equal_results(ghost, whole, 'shuffled BN, K=2 against K=1:')
  else:
    assert abs(float(whole[0]) - float(ghost[0])) > 1e-4


def test_train_step_equals_the_whole_batch():
  """Two SGD steps (lr 2) of MoCo v2 (a queue, a momentum encoder) with the online probe on a
  4 x 2 fsdp mesh, K = 2 against K = 1: parameters, optimizer state, target, queue and probe
  equal, and the parameters moved. Catches the step not passing its micro-batches the
  fsdp-gathered parameters, the probe's features computed on the wrong rows, a gradient
  lost on its way out of shard_map."""
  def config(k):
    c = _layer_norm_config('moco_v2')
    c.optimizer.name, c.optimizer.base_lr = 'sgd', 2.0
    c.optimizer.warmup_epochs = 0.0
    c.mesh.fsdp, c.microbatches = 2, k
    c.eval.online_probe = True
    return c

  whole, whole_metrics = mh.trainer_steps(config(1), 2, 8)
  cached, cached_metrics = mh.trainer_steps(config(2), 2, 8)
  for part in ('params', 'opt_state', 'target_params', 'method_state', 'probe_params'):
    mh.assert_trees_close(getattr(cached[-1], part), getattr(whole[-1], part), rtol=1e-5,
                          atol=1e-5, what=part)
  for got, expected in zip(cached_metrics, whole_metrics):
    mh.assert_trees_close(got, expected, rtol=1e-5, atol=1e-5, what='metrics')
  moved = max(float(np.abs(a - b).max()) for a, b in
              zip(jax.tree.leaves(whole[-1].params), jax.tree.leaves(whole[0].params)))
  assert moved > 1e-2


class _PenalisedSimCLR(SimCLR):
  """SimCLR plus a term on the parameters themselves (as CLIP's learnable temperature would
  be): an objective with a gradient of its own with respect to `params`."""

  def objective(self, params, method_state, outputs, targets, target_stats, rng, step,
                axis_name):
    loss, aux = super().objective(params, method_state, outputs, targets, target_stats, rng,
                                  step, axis_name)
    return loss + jnp.sum(jnp.square(params['projector']['Dense_0']['kernel'])), aux


def test_objective_gradient_and_loss_scaling():
  """An objective that reads the parameters, and a loss the caller scales (x 2.5): the
  gradient of 2.5 x the K = 2 loss equals that of 2.5 x K = 1's on 8 devices. Catches the
  objective's own parameter gradient dropped from the sum over micro-batches, and the loss
  cotangent applied never or twice (the train step's cotangent is 1, which hides both)."""
  config = _layer_norm_config('simclr')
  method = _PenalisedSimCLR(config, RunLength(total_steps=4, steps_per_epoch=1))
  _, params, batch_stats, target, state = mh.init_method(config)
  views = mh.make_views(config, method, BATCH)

  class Scaled:
    def __init__(self, loss_fn):
      def loss(*args):
        value, aux = loss_fn(*args)
        return 2.5 * value, aux
      self.loss = loss

  args = (params, batch_stats, target, state, views, 8)
  whole = mh.sharded_loss_and_grads(Scaled(method.loss), *args)
  cached = mh.sharded_loss_and_grads(Scaled(microbatch.cached_loss(method, 2)), *args)
  for i, part in enumerate(('loss', 'grads')):
    mh.assert_trees_close(cached[i], whole[i], rtol=1e-5, atol=1e-6, what=part)


def test_map_rows_is_the_whole_batch_function():
  """`map_rows` concatenates the micro-batches' results in row order."""
  x = jnp.arange(24.0).reshape(12, 2)
  np.testing.assert_array_equal(microbatch.map_rows(lambda a: a * 2 + a[:, :1], x, 3),
                                x * 2 + x[:, :1])


# ------------------------------------------------------------------------------ config

def _problems(**fields):
  config = mh.load_config('simclr')
  for key, value in fields.items():
    node = config
    *path, last = key.split('.')
    for part in path:
      node = node[part]
    node[last] = value
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(config, num_devices=8)
  return str(error.value)


def test_config_errors_name_the_fix():
  message = _problems(batch_size=64, microbatches=3)
  assert 'microbatches=3 must divide the 8 rows' in message and 'multiple of 24' in message
  assert 'microbatches must be >= 1' in _problems(microbatches=0)
  assert "model.head_norm='group'" in _problems(**{'model.head_norm': 'group'})


def test_a_method_with_its_loss_in_one_piece_is_refused():
  """A method that overrides `loss` only cannot be micro-batched: refused by the config check,
  before any work; allowed with K = 1."""
  class OnePiece(Method):
    def loss(self, *args):
      raise NotImplementedError

  assert all(method_class(name).splits_its_loss() for name in METHODS)
  assert not OnePiece.splits_its_loss()
  config = mh.load_config('simclr')
  config.microbatches = 2
  assert any('cannot run micro-batched' in p for p in OnePiece.config_problems(config))
  config.microbatches = 1
  assert not any('micro-batched' in p for p in OnePiece.config_problems(config))
