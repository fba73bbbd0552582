"""MoCo v3: ctr(q, k) by hand, the symmetric 2-tau-scaled loss against a numpy reference,
devices agreeing, the cosine momentum schedule and the momentum encoder through the
trainer, config errors, exact resume, and a short Fashion-MNIST run."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import method_harness as harness
from ssl_jax import config_lib
from ssl_jax.losses.moco import batch_info_nce
from ssl_jax.methods import RunLength, build_method


def _config():
  config = harness.shrink(harness.load_config('moco_v3'))
  config.method.projector_hidden_dim = config.method.predictor_hidden_dim = 32
  config.method.projector_output_dim = 16
  return config


def _normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference_ctr(q, k, temperature):
  """Algorithm 1's ctr: cross-entropy of q against all keys (positive: same index), x 2 tau."""
  logits = _normalize(q) @ _normalize(k).T / temperature
  top = logits.max(axis=1)
  lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
  return np.mean(lse - np.diag(logits)) * 2 * temperature


def test_batch_info_nce_hand_computed():
  # Query 0 meets its key at cos 1 and the other key at cos 1/sqrt(2); query 1 its key at
  # cos 1/sqrt(2) and the other at cos 0. tau = 1.
  q = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  k = jnp.array([[1.0, 0.0], [1.0, 1.0]])
  loss, metrics = batch_info_nce(q, k, 1.0)
  c = 1 / math.sqrt(2)
  loss_0 = math.log(math.e + math.exp(c)) - 1.0
  loss_1 = math.log(1.0 + math.exp(c)) - c
  np.testing.assert_allclose(loss, (loss_0 + loss_1) / 2, rtol=1e-6)
  np.testing.assert_allclose(metrics['pos_cosine'], (1 + c) / 2, rtol=1e-6)
  np.testing.assert_allclose(metrics['neg_cosine'], c / 2, rtol=1e-6)
  np.testing.assert_allclose(metrics['contrastive_acc'], 1.0)


def _perturbed(params, seed=5):
  """A momentum encoder that differs from the online one, so swapped roles would show."""
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [x + 0.1 * rng.normal(size=x.shape).astype(np.float32)
                                   for x in leaves])


def test_loss_matches_reference():
  """ctr(q1, k2) + ctr(q2, k1), q the online predictions, k the momentum projections, each
  view through the networks on its own (BN statistics per view)."""
  config = _config()
  method, params, stats, _, state = harness.init_method(config)
  target = _perturbed(params)
  views = harness.make_views(config, method, 32)
  loss, grads, _, _, new_state = harness.sharded_loss_and_grads(
      method, params, stats, target, state, views, 0)

  online, momentum = method.network(), method.target_network()
  momentum_params = {k: target[k] for k in ('encoder', 'projector')}
  momentum_stats = {k: stats[k] for k in ('encoder', 'projector')}
  predict = jax.jit(lambda x: online.apply({'params': params, 'batch_stats': stats}, x,
                                           train=True, mutable=['batch_stats'])[0][1])
  project = jax.jit(lambda x: momentum.apply(
      {'params': momentum_params, 'batch_stats': momentum_stats}, x, train=True,
      mutable=['batch_stats'])[0][1])
  q1, q2 = (predict(v) for v in views)
  k1, k2 = (project(v) for v in views)
  tau = config.method.temperature
  assert tau != 0.5  # so that a missing 2 tau factor would show
  expected = _reference_ctr(q1, k2, tau) + _reference_ctr(q2, k1, tau)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert new_state == {}
  # The predictor is trained; the online network's own gradient is not zero.
  assert np.abs(np.asarray(grads['predictor']['Dense_0']['kernel'])).max() > 0


def test_devices_agree():
  # The loss ignores `step` (the momentum schedule is the trainer's): one step suffices.
  harness.check_devices_agree(_config(), steps=(0,))


def test_momentum_schedule_is_the_papers_cosine():
  config = _config()
  method = build_method(config, RunLength(total_steps=1000, steps_per_epoch=10))
  for k in (0, 1, 250, 500, 999, 1000):
    expected = 1 - (1 - 0.99) * (math.cos(math.pi * k / 1000) + 1) / 2
    np.testing.assert_allclose(method.target_momentum(k), expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(method.target_momentum(0), 0.99, rtol=1e-7)
  np.testing.assert_allclose(method.target_momentum(500), 0.995, rtol=1e-7)
  np.testing.assert_allclose(method.target_momentum(1000), 1.0, rtol=1e-7)


@pytest.mark.slow  # `pytest -m slow`: BYOL's and DINO's targets are checked so by default
def test_momentum_encoder_through_the_trainer():
  config = _config()
  config.total_steps = 4  # m over the run: 0.99, 0.99146, 0.995, 0.99854, (1 at step 4)
  states, metrics = harness.trainer_steps(config, 3)
  for k, (before, after, m) in enumerate(zip(states, states[1:], metrics)):
    tau = 1 - 0.01 * (math.cos(math.pi * k / 4) + 1) / 2
    np.testing.assert_allclose(m['target_momentum'], tau, rtol=1e-6)
    # The momentum encoder is backbone + projector: no copy of the predictor.
    assert set(after.target_params) == {'encoder', 'projector'}
    online = {k: after.params[k] for k in ('encoder', 'projector')}
    expected = jax.tree.map(lambda t, o: tau * np.float64(t) + (1 - tau) * np.float64(o),
                            before.target_params, online)
    harness.assert_trees_close(after.target_params, expected, rtol=1e-6, atol=1e-7,
                               what=f'momentum encoder, step {k}')
  # Not vacuous: the momentum encoder moved, and lags the online one.
  first = jax.tree.leaves(states[0].target_params['encoder'])[0]
  last = jax.tree.leaves(states[-1].target_params['encoder'])[0]
  assert np.abs(last - first).max() > 0
  assert np.abs(last - jax.tree.leaves(states[-1].params['encoder'])[0]).max() > 0
  assert states[-1].method_state == {}


@pytest.mark.parametrize('field, value, message', [
    ('method.target_momentum', 1.5, r'method.target_momentum=1.5 must be in \[0, 1\]'),
    ('augment.num_local_crops', 2, r'set augment.num_local_crops = 0'),
    ('method.temperature', 0.0, r'method.temperature must be positive'),
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
  """The momentum encoder, whose schedule depends on the step, survives a checkpoint."""
  config = _config()
  first, resumed = harness.resumed_run_matches_straight_run(config, tmp_path)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first.target_params),
                                                      jax.tree.leaves(resumed.target_params)))


@pytest.mark.slow  # a real training run: `pytest -m slow` (README, Tests)
def test_short_training_learns(tmp_path):
  harness.check_short_lars_run_learns('moco_v3', str(tmp_path))
