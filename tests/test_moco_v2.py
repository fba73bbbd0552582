"""MoCo v2: the queue InfoNCE by hand, the method's loss and new queue against a numpy
reference, shuffled BN, devices agreeing, the key encoder's moving average and the queue
through the trainer, config errors, exact resume, and a short Fashion-MNIST run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import method_harness as harness
from ssl_jax import config_lib
from ssl_jax.losses.moco import queue_info_nce
from ssl_jax.methods.moco_v2 import apply_in_groups


def _config(**method):
  config = harness.shrink(harness.load_config('moco_v2'))
  # 80 is not a multiple of the batch of 32, so a few steps wrap the queue around.
  config.method.queue_size = 80
  config.method.projector_hidden_dim = 32
  config.method.projector_output_dim = 16
  config.method.update(method)
  return config


def _normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _logsumexp(x):
  top = x.max(axis=1, keepdims=True)
  return (top + np.log(np.exp(x - top).sum(axis=1, keepdims=True)))[:, 0]


def _reference_moco_loss(q, k, queue, temperature):
  """He et al. 2020, eq. 1, written out in float64."""
  q, k = _normalize(q), _normalize(k)
  logits = np.concatenate([np.sum(q * k, axis=1, keepdims=True), q @ np.asarray(queue).T],
                          axis=1) / temperature
  return np.mean(_logsumexp(logits) - logits[:, 0])


def test_queue_info_nce_hand_computed():
  # Query 0 meets its key at cos 0.6 and the queue at cos 1 and -1; query 1 its key (given
  # unnormalised, as [0, 2]) at cos 1 and the queue at cos 0 twice. tau = 0.5 doubles them.
  q = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  k = jnp.array([[0.6, 0.8], [0.0, 2.0]])
  queue = jnp.array([[1.0, 0.0], [-1.0, 0.0]])
  loss, metrics = queue_info_nce(q, k, queue, 0.5)
  loss_0 = np.log(np.exp(1.2) + np.exp(2.0) + np.exp(-2.0)) - 1.2
  loss_1 = np.log(np.exp(2.0) + 2.0) - 2.0
  np.testing.assert_allclose(loss, (loss_0 + loss_1) / 2, rtol=1e-6)
  np.testing.assert_allclose(metrics['pos_cosine'], 0.8, rtol=1e-6)
  np.testing.assert_allclose(metrics['neg_cosine'], 0.0, atol=1e-7)
  # Query 0's positive loses to a queue key, query 1's wins.
  np.testing.assert_allclose(metrics['contrastive_acc'], 0.5)


def test_queue_info_nce_matches_reference():
  rng = np.random.default_rng(0)
  q, k = rng.normal(size=(2, 6, 5)).astype(np.float32)
  queue = _normalize(rng.normal(size=(11, 5))).astype(np.float32)
  loss, _ = queue_info_nce(jnp.asarray(q), jnp.asarray(k), jnp.asarray(queue), 0.2)
  np.testing.assert_allclose(loss, _reference_moco_loss(q, k, queue, 0.2), rtol=1e-5)


def _perturbed(params, seed=5):
  """A key encoder that differs from the query encoder, so swapped roles would show."""
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [x + 0.1 * rng.normal(size=x.shape).astype(np.float32)
                                   for x in leaves])


@pytest.mark.parametrize('symmetric', [False, True])
def test_loss_and_new_queue_match_reference(symmetric):
  """q = f_q(view 1), k = f_k(view 2) (both BN in training mode over the global batch); the
  loss uses the queue before this batch, which then takes the normalised view-2 keys at
  the pointer, wrapping around."""
  config = _config(symmetric=symmetric)
  method, params, stats, _, state = harness.init_method(config)
  target = _perturbed(params)
  state = dict(state, ptr=jnp.asarray(70, jnp.int32))
  views = harness.make_views(config, method, 32)
  loss, grads, metrics, _, new_state = harness.sharded_loss_and_grads(
      method, params, stats, target, state, views, 0)

  net = method.network()
  project = jax.jit(lambda p, x: net.apply({'params': p, 'batch_stats': stats}, x,
                                           train=True, mutable=['batch_stats'])[0][1])

  q1, k2 = np.asarray(project(params, views[0])), np.asarray(project(target, views[1]))
  queue = np.asarray(state['queue'])
  expected = _reference_moco_loss(q1, k2, queue, config.method.temperature)
  if symmetric:
    expected = (expected + _reference_moco_loss(project(params, views[1]),
                                                project(target, views[0]), queue,
                                                config.method.temperature)) / 2
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  # Rows 70..79 then 0..21 hold the 32 keys, in global batch order.
  expected_queue = queue.copy()
  expected_queue[(70 + np.arange(32)) % 80] = _normalize(k2)
  np.testing.assert_allclose(new_state['queue'], expected_queue, rtol=1e-5, atol=1e-5)
  assert int(new_state['ptr']) == (70 + 32) % 80
  # The metrics by hand: the mean positive cosine, and how often the positive key beats
  # every queued key (averaged over both directions when symmetric).
  pairs = [(q1, k2)] + ([(project(params, views[1]), project(target, views[0]))]
                        if symmetric else [])
  pos = [np.sum(_normalize(q) * _normalize(k), axis=1) for q, k in pairs]
  beats = [p > np.max(_normalize(q) @ queue.T, axis=1) for p, (q, _) in zip(pos, pairs)]
  np.testing.assert_allclose(metrics['pos_cosine'], np.mean(pos), rtol=1e-5)
  np.testing.assert_allclose(metrics['contrastive_acc'], np.mean(beats), rtol=1e-6)
  # Not vacuous: the query encoder gets a gradient.
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads)) > 0


@pytest.mark.slow  # `pytest -m slow`: the default checks the shuffled-BN variant below
def test_devices_agree_synchronised_bn():
  # The loss ignores `step` (m is constant and applied by the trainer), so one step suffices.
  harness.check_devices_agree(_config(), steps=(0,))


def test_devices_agree_shuffled_bn_symmetric():
  # 2 groups of 2 rows per block: each of the 8 devices holds one block of 4 rows.
  harness.check_devices_agree(
      _config(shuffle_bn_group_size=2, shuffle_bn_groups=2, symmetric=True), steps=(0,))


def test_shuffled_bn():
  """`apply_in_groups` on 16 rows: without shuffling, group g is rows 4g..4g+3 normalised on
  their own and the running statistics are the mean of the groups' updated ones; shuffling
  returns the rows in input order; a partial block is an error that names the fix."""
  config = _config()
  method, params, stats, _, _ = harness.init_method(config)
  net = method.network(None)
  images = jax.random.normal(jax.random.PRNGKey(3), (16, 12, 12, 1))

  def in_groups(group_size, groups_per_block, rng=None):
    return jax.jit(lambda x, r: apply_in_groups(net, params, stats, x, group_size,
                                                groups_per_block, r, None))(images, rng)

  apply = jax.jit(lambda x: net.apply({'params': params, 'batch_stats': stats}, x, train=True,
                                      mutable=['batch_stats']))
  per_group = [apply(images[i:i + 4]) for i in range(0, 16, 4)]
  (_, plain), new_stats = in_groups(4, 2)
  np.testing.assert_allclose(plain, np.concatenate([out[1] for out, _ in per_group]),
                             rtol=1e-5, atol=1e-6)
  expected_stats = jax.tree.map(lambda *s: np.mean(s, axis=0),
                                *[u['batch_stats'] for _, u in per_group])
  harness.assert_trees_close(new_stats, expected_stats, what='running stats')

  key = jax.random.PRNGKey(0)
  # Two groups per block: the shuffle regroups rows, so the statistics (and outputs) change.
  assert np.abs(np.asarray(in_groups(4, 2, key)[0][1]) - np.asarray(plain)).max() > 1e-3
  # One group per block: shuffling within it changes no statistics, so un-shuffling must
  # give back exactly the unshuffled rows.
  np.testing.assert_allclose(in_groups(4, 1, key)[0][1], in_groups(4, 1)[0][1], rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(ValueError, match='multiple of 24'):
    in_groups(4, 6)


def test_key_encoder_and_queue_through_the_trainer():
  config = _config(target_momentum=0.9)
  states, metrics = harness.trainer_steps(config, 3)
  # theta_k <- m theta_k + (1 - m) theta_q after each step (eq. 2), with the new theta_q.
  for before, after, m in zip(states, states[1:], metrics):
    np.testing.assert_allclose(m['target_momentum'], 0.9)
    expected = jax.tree.map(lambda k, q: 0.9 * np.float64(k) + 0.1 * np.float64(q),
                            before.target_params, after.params)
    harness.assert_trees_close(after.target_params, expected, rtol=1e-6, atol=1e-7,
                               what='key encoder')
  # Not vacuous: the key encoder moved, and lags the query encoder.
  first = jax.tree.leaves(states[0].target_params)[0]
  last = jax.tree.leaves(states[-1].target_params)[0]
  assert np.abs(last - first).max() > 0
  assert np.abs(last - jax.tree.leaves(states[-1].params)[0]).max() > 0
  # 3 batches of 32 into 80 rows: rows 0..79 rewritten, then 0..15 again; pointer at 16.
  queues = [np.asarray(s.method_state['queue']) for s in states]
  assert [int(s.method_state['ptr']) for s in states] == [0, 32, 64, 16]
  np.testing.assert_array_equal(queues[1][32:], queues[0][32:])
  np.testing.assert_array_equal(queues[2][:32], queues[1][:32])
  np.testing.assert_array_equal(queues[3][16:64], queues[2][16:64])
  for t, rows in ((1, slice(0, 32)), (2, slice(32, 64)), (3, slice(64, 80)),
                  (3, slice(0, 16))):
    assert np.abs(queues[t][rows] - queues[t - 1][rows]).min() > 0
    np.testing.assert_allclose(np.linalg.norm(queues[t][rows], axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize('field, value, message', [
    ('method.queue_size', 16, r'method.queue_size=16 is smaller than batch_size=32'),
    ('method.target_momentum', 1.5, r'method.target_momentum=1.5 must be in \[0, 1\]'),
    ('augment.num_local_crops', 2, r'set augment.num_local_crops = 0'),
    ('method.shuffle_bn_group_size', 3, r'batch_size a multiple of group size x groups = 24'),
])
def test_bad_config_names_the_fix(field, value, message):
  config = _config()
  config_lib.validate(config, 8)  # the unmodified config is valid
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config, 8)


def test_resumed_run_ends_with_identical_state(tmp_path):
  """The queue, its pointer and the key encoder survive a checkpoint exactly."""
  config = _config()
  first, resumed = harness.resumed_run_matches_straight_run(config, tmp_path)
  # Not vacuous: steps 3 and 4 changed the queue and the key encoder.
  assert int(first.method_state['ptr']) == 64 and int(resumed.method_state['ptr']) == 48
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first.target_params),
                                                      jax.tree.leaves(resumed.target_params)))


@pytest.mark.slow  # a real training run: `pytest -m slow` (README, Tests)
def test_short_training_learns(tmp_path):
  # The recipe's queue holds 16 batches; at batch 64 that is 1,024 entries.
  harness.check_short_lars_run_learns('moco_v2', str(tmp_path), queue_size=1024)
