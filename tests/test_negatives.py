"""Debiased (Chuang et al. 2020) and hard-negative (Robinson et al. 2021) contrastive losses:
hand-computed values, an independent numpy transcription of the authors' code (clamp
included), gradients, special cases, devices, config validation, and a short training run."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from method_harness import (check_devices_agree, encoder_spread, load_config, shrink,
                            train_briefly)
from ssl_jax import config_lib, parallel
from ssl_jax.losses.info_nce import nt_xent
from ssl_jax.losses.negatives import debiased_nt_xent
from ssl_jax.methods import build_method


def reference_loss(z1, z2, t, tau_plus, beta):
  """The loss of github.com/joshr17/HCL (and chingyaoc/DCL for beta = 0), transcribed to
  float64 numpy; also returns which queries the floor N e^{-1/t} clamps."""
  z1 = np.asarray(z1, np.float64)
  z2 = np.asarray(z2, np.float64)
  z1 = z1 / np.linalg.norm(z1, axis=1, keepdims=True)
  z2 = z2 / np.linalg.norm(z2, axis=1, keepdims=True)
  n = len(z1)
  out = np.concatenate([z1, z2])
  neg = np.exp(out @ out.T / t)
  mask = np.ones((2 * n, 2 * n), bool)
  for i in range(n):
    for row in (i, n + i):
      mask[row, i] = mask[row, n + i] = False
  neg = neg[mask].reshape(2 * n, -1)
  pos = np.exp(np.sum(z1 * z2, axis=1) / t)
  pos = np.concatenate([pos, pos])
  m = 2 * n - 2
  imp = np.exp(beta * np.log(neg))
  reweight_neg = (imp * neg).sum(axis=1) / imp.mean(axis=1)
  ng = (-tau_plus * m * pos + reweight_neg) / (1 - tau_plus)
  floor = m * np.exp(-1 / t)
  clamped = ng < floor
  ng = np.maximum(ng, floor)
  return np.mean(-np.log(pos / (pos + ng))), clamped


def _aligned_pairs(n=8, d=5, seed=1):
  # View 2 near view 1: large positives, so with tau_plus >= 0.1 the estimate of some rows
  # falls below the floor (counts asserted where used).
  rng = np.random.default_rng(seed)
  z1 = rng.normal(size=(n, d))
  z2 = z1 + rng.normal(size=(n, d))
  return z1.astype(np.float32), z2.astype(np.float32)


# (temperature, tau_plus, beta, how many of the 16 queries the floor clamps)
CASES = [(0.5, 0.1, 0.0, 1), (0.5, 0.3, 0.0, 11), (0.5, 0.3, 1.0, 5), (0.2, 0.1, 1.0, 5),
         (0.5, 0.1, 1.0, 0), (1.0, 0.0, 2.0, 0)]


def test_hand_computed_two_images():
  # test_info_nce's example: every query has its positive at cos 0 and two negatives, at
  # cos -1 and cos 0, so with t = 1: pos = 1, negatives (e^-1, 1), M = 2, floor = 2/e.
  z1 = jnp.array([[1.0, 0.0], [-1.0, 0.0]])
  z2 = jnp.array([[0.0, 1.0], [0.0, -1.0]])
  e = math.e

  def loss(tau_plus, beta):
    return float(debiased_nt_xent(z1, z2, 1.0, tau_plus, beta)[0])

  # Debiased, tau+ = 0.1: Ng = (1 + 1/e - 2 * 0.1 * 1) / 0.9 = 1.2977 > 2/e.
  np.testing.assert_allclose(loss(0.1, 0.0), math.log(1 + (1 + 1 / e - 0.2) / 0.9), rtol=1e-6)
  # Hard, beta = 1: weights proportional to (e^-1, 1), mean-normalised, so the reweighted sum
  # is (e^-1 * e^-1 + 1 * 1) / ((e^-1 + 1) / 2).
  reweighted = (e ** -2 + 1) / ((1 / e + 1) / 2)
  np.testing.assert_allclose(loss(0.1, 1.0), math.log(1 + (reweighted - 0.2) / 0.9),
                             rtol=1e-6)
  # tau+ = 0.6: (1 + 1/e - 1.2) / 0.4 = 0.42 < 2/e = 0.74, clamped. tau+ = 0.9: the
  # estimate is negative (more expected positives than the negatives' mass), clamped too.
  np.testing.assert_allclose(loss(0.6, 0.0), math.log(1 + 2 / e), rtol=1e-6)
  np.testing.assert_allclose(loss(0.9, 0.0), math.log(1 + 2 / e), rtol=1e-6)
  # With beta = 3 the reweighted mass, (e^-4 + 1) / ((e^-3 + 1) / 2) = 1.940, exceeds the
  # 2 * 0.9 expected positives: Ng = (1.940 - 1.8) / 0.1 = 1.40, not clamped.
  reweighted = (e ** -4 + 1) / ((e ** -3 + 1) / 2)
  np.testing.assert_allclose(loss(0.9, 3.0), math.log(1 + (reweighted - 1.8) / 0.1),
                             rtol=1e-5)
  # tau+ = 0, beta = 0: NT-Xent's log(2 + e^-1).
  np.testing.assert_allclose(loss(0.0, 0.0), math.log(2 + 1 / e), rtol=1e-6)


@pytest.mark.parametrize('t, tau_plus, beta, num_clamped', CASES)
def test_matches_reference_transcription(t, tau_plus, beta, num_clamped):
  z1, z2 = _aligned_pairs()
  expected, clamped = reference_loss(z1, z2, t, tau_plus, beta)
  assert clamped.sum() == num_clamped  # both branches of the floor are exercised
  loss, metrics = debiased_nt_xent(jnp.asarray(z1), jnp.asarray(z2), t, tau_plus, beta)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  _, nt_metrics = nt_xent(jnp.asarray(z1), jnp.asarray(z2), t)
  for key in nt_metrics:
    np.testing.assert_allclose(metrics[key], nt_metrics[key], rtol=1e-6, err_msg=key)


@pytest.mark.parametrize('t', [0.02, 0.01])
def test_low_temperature_does_not_overflow(t):
  # exp(1 / 0.01) = e^100 overflows float32 (max ~e^88.7): the log-space computation must
  # still agree with the float64 reference.
  z1, z2 = _aligned_pairs(seed=3)
  for tau_plus, beta in ((0.1, 0.0), (0.1, 1.0)):
    expected, _ = reference_loss(z1, z2, t, tau_plus, beta)
    loss, _ = debiased_nt_xent(jnp.asarray(z1), jnp.asarray(z2), t, tau_plus, beta)
    np.testing.assert_allclose(loss, expected, rtol=1e-4)
    grads = jax.grad(lambda a: debiased_nt_xent(a, jnp.asarray(z2), t, tau_plus, beta)[0])(
        jnp.asarray(z1))
    assert np.all(np.isfinite(grads))


# (temperature, tau_plus, beta, how many of the 8 queries of 4 images the floor clamps)
@pytest.mark.parametrize('t, tau_plus, beta, num_clamped',
                         [(0.5, 0.3, 0.0, 1), (0.5, 0.3, 1.0, 0), (0.2, 0.1, 1.0, 0)])
def test_gradient_matches_finite_differences(t, tau_plus, beta, num_clamped):
  # Gradients flow through the importance weights and the subtracted positives, not through
  # clamped rows (the authors' torch.clamp): central differences of the float64 reference.
  z1, z2 = _aligned_pairs(n=4, d=3, seed=1)
  assert reference_loss(z1, z2, t, tau_plus, beta)[1].sum() == num_clamped
  analytic = np.asarray(jax.grad(
      lambda a: debiased_nt_xent(a, jnp.asarray(z2), t, tau_plus, beta)[0])(jnp.asarray(z1)))
  eps = 1e-5
  numeric = np.zeros(z1.shape)
  for idx in np.ndindex(z1.shape):
    d = np.zeros(z1.shape)
    d[idx] = eps
    numeric[idx] = (reference_loss(z1 + d, z2, t, tau_plus, beta)[0]
                    - reference_loss(z1 - d, z2, t, tau_plus, beta)[0]) / (2 * eps)
  np.testing.assert_allclose(analytic, numeric, rtol=2e-3, atol=2e-5)
  assert np.abs(numeric).max() > 1e-2


def test_special_cases_reduce_to_simpler_losses():
  z1, z2 = (jnp.asarray(z) for z in _aligned_pairs(seed=5))

  def value_and_grads(fn):
    return jax.value_and_grad(lambda a, b: fn(a, b)[0], argnums=(0, 1))(z1, z2)

  # beta = 0 hard-negative loss is the debiased loss (through the method's config switch).
  configs = {}
  for name in ('simclr_debiased', 'simclr_hard_negatives'):
    configs[name] = load_config(name)
  configs['simclr_hard_negatives'].method.beta = 0.0
  hard0, debiased = (build_method(configs[name]).contrastive_loss
                     for name in ('simclr_hard_negatives', 'simclr_debiased'))
  (l_h, g_h), (l_d, g_d) = value_and_grads(lambda a, b: hard0(a, b, None)), value_and_grads(
      lambda a, b: debiased(a, b, None))
  np.testing.assert_allclose(l_h, l_d, rtol=1e-7)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), g_h, g_d)
  # tau+ = 0 and beta = 0 is NT-Xent, loss and gradients.
  t = configs['simclr_debiased'].method.temperature
  l_0, g_0 = value_and_grads(lambda a, b: debiased_nt_xent(a, b, t, 0.0, 0.0))
  l_nt, g_nt = value_and_grads(lambda a, b: nt_xent(a, b, t))
  np.testing.assert_allclose(l_0, l_nt, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_0, g_nt)
  # ...and the estimators do differ when switched on.
  assert abs(float(l_d) - float(l_nt)) > 1e-3
  beta1 = debiased_nt_xent(z1, z2, t, 0.1, 1.0)[0]
  assert abs(float(beta1) - float(l_d)) > 1e-3


@pytest.mark.parametrize('t, tau_plus, beta, num_clamped', CASES[1:3])
def test_eight_devices_equal_one_with_clamped_rows(t, tau_plus, beta, num_clamped):
  # Loss-level check with clamped rows, which random-init networks do not reach.
  del num_clamped
  z1, z2 = (jnp.asarray(z) for z in _aligned_pairs())
  axis = parallel.DATA_AXIS
  sharded = jax.jit(jax.shard_map(
      lambda a, b: debiased_nt_xent(a, b, t, tau_plus, beta, axis), mesh=parallel.make_mesh(8),
      in_specs=(P(axis), P(axis)), out_specs=(P(), P())))
  single = lambda a, b: debiased_nt_xent(a, b, t, tau_plus, beta)
  (l8, m8), g8 = jax.value_and_grad(lambda a, b: sharded(a, b), argnums=(0, 1),
                                    has_aux=True)(z1, z2)
  (l1, m1), g1 = jax.value_and_grad(single, argnums=(0, 1), has_aux=True)(z1, z2)
  np.testing.assert_allclose(l8, l1, rtol=1e-6)
  np.testing.assert_allclose(l1, reference_loss(z1, z2, t, tau_plus, beta)[0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g8, g1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), m8, m1)


def test_devices_agree():
  # The hard-negative config runs every line the debiased one does (which is its beta = 0,
  # test_special_cases_reduce_to_simpler_losses), so one network-level check covers both.
  check_devices_agree(shrink(load_config('simclr_hard_negatives')), num_devices=8,
                      batch_size=32)


def _problems(config):
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(config, 8)
  return str(info.value)


def test_config_validation_names_the_fix():
  for name in ('simclr_debiased', 'simclr_hard_negatives'):
    config_lib.validate(load_config(name), 8)  # the shipped configs are valid
  c = load_config('simclr_debiased')
  c.method.negatives = 'debaised'
  assert "use one of ('uniform', 'debiased', 'hard', 'decoupled')" in _problems(c)
  c = load_config('simclr_debiased')
  c.method.tau_plus = 1.0
  assert 'needs method.tau_plus in [0, 1)' in _problems(c)
  c = load_config('simclr_debiased')
  c.method.beta = 1.0
  assert "set method.negatives='hard'" in _problems(c)
  c = load_config('simclr_hard_negatives')
  c.method.beta = -0.5
  assert 'needs method.beta >= 0' in _problems(c)


@pytest.mark.slow  # a real training run: `pytest -m slow` (README, Tests)
@pytest.mark.parametrize('name', ['simclr_debiased', 'simclr_hard_negatives'])
def test_short_training_beats_random_init(name, tmp_path):
  config = shrink(load_config(name), batch_size=64)
  # 2000/500 rather than shrink's 500/100: a 100-image test split is too coarse to compare.
  config.eval.final_bank_size = 2000
  config.eval.final_test_size = 500
  state, results = train_briefly(config, str(tmp_path), steps=100)
  assert results['knn_top1'] > results['knn_top1_random_init'], results
  assert encoder_spread(config, build_method(config), state) > 0.1
