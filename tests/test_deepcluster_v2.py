"""DeepCluster-v2: the loss computed by hand, the memory bank's writes, 8 devices equal to one
and to float64 across a k-means epoch boundary, exact resume through a k-means, config
errors, and the 'index' every training batch carries (in memory, host-cropped, resumed)."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import method_harness as mh
from test_host_pipeline import SPECS, write_images
from ssl_jax import config_lib, experiment
from ssl_jax.data import host_crop, pipeline, sources
from ssl_jax.methods import RunLength, build_method

BATCH = 32


def _config(**method):
  c = mh.shrink(mh.load_config('deepcluster_v2'), batch_size=BATCH)
  c.augment.num_local_crops = 2
  m = c.method
  m.projector_hidden_dim = 16
  m.projector_output_dim = 8
  m.num_clusters = (6, 4, 5)
  m.kmeans_iterations = 3
  m.update(method)
  return c


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ------------------------------------------------------------------------------------------
# The loss and the memory bank.
# ------------------------------------------------------------------------------------------

def _hand_state(num_examples, assignments, dim=2):
  heads = len(assignments)
  return {'memory': jnp.zeros((2, num_examples, dim)), 'filled': jnp.zeros((num_examples,), bool),
          'assignments': jnp.asarray(assignments, jnp.int32),
          'centroids': {f'head{h}': jnp.eye(dim) for h in range(heads)}}


def test_loss_by_hand():
  """Prototypes e1, e2 (both heads), tau = 0.1, so a crop's logits are 10 on its own axis and
  0 on the other. Example A (index 0) has crops (1,0), (1,0); B (index 1) (0,1), (1,0); C
  (index 2) has no cluster (-1) and is left out. With L = log(1 + e^-10), a crop scored
  right costs L and one scored wrong 10 + L.
    head 0, A -> 0, B -> 1: A right twice, B right then wrong: (3L + 10 + L) / 4 = 2.5 + L
    head 1, A -> 1, B -> 1: A wrong twice, B right then wrong: (30 + 4L) / 4 = 7.5 + L
  loss = the heads' mean = 5 + L."""
  config = _config(num_clusters=(2, 2), projector_output_dim=2)
  method = build_method(config, RunLength(total_steps=100, steps_per_epoch=50, num_examples=3))
  state = _hand_state(3, [[0, 1, -1], [1, 1, -1]])
  z1 = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
  z2 = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.8, 0.6]])
  loss, (metrics, new_state) = method.objective(
      {}, state, {'z': [z1, z2]}, {'index': jnp.array([0, 1, 2])}, {}, None,
      jnp.int32(1), None)
  np.testing.assert_allclose(float(loss), 5.0 + np.log1p(np.exp(-10.0)), rtol=1e-6)
  np.testing.assert_allclose(float(metrics['clustered_fraction']), 4 / 6)
  # The memory holds each example's global crops, at its index; the clusters are unchanged.
  np.testing.assert_array_equal(new_state['memory'], np.stack([z1, z2]))
  assert np.asarray(new_state['filled']).all()
  np.testing.assert_array_equal(new_state['assignments'], state['assignments'])


def test_epoch_zero_has_no_loss_and_freezes_the_networks():
  """Before the first k-means no example has a cluster: the loss is 0, and the optimizer
  leaves the encoder and projector untouched for that epoch (the memory-filling pass)."""
  config = _config(num_clusters=(2,), projector_output_dim=2)
  method = build_method(config, RunLength(total_steps=100, steps_per_epoch=50, num_examples=3))
  state = _hand_state(3, [[-1, -1, -1]])
  z = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
  loss, _ = method.objective({}, state, {'z': [z, z]}, {'index': jnp.array([0, 1, 2])}, {},
                             None, jnp.int32(7), None)
  assert float(loss) == 0.0
  frozen = method.frozen_steps()
  assert frozen[('encoder',)] == frozen[('projector',)] == 50


def test_memory_keeps_the_later_row_of_a_repeated_example():
  """A batch across an epoch boundary can hold an example twice: its slot gets the later row
  (an explicit rule; a scatter of both would leave either)."""
  config = _config(num_clusters=(2,), projector_output_dim=2)
  method = build_method(config, RunLength(total_steps=100, steps_per_epoch=50, num_examples=4))
  state = _hand_state(4, [[-1] * 4])
  z1 = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
  z2 = -z1
  _, (_, new_state) = method.objective({}, state, {'z': [z1, z2]},
                                       {'index': jnp.array([3, 1, 3])}, {}, None,
                                       jnp.int32(1), None)
  memory = np.asarray(new_state['memory'])
  np.testing.assert_array_equal(memory[:, 3], [z1[2], z2[2]])
  np.testing.assert_array_equal(memory[:, 1], [z1[1], z2[1]])
  np.testing.assert_array_equal(memory[:, [0, 2]], 0.0)
  np.testing.assert_array_equal(new_state['filled'], [False, True, False, True])


# ------------------------------------------------------------------------------------------
# Devices, float64, a k-means epoch boundary.
# ------------------------------------------------------------------------------------------

NUM_EXAMPLES = 80
RUN = RunLength(total_steps=100, steps_per_epoch=4, num_examples=NUM_EXAMPLES)


def _filled_state(config, method_state, seed=0):
  """A memory bank as after an epoch: random unit embeddings of 75 of the 80 examples (5
  never seen), clusters and prototypes as a previous k-means left them."""
  rng = np.random.default_rng(seed)
  d = config.method.projector_output_dim
  filled = np.ones(NUM_EXAMPLES, bool)
  filled[rng.choice(NUM_EXAMPLES, 5, replace=False)] = False
  memory = _unit(rng.normal(size=(2, NUM_EXAMPLES, d))) * filled[None, :, None]
  heads = config.method.num_clusters
  assignments = np.stack([np.where(filled, rng.integers(0, k, NUM_EXAMPLES), -1)
                          for k in heads]).astype(np.int32)
  centroids = {f'head{h}': _unit(rng.normal(size=(k, d))).astype(np.float32)
               for h, k in enumerate(heads)}
  assert set(method_state) == {'memory', 'filled', 'assignments', 'centroids'}
  return {'memory': memory.astype(np.float32), 'filled': filled, 'assignments': assignments,
          'centroids': centroids}


def test_devices_agree_across_a_kmeans_boundary():
  """`mh.check_devices_agree`'s comparison (8 devices and 1 against float64: loss, gradients,
  metrics, BN statistics, method state) with a filled memory bank at step 4, an epoch
  boundary: k-means of every head inside the step, on the memory's rows split over the
  devices, then the loss on the new clusters and the memory's writes. The batch's indices
  hold an example twice. (Step 3, without k-means, in the slow variant below.)"""
  _check_devices_agree(steps=(4,))


@pytest.mark.slow  # six more compilations: `pytest -m slow`
def test_devices_agree_before_and_at_a_kmeans_boundary():
  _check_devices_agree(steps=(3, 4))


def _check_devices_agree(steps):
  config = _config()
  method, params, batch_stats, target, state = mh.init_method(config, RUN)
  state = _filled_state(config, jax.device_get(state))
  views = mh.make_views(config, method, BATCH)[:-1]  # the harness's index, replaced:
  index = np.random.default_rng(1).permutation(NUM_EXAMPLES)[:BATCH].astype(np.int32)
  index[-1] = index[3]
  views = views + [jnp.asarray(index)]
  length = mh.reduction_length(views[:-1])
  for step in steps:
    ref = mh.float64_loss_and_grads(config, params, batch_stats, target, state, views, step,
                                    run_length=RUN)
    one = mh.sharded_loss_and_grads(method, params, batch_stats, target, state, views, 1, step)
    many = mh.sharded_loss_and_grads(method, params, batch_stats, target, state, views, 8,
                                     step)
    for name, other in (('1 device', one), ('8 devices', many)):
      for i, part in enumerate(('loss', 'grads', 'metrics', 'batch_stats', 'method_state')):
        mh.assert_close_to_float64(other[i], ref[i], length, f'{part}, {name}, step {step}')
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(ref[1])) > 0
    new = ref[4]
    clustered = step == 4
    # Not vacuous: step 4 replaced every head's clusters and prototypes, step 3 none.
    for h in range(3):
      changed = not np.array_equal(new['centroids'][f'head{h}'], state['centroids'][f'head{h}'])
      assert changed == clustered
    assert (np.asarray(new['assignments'])[:, ~state['filled']] == -1).all()
  # At the boundary the clusters are k-means' (valid examples only) with its centroids.
  assignments = np.asarray(new['assignments'])
  for h, k in enumerate(config.method.num_clusters):
    a = assignments[h][state['filled']]
    assert a.min() >= 0 and a.max() < k and len(np.unique(a)) > 1


# ------------------------------------------------------------------------------------------
# The trainer: resume, config errors.
# ------------------------------------------------------------------------------------------

def _two_step_epochs(config, num_train_examples):
  del config, num_train_examples
  return 2


@pytest.mark.slow  # three short runs: `pytest -m slow` (the default resumes MoCo v2)
def test_resumed_run_ends_with_identical_state(tmp_path):
  """Epochs of 2 steps on Fashion-MNIST: step 2 runs the first k-means. A run stopped at
  step 2 and resumed (the k-means then runs on the restored memory) ends as the straight
  run, memory bank, clusters and prototypes included."""
  config = _config()
  config.augment.num_local_crops = 0  # resume does not depend on them; compiles faster
  with mock.patch.object(experiment, 'steps_per_epoch', _two_step_epochs):
    first, resumed = mh.resumed_run_matches_straight_run(config, tmp_path)
  # Not vacuous: the first half only filled the memory (2 x 32 examples, no clusters yet,
  # networks frozen); the second clustered it and trained.
  assert int(np.asarray(first.method_state['filled']).sum()) == 2 * BATCH
  assert (np.asarray(first.method_state['assignments']) == -1).all()
  assignments = np.asarray(resumed.method_state['assignments'])
  assert (assignments >= 0).sum(axis=1).tolist() == [2 * BATCH] * 3
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first.params),
                                                      jax.tree.leaves(resumed.params)))


def test_config_errors_name_the_fix():
  config_lib.validate(mh.load_config('deepcluster_v2'), 8)
  config_lib.validate(mh.load_config('deepcluster_v2', 'backbone=resnet50'), 8)
  c = _config(num_clusters=(3000, 0), kmeans_iterations=0)
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(c, 8)
  message = str(error.value)
  for expected in ('method.num_clusters=(3000, 0) must list a positive number of clusters',
                   'method.kmeans_iterations must be at least 1'):
    assert expected in message, message
  # A workdir written before num_clusters took its present name: named, not an AttributeError.
  c = _config()
  c.method.num_prototypes = c.method.num_clusters
  del c.method['num_clusters']
  with pytest.raises(config_lib.ConfigError, match='method.num_prototypes here, its former '
                     'name: rename it'):
    config_lib.validate(c, 8)
  # More clusters than examples: found when the memory bank is made.
  method = build_method(_config(num_clusters=(100,)),
                        RunLength(total_steps=4, steps_per_epoch=1, num_examples=64))
  with pytest.raises(config_lib.ConfigError, match='set each to at most 64'):
    method.init(jax.random.PRNGKey(0), jnp.zeros((2, 12, 12, 1)))
  with pytest.raises(config_lib.ConfigError, match='training set size'):
    build_method(_config()).init(jax.random.PRNGKey(0), jnp.zeros((2, 12, 12, 1)))


def test_recipes():
  paper = mh.load_config('deepcluster_v2', 'backbone=resnet50')
  assert paper.method.num_clusters == (3000, 3000, 3000) and paper.batch_size == 4096
  assert paper.num_epochs == 801 and paper.optimizer.warmup_epochs == 11
  assert paper.optimizer.base_lr * 4096 / 256 == pytest.approx(4.8)
  cpu = mh.load_config('deepcluster_v2')
  assert cpu.method.num_clusters == (300, 300, 300) and cpu.num_epochs == 17


# ------------------------------------------------------------------------------------------
# The 'index' of every training batch.
# ------------------------------------------------------------------------------------------

def _indexed(n):
  images = (np.arange(n)[:, None, None, None] % 251 * np.ones((1, 3, 2, 1))).astype(np.uint8)
  return sources.ArraySource(images, np.arange(n))  # label = index: batches show their records


def test_in_memory_batches_carry_their_records_indices():
  source = _indexed(100)
  kwargs = dict(global_batch_size=16, seed=5, process_count=2)
  hosts = [pipeline.make_train_iterator(source, process_index=h, **kwargs) for h in (0, 1)]
  for _ in range(14):  # 224 examples: across two epoch boundaries
    for it in hosts:
      batch = next(it)
      assert batch['index'].dtype == np.int32 and batch['index'].shape == (8,)
      np.testing.assert_array_equal(batch['index'], batch['label'])
      np.testing.assert_array_equal(batch['image'][:, 0, 0, 0], batch['index'] % 251)


def test_resumed_iterator_gives_the_same_indices():
  source = _indexed(100)
  make = lambda: pipeline.make_train_iterator(source, global_batch_size=16, seed=5,  # noqa
                                              process_index=0, process_count=1)
  straight = make()
  expected = [next(straight)['index'] for _ in range(9)]
  first = make()
  for _ in range(4):
    next(first)
  resumed = make()
  resumed.set_state(first.get_state())
  for want in expected[4:]:
    np.testing.assert_array_equal(next(resumed)['index'], want)


def test_host_cropped_batches_carry_their_records_indices(tmp_path):
  """Each row's views are the crops of record 'index' at the row's stream position; an
  undecodable record is replaced by the next, and 'index' names the replacement."""
  write_images(tmp_path, 11, corrupt=(4,))
  source = sources.get_source(f'folder:{tmp_path}', 'train')
  it = pipeline.make_train_iterator(source, global_batch_size=8, seed=3, process_index=0,
                                    process_count=1, crop_specs=SPECS)
  seen = set()
  for step in range(3):  # 24 examples: two epochs of 11
    batch = next(it)
    assert batch['index'].dtype == np.int32
    for row, index in enumerate(batch['index']):
      image = host_crop.decode_image(source[int(index)]['image'], 3)
      views = host_crop.random_views(image, SPECS, 3, step * 8 + row)
      for got, want in zip(batch['views'], views):
        np.testing.assert_array_equal(got[row], want)
      seen.add(int(index))
  assert 4 not in seen and len(seen) == 10
