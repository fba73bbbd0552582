"""AdCo (Hu et al. 2021): the contrastive loss against batch keys and a free bank, the bank's
adversarial update against the closed-form gradient of the authors' code, the bank fill
phase, the momentum encoder, devices, config validation, resume and a short training run."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from method_harness import (check_devices_agree, encoder_spread, init_method, load_config,
                            make_views, shrink, train_briefly)
from ssl_jax import config_lib, parallel, train
from ssl_jax.losses.info_nce import info_nce_with_negatives
from ssl_jax.methods import build_method


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_loss(q, k, bank, t):
  """Cross-entropy of each query against all keys (its own is the label) and the bank."""
  q, k, d = _unit(q), _unit(k), _unit(bank)
  logits = np.concatenate([q @ k.T, q @ d.T], axis=1) / t
  logits -= logits.max(axis=1, keepdims=True)
  log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  return -np.mean(np.diag(log_p[:, :len(k)]))


def reference_bank_gradient(q, k, bank, t):
  """d loss / d bank in the closed form of maple-research-lab/AdCo training/train.py
  (update_network; their g is its negative), for a bank stored as rows [K, d]."""
  q, k = _unit(q), _unit(k)
  w = np.asarray(bank, np.float64)
  w_norm = np.linalg.norm(w, axis=1, keepdims=True)
  d_norm = w / w_norm
  l_neg = q @ d_norm.T                                                  # [N, K]
  logits = np.concatenate([q @ k.T, l_neg], axis=1) / t
  logits -= logits.max(axis=1, keepdims=True)
  p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  p_qd = p[:, len(k):]
  g = p_qd.T @ q / len(q) - np.mean(p_qd * l_neg, axis=0)[:, None] * d_norm
  return g / w_norm / t


def test_info_nce_with_negatives_hand_computed():
  # t = 1; queries x and y, their keys x and y, one bank vector 2y (normalised to y).
  # Query x: logits (1 [its key], 0, 0 [bank]) -> log(e + 2) - 1.
  # Query y: logits (0, 1 [its key], 1 [bank]) -> log(1 + 2e) - 1.
  q = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  bank = jnp.array([[0.0, 2.0]])
  loss, metrics = info_nce_with_negatives(q, q, bank, 1.0)
  e = math.e
  np.testing.assert_allclose(loss, (math.log(e + 2) + math.log(1 + 2 * e) - 2) / 2, rtol=1e-6)
  np.testing.assert_allclose(metrics['bank_cosine'], 0.5, rtol=1e-6)
  np.testing.assert_allclose(metrics['pos_cosine'], 1.0, rtol=1e-6)


def _random_qkb(n=8, k_size=6, d=4, seed=0):
  rng = np.random.default_rng(seed)
  q = _unit(rng.normal(size=(n, d))).astype(np.float32)
  k = _unit(q + 0.5 * rng.normal(size=(n, d))).astype(np.float32)
  bank = (2.0 * rng.normal(size=(k_size, d))).astype(np.float32)  # not unit: norms matter
  return q, k, bank


def test_loss_and_bank_gradient_match_reference_on_eight_devices():
  q, k, bank = _random_qkb()
  t = 0.2
  axis = parallel.DATA_AXIS
  sharded = jax.jit(jax.shard_map(
      lambda a, b, w: info_nce_with_negatives(a, b, w, t, axis)[0],
      mesh=parallel.make_mesh(8), in_specs=(P(axis), P(axis), P()), out_specs=P()))
  for fn in (lambda a, b, w: info_nce_with_negatives(a, b, w, t)[0], sharded):
    loss, grad = jax.value_and_grad(fn, argnums=2)(q, k, bank)
    np.testing.assert_allclose(loss, reference_loss(q, k, bank, t), rtol=1e-5)
    np.testing.assert_allclose(grad, reference_bank_gradient(q, k, bank, t), rtol=1e-4,
                               atol=1e-6)
  assert np.abs(grad).max() > 1e-2


def _adco_config(bank_size, from_keys, batch_size=32):
  config = shrink(load_config('adco'), batch_size=batch_size)
  config.method.queue_size = bank_size
  config.method.init_bank_from_keys = from_keys
  return config


def _perturbed(tree, seed, scale=0.05):
  leaves, treedef = jax.tree.flatten(tree)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [x + scale * rng.normal(size=x.shape).astype(x.dtype)
                                      for x in leaves])


def test_bank_fill_then_adversarial_steps_on_eight_devices():
  """K = 40, global batch 16 over 8 devices. Steps 1-2 write 16 keys each and step 3 the
  first 8 of its 16, with no adversarial update; steps 4-5 are the bank's gradient ascent,
  v <- m v - dL/dW + wd W, W <- W - lr v, with dL/dW the authors' closed form averaged over
  the two symmetric query/key pairs at memory_temperature."""
  config = _adco_config(bank_size=40, from_keys=True, batch_size=16)
  m = config.method
  method, params, batch_stats, target, state = init_method(config)
  # A key encoder unlike the query encoder, so swapped networks would show.
  target = _perturbed(target, 3)
  axis = parallel.DATA_AXIS
  rng, step = jax.random.PRNGKey(1), jnp.zeros((), jnp.int32)
  loss_fn = jax.jit(jax.shard_map(
      lambda p, b, t, s, v: method.loss(p, b, t, s, v, rng, step, axis),
      mesh=parallel.make_mesh(8), in_specs=(P(), P(), P(), P(), P(axis)),
      out_specs=(P(), (P(), P(), P()))))

  @jax.jit
  def queries_and_keys(views):
    """Both networks' l2-normalised outputs on the two views, outside the loss."""
    out = []
    for p in (params, target):
      (_, z), _ = method.network().apply({'params': p, 'batch_stats': batch_stats},
                                         jnp.concatenate(views, axis=0), train=True,
                                         mutable=['batch_stats'])
      out.append(z / jnp.linalg.norm(z, axis=1, keepdims=True))
    return out

  n = 16
  expected = np.asarray(state['negatives']).copy()
  for i, (start, stop, used) in enumerate([(0, 16, 16), (16, 32, 16), (32, 40, 8)]):
    views = make_views(config, method, n, seed=10 + i)
    _, (metrics, _, state) = loss_fn(params, batch_stats, target, state, views)
    _, k = queries_and_keys(views)
    expected[start:stop] = k[n:n + used]  # the key encoder's view-2 outputs, in order
    np.testing.assert_allclose(state['negatives'], expected, atol=2e-6)
    np.testing.assert_array_equal(state['velocity'], 0.0)
    assert int(state['filled']) == stop
    np.testing.assert_allclose(metrics['bank_filled'], start / 40)

  for i in range(2):
    views = make_views(config, method, n, seed=20 + i)
    old = jax.device_get(state)
    _, (metrics, _, state) = loss_fn(params, batch_stats, target, state, views)
    q, k = (np.asarray(x, np.float64) for x in queries_and_keys(views))
    bank = np.asarray(old['negatives'], np.float64)
    pairs = [(q[:n], k[n:]), (q[n:], k[:n])]
    grad = np.mean([reference_bank_gradient(qi, ki, bank, m.memory_temperature)
                    for qi, ki in pairs], axis=0)
    expected_v = m.memory_momentum * old['velocity'] - grad + m.memory_weight_decay * bank
    expected_update = -m.memory_lr * expected_v
    update = np.asarray(state['negatives'], np.float64) - bank
    scale = np.abs(expected_update).max()
    assert scale > 1e-2  # the step moves the bank
    np.testing.assert_allclose(update, expected_update, atol=1e-3 * scale)
    np.testing.assert_allclose(state['velocity'], expected_v,
                               atol=1e-3 * np.abs(expected_v).max())
    assert int(state['filled']) == 40
    # The adversary's objective, the symmetric loss at memory_t, rises.
    memory_loss = np.mean([reference_loss(qi, ki, bank, m.memory_temperature)
                           for qi, ki in pairs])
    np.testing.assert_allclose(metrics['memory_loss'], memory_loss, rtol=1e-4)
    new_bank = np.asarray(state['negatives'], np.float64)
    assert np.mean([reference_loss(qi, ki, new_bank, m.memory_temperature)
                    for qi, ki in pairs]) > memory_loss
  # The second ascent step started from a non-zero velocity: the momentum term was used.
  assert np.abs(old['velocity']).max() > 1e-3


@pytest.mark.slow  # the default checks 8 devices' adversarial steps against the closed form
def test_devices_agree_with_adversarial_update():
  # A full bank from the start, so the step runs the bank's gradient ascent (the fill phase
  # is compared across devices in the test above).
  check_devices_agree(_adco_config(bank_size=64, from_keys=False), num_devices=8,
                      batch_size=32)


def _problems(config):
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(config, 8)
  return str(info.value)


def test_config_validation_names_the_fix():
  config_lib.validate(load_config('adco'), 8)
  config_lib.validate(load_config('adco', 'backbone=resnet50'), 8)
  for field, value, message in [
      ('memory_lr', 0.0, 'method.memory_lr=0.0 must be positive (3.0 in the paper)'),
      ('memory_temperature', -0.02, 'method.memory_temperature=-0.02 must be positive'),
      ('target_momentum', 1.5, 'method.target_momentum=1.5 must be in [0, 1]'),
      ('memory_momentum', 1.5, 'method.memory_momentum=1.5 must be in [0, 1)'),
      ('queue_size', 0, 'method.queue_size=0 must be positive'),
      ('memory_weight_decay', -1.0, 'method.memory_weight_decay=-1.0 must be >= 0')]:
    config = load_config('adco')
    config.method[field] = value
    assert message in _problems(config), field
  config = load_config('adco')
  config.augment.num_local_crops = 2
  assert 'set augment.num_local_crops = 0' in _problems(config)


STEPS = 100


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """One 100-step run, shared by the training and the resume tests (each run compiles the
  train step, which costs more than the steps)."""
  # A bank of 1024 fills in 16 of the 100 steps (the config's 4096 would take 64), so most
  # of the run trains against the adversarial bank.
  config = _adco_config(bank_size=1024, from_keys=True, batch_size=64)
  # 2000/500 rather than shrink's 500/100: a 100-image test split is too coarse to compare.
  config.eval.final_bank_size = 2000
  config.eval.final_test_size = 500
  state, results = train_briefly(config, str(tmp_path_factory.mktemp('straight')), STEPS)
  return config, jax.device_get(state), results


@pytest.mark.slow  # a real training run: `pytest -m slow` (README, Tests)
def test_short_training_beats_random_init(trained):
  config, state, results = trained
  assert results['knn_top1'] > results['knn_top1_random_init'], results
  assert encoder_spread(config, build_method(config), state) > 0.1


@pytest.mark.slow  # the default suite resumes MoCo v2's and SwAV's state (README, Tests)
def test_resume_and_momentum_encoder(trained, tmp_path):
  """A run stopped at step 99 and resumed ends with the straight run's state, bank, its
  velocity and fill counter included; the key encoder follows the paper's constant-momentum
  EMA of the query encoder, target_100 = m target_99 + (1 - m) params_100."""
  config, straight, _ = trained
  workdir = str(tmp_path)
  first, _ = train.train_and_evaluate(config, workdir, stop_at_step=STEPS - 1)
  first = jax.device_get(first)
  assert int(first.method_state['filled']) == 1024
  assert np.abs(first.method_state['velocity']).max() > 0  # the ascent's state is restored
  resumed, results = train.train_and_evaluate(config, workdir)
  # It restored the checkpoint of step 99 and trained only step 100 (a restore skipped
  # silently would train from scratch and end in the same state).
  assert results['restored_step'] == STEPS - 1 and results['steps_run'] == 1
  assert int(resumed.step) == int(straight.step) == STEPS
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed), straight)
  with pytest.raises(AssertionError):  # not vacuous: the last step changed the bank
    np.testing.assert_array_equal(first.method_state['negatives'],
                                  straight.method_state['negatives'])

  m = config.method.target_momentum
  method = build_method(config)
  for step in (0, 1, STEPS):
    assert float(method.target_momentum(jnp.asarray(step))) == pytest.approx(m)
  expected = jax.tree.map(lambda t, p: m * t + (1 - m) * p, first.target_params,
                          straight.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               straight.target_params, expected)
  assert not np.allclose(jax.tree.leaves(straight.target_params)[0],
                         jax.tree.leaves(straight.params)[0])
