"""NNCLR: the nearest-neighbour loss by hand, the method's loss and new support set against a
numpy reference, devices agreeing, the support set through the trainer, config errors,
exact resume, and a short Fashion-MNIST run."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import method_harness as harness
from ssl_jax import config_lib
from ssl_jax.methods.nnclr import nnclr_loss


def _config():
  config = harness.shrink(harness.load_config('nnclr'))
  # 80 is not a multiple of the batch of 32, so a few steps wrap the support set around.
  config.method.queue_size = 80
  config.method.projector_hidden_dim = 32
  config.method.projector_output_dim = 16
  config.method.predictor_hidden_dim = 32
  return config


def _normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference_loss(z1, z2, p1, p2, support, temperature):
  """Dwibedi et al. 2021, eq. 2 with the predictor: NN(z, Q) by brute force, then InfoNCE
  of each neighbour against the other view's predictions, both directions averaged."""
  support = np.asarray(support, np.float64)

  def term(z, p):
    z, p = _normalize(z), _normalize(p)
    neighbours = np.stack([support[np.argmax([zi @ s for s in support])] for zi in z])
    logits = neighbours @ p.T / temperature
    top = logits.max(axis=1)
    lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
    return np.mean(lse - np.diag(logits))

  return (term(z1, p2) + term(z2, p1)) / 2


def test_hand_computed_loss_uses_the_support_set_neighbour():
  support = jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
  # Neighbours: z1 rows -> support 0 (cos 0.8) and 1 (cos 0.8); z2 rows -> support 0
  # (cos 0.6) and 2 (cos 1/sqrt(1.01); [-1, 0.1] is not unit, the loss normalises it).
  z1 = jnp.array([[0.8, 0.6], [-0.6, 0.8]])
  z2 = jnp.array([[0.6, -0.8], [-1.0, 0.1]])
  p1 = jnp.array([[0.0, 1.0], [1.0, 0.0]])
  p2 = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  loss, metrics = nnclr_loss(z1, z2, p1, p2, support, 1.0)
  # NN(z1) = (e_x, e_y) against p2 = (e_x, e_y): logits the identity, each row
  # log(e + 1) - 1. NN(z2) = (e_x, -e_x) against p1 = (e_y, e_x): row 0 has logits (0, 1)
  # and positive 0, row 1 logits (0, -1) and positive -1; both give log(1 + e).
  expected = ((math.log(1 + math.e) - 1) + math.log(1 + math.e)) / 2
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(metrics['nn_cosine'], (0.8 + 0.8 + 0.6 + 1 / math.sqrt(1.01)) / 4,
                             rtol=1e-6)
  np.testing.assert_allclose(metrics['contrastive_acc'], 0.5)
  # With z itself as the positive (SimCLR with a predictor) the loss would differ.
  plain = _reference_loss(z1, z2, p1, p2, np.concatenate([z1, z2]), 1.0)
  assert abs(plain - expected) > 0.1


def test_gradient_flows_through_predictions_only():
  rng = np.random.default_rng(0)
  z1, z2, p1, p2 = (jnp.asarray(a) for a in rng.normal(size=(4, 6, 5)).astype(np.float32))
  support = jnp.asarray(_normalize(rng.normal(size=(9, 5))).astype(np.float32))
  grads = jax.grad(lambda *a: nnclr_loss(*a, support, 0.1)[0], argnums=(0, 1, 2, 3))(
      z1, z2, p1, p2)
  # The neighbours are stored data picked by an argmax: no gradient reaches z.
  np.testing.assert_array_equal(grads[0], 0.0)
  np.testing.assert_array_equal(grads[1], 0.0)
  assert np.abs(grads[2]).max() > 1e-3 and np.abs(grads[3]).max() > 1e-3
  loss, _ = nnclr_loss(z1, z2, p1, p2, support, 0.1)
  np.testing.assert_allclose(loss, _reference_loss(z1, z2, p1, p2, support, 0.1), rtol=1e-5)


def test_loss_and_new_support_set_match_reference():
  """Both views through the network as one batch; the support set before this batch gives
  the neighbours, then takes the normalised view-1 projections at the pointer."""
  config = _config()
  method, params, stats, target, state = harness.init_method(config)
  state = dict(state, ptr=jnp.asarray(70, jnp.int32))
  views = harness.make_views(config, method, 32)
  loss, grads, metrics, _, new_state = harness.sharded_loss_and_grads(
      method, params, stats, target, state, views, 0)
  (z, p), _ = jax.jit(lambda x: method.network().apply(
      {'params': params, 'batch_stats': stats}, x, train=True, mutable=['batch_stats']))(
          jnp.concatenate(views))
  z, p = np.asarray(z), np.asarray(p)
  support = np.asarray(state['queue'])
  expected = _reference_loss(z[:32], z[32:], p[:32], p[32:], support,
                             config.method.temperature)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  expected_support = support.copy()
  expected_support[(70 + np.arange(32)) % 80] = _normalize(z[:32])
  np.testing.assert_allclose(new_state['queue'], expected_support, rtol=1e-5, atol=1e-5)
  assert int(new_state['ptr']) == (70 + 32) % 80
  # Each projection's cosine to its nearest support row, by brute force, over both views.
  zn = _normalize(z)
  np.testing.assert_allclose(metrics['nn_cosine'],
                             np.mean(np.max(zn @ np.asarray(support, np.float64).T, axis=1)),
                             rtol=1e-5)
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads)) > 0


def test_devices_agree():
  # The loss has no schedule (no `step` dependence): one step suffices.
  harness.check_devices_agree(_config(), steps=(0,))


def test_support_set_through_the_trainer():
  states, metrics = harness.trainer_steps(_config(), 3)
  assert states[0].target_params == {}  # no momentum network
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
  # From the second step the neighbours come from real projections, which lie much closer
  # to each other than the initial random directions in 16 dimensions do.
  assert metrics[1]['nn_cosine'] > metrics[0]['nn_cosine']


@pytest.mark.parametrize('field, value, message', [
    ('method.queue_size', 16, r'method.queue_size=16 is smaller than batch_size=32'),
    ('augment.num_local_crops', 2, r'set augment.num_local_crops = 0'),
    ('method.temperature', -0.1, r'method.temperature must be positive'),
])
def test_bad_config_names_the_fix(field, value, message):
  config = _config()
  config_lib.validate(config, 8)  # the unmodified config is valid
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config, 8)


@pytest.mark.slow  # `pytest -m slow`: the default suite resumes MoCo v2, AdCo, SwAV and the
# generic tests/test_resume.py through the same whole-TrainState checkpoint
def test_resumed_run_ends_with_identical_state(tmp_path):
  """The support set and its pointer survive a checkpoint exactly."""
  config = _config()
  first, resumed = harness.resumed_run_matches_straight_run(config, tmp_path)
  assert int(first.method_state['ptr']) == 64 and int(resumed.method_state['ptr']) == 48


@pytest.mark.slow  # a real training run: `pytest -m slow` (README, Tests)
def test_short_training_learns(tmp_path):
  # The recipe's support set holds 16 batches; at batch 64 that is 1,024 entries.
  harness.check_short_lars_run_learns('nnclr', str(tmp_path), queue_size=1024)
