"""VICReg: the loss against a hand-computed value and independent numpy references (eq. 1-6
term by term, and a transcription of the authors' code, which averages the two views'
variance terms), global-batch statistics across 8 devices, config validation, and a short
Fashion-MNIST run that beats the random-init encoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import method_harness as harness
from ssl_jax import config_lib, parallel
from ssl_jax.losses.vicreg import vicreg_loss
from ssl_jax.methods import build_method


def reference_terms(z1, z2, eps=1e-4):
  """Eq. 1-5 in numpy (float64), per view: invariance as the reference code's F.mse_loss
  (mean over all N x D entries), std from the unbiased variance, covariance off-diagonal
  squared sum over D."""
  z1, z2 = np.asarray(z1, np.float64), np.asarray(z2, np.float64)
  n, d = z1.shape
  invariance = np.mean((z1 - z2) ** 2)
  variance, covariance = [], []
  for z in (z1, z2):
    std = np.sqrt(z.var(0, ddof=1) + eps)
    variance.append(np.mean(np.maximum(0.0, 1.0 - std)))
    cov = np.cov(z, rowvar=False)  # ddof 1
    covariance.append((np.sum(cov ** 2) - np.sum(np.diag(cov) ** 2)) / d)
  return invariance, variance, covariance


def reference_loss(z1, z2, lam=25.0, mu=25.0, nu=1.0, eps=1e-4):
  """Eq. 6 with the two views' variance terms averaged, as the authors' code:
  lambda s + mu [v(Z) + v(Z')] / 2 + nu [c(Z) + c(Z')]."""
  s, v, c = reference_terms(z1, z2, eps)
  return lam * s + mu * sum(v) / 2 + nu * sum(c)


def _off_diagonal(x):
  """The authors' off_diagonal: the flattened matrix without its diagonal."""
  n, m = x.shape
  assert n == m
  return x.flatten()[:-1].reshape(n - 1, n + 1)[:, 1:].flatten()


def authors_loss(x, y, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0):
  """VICReg.forward of facebookresearch/vicreg main_vicreg.py (after the projector and the
  all-gather), line by line in numpy float64; lightly's VICRegLoss computes the same."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  batch_size, num_features = x.shape
  repr_loss = np.mean((x - y) ** 2)                                    # F.mse_loss(x, y)
  x = x - x.mean(axis=0)
  y = y - y.mean(axis=0)
  std_x = np.sqrt(x.var(axis=0, ddof=1) + 0.0001)                      # torch.var: unbiased
  std_y = np.sqrt(y.var(axis=0, ddof=1) + 0.0001)
  std_loss = (np.mean(np.maximum(0.0, 1 - std_x)) / 2 +
              np.mean(np.maximum(0.0, 1 - std_y)) / 2)
  cov_x = (x.T @ x) / (batch_size - 1)
  cov_y = (y.T @ y) / (batch_size - 1)
  cov_loss = (np.sum(_off_diagonal(cov_x) ** 2) / num_features +
              np.sum(_off_diagonal(cov_y) ** 2) / num_features)
  return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss


def _loss(z1, z2, *args, **kwargs):
  loss, metrics = vicreg_loss(jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32),
                              *args, **kwargs)
  return float(loss), jax.device_get(metrics)


def test_hand_computed_example():
  # N = 4, D = 2. Z = [a, a] / 2, Z' = [a, -a] / 2 with a = (1, 1, -1, -1):
  #  invariance: Z - Z' = [0, a], 4 over N D = 8 entries -> 1/2;
  #  each dimension's unbiased variance is 1 / (N - 1) = 1/3, so (eps = 0) each view's
  #  hinge is 1 - 1/sqrt(3) (the biased variance would give 1/2), and their average too;
  #  off-diagonal covariance +-1/3 twice: (2/9) / D = 1/9 per view, summed over the views.
  a = np.array([1., 1., -1., -1.])
  z1 = np.stack([a, a], 1) / 2
  z2 = np.stack([a, -a], 1) / 2
  loss, metrics = _loss(z1, z2, 25.0, 25.0, 1.0, 0.0)
  hinge = 1 - 1 / np.sqrt(3)
  np.testing.assert_allclose(metrics['invariance_term'], 0.5, rtol=1e-6)
  np.testing.assert_allclose(metrics['variance_term'], hinge, rtol=1e-6)
  np.testing.assert_allclose(metrics['covariance_term'], 2 / 9, rtol=1e-6)
  np.testing.assert_allclose(metrics['embedding_std'], 1 / np.sqrt(3), rtol=1e-6)
  np.testing.assert_allclose(loss, 25 * 0.5 + 25 * hinge + 2 / 9, rtol=1e-6)


def test_well_spread_decorrelated_identical_views_cost_nothing():
  # Std above 1 in every dimension switches the hinge off; orthogonal columns, no covariance.
  a, b = np.array([2., 2., -2., -2.]), np.array([2., -2., 2., -2.])
  z = np.stack([a, b], 1) + 3.0
  loss, _ = _loss(z, z)
  assert loss == 0.0


def test_matches_numpy_reference():
  rng = np.random.default_rng(0)
  # Std around 0.5 so the hinge is active in most dimensions, above 1 in a few.
  scale = np.where(np.arange(7) < 5, 0.5, 1.5)
  z1 = rng.normal(size=(12, 7)) * scale + 2
  z2 = z1 + 0.3 * rng.normal(size=(12, 7))
  loss, metrics = _loss(z1, z2)
  s, v, c = reference_terms(z1, z2)
  np.testing.assert_allclose(loss, reference_loss(z1, z2), rtol=1e-5)
  np.testing.assert_allclose(metrics['invariance_term'], s, rtol=1e-5)
  np.testing.assert_allclose(metrics['variance_term'], sum(v) / 2, rtol=1e-5)
  np.testing.assert_allclose(metrics['covariance_term'], sum(c), rtol=1e-5)
  assert min(v) > 0 and min(c) > 0
  other, _ = _loss(z1, z2, 2.0, 3.0, 4.0, 1e-2)
  np.testing.assert_allclose(other, reference_loss(z1, z2, 2.0, 3.0, 4.0, 1e-2), rtol=1e-5)


def test_defaults_match_the_authors_code():
  """The config's 25/25/1 is the authors' sim_coeff/std_coeff/cov_coeff = 25/25/1: their
  std_loss averages the two views' hinges, and their covariance term sums the views'
  off-diagonal squares over D with the (N - 1) covariance. Eq. 6 as printed (the views'
  variance terms summed) would be variance_weight = 50."""
  rng = np.random.default_rng(4)
  # Some dimensions' std below 1 (hinge active), others above; correlated dimensions.
  mix = np.eye(6) + 0.3 * rng.normal(size=(6, 6))
  z1 = rng.normal(size=(10, 6)) @ mix * np.where(np.arange(6) < 4, 0.4, 1.6)
  z2 = z1 + 0.2 * rng.normal(size=(10, 6))
  expected = authors_loss(z1, z2)
  config = harness.load_config('vicreg')
  m = config.method
  loss, metrics = _loss(z1, z2, m.invariance_weight, m.variance_weight, m.covariance_weight,
                        m.variance_epsilon)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(loss, reference_loss(z1, z2), rtol=1e-5)
  # Each term on its own against the authors' code.
  np.testing.assert_allclose(metrics['invariance_term'], authors_loss(z1, z2, 1.0, 0.0, 0.0),
                             rtol=1e-5)
  np.testing.assert_allclose(metrics['variance_term'], authors_loss(z1, z2, 0.0, 1.0, 0.0),
                             rtol=1e-5)
  np.testing.assert_allclose(metrics['covariance_term'], authors_loss(z1, z2, 0.0, 0.0, 1.0),
                             rtol=1e-5)
  # Not vacuous: every term is active, and summing the variance terms would differ.
  assert min(metrics['variance_term'], metrics['covariance_term']) > 1e-3
  s, v, c = reference_terms(z1, z2)
  assert abs(25 * s + 25 * sum(v) + sum(c) - expected) > 1e-2 * expected


def test_gradient_matches_finite_differences_of_reference():
  rng = np.random.default_rng(1)
  z1 = rng.normal(size=(6, 4)) * 0.5
  z2 = rng.normal(size=(6, 4)) * 0.5
  analytic = np.asarray(jax.grad(lambda a: vicreg_loss(a, jnp.asarray(z2, jnp.float32))[0])(
      jnp.asarray(z1, jnp.float32)))
  numeric = np.zeros_like(z1)
  h = 1e-5
  for idx in np.ndindex(z1.shape):
    d = np.zeros_like(z1)
    d[idx] = h
    numeric[idx] = (reference_loss(z1 + d, z2) - reference_loss(z1 - d, z2)) / (2 * h)
  np.testing.assert_allclose(analytic, numeric, rtol=1e-3, atol=1e-3)


def test_collapsed_dimension_has_finite_gradient_that_spreads_it():
  """eps keeps d sqrt(Var)/dz finite at zero variance; the hinge then pushes the constant
  dimension's rows apart (the gradient is not zero)."""
  rng = np.random.default_rng(5)
  z1 = rng.normal(size=(8, 3))
  z1[:, 0] = 0.7
  z2 = z1.copy()
  grad = np.asarray(jax.grad(lambda a: vicreg_loss(a, jnp.asarray(z2, jnp.float32))[0])(
      jnp.asarray(z1, jnp.float32)))
  assert np.all(np.isfinite(grad))
  # At exactly zero variance the centred rows are 0, so the hinge's gradient is 0 there;
  # a tiny spread gets the eps-bounded push, d hinge / dz = -(z - mean) / ((N-1) std).
  z1[:, 0] += 1e-3 * rng.normal(size=8)
  grad = np.asarray(jax.grad(lambda a: vicreg_loss(a, jnp.asarray(z1, jnp.float32))[0])(
      jnp.asarray(z1, jnp.float32)))
  assert np.all(np.isfinite(grad))
  centred = z1[:, 0] - z1[:, 0].mean()
  # Gradient descent moves each row away from the mean: the gradient opposes the deviation.
  assert np.all(np.sign(grad[:, 0]) == -np.sign(centred))


def test_sharded_loss_uses_global_batch_statistics():
  """On 8 devices of 2 rows each, the loss and its gradient are those of the whole batch of
  16: means, the N - 1 variance and covariance, and the invariance mean are global."""
  rng = np.random.default_rng(2)
  z1 = rng.normal(size=(16, 5)) * 0.6 + 1
  z2 = z1 + 0.5 * rng.normal(size=(16, 5))
  mesh = parallel.make_mesh(8)
  axis = parallel.DATA_AXIS
  sharded = jax.shard_map(lambda a, b: vicreg_loss(a, b, axis_name=axis)[0], mesh=mesh,
                          in_specs=(P(axis), P(axis)), out_specs=P())
  single = lambda a, b: vicreg_loss(a, b)[0]
  args = (jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32))
  loss_8, grads_8 = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(*args)
  loss_1, grads_1 = jax.jit(jax.value_and_grad(single, argnums=(0, 1)))(*args)
  np.testing.assert_allclose(loss_8, reference_loss(z1, z2), rtol=1e-5)
  np.testing.assert_allclose(loss_1, reference_loss(z1, z2), rtol=1e-5)
  for g8, g1 in zip(grads_8, grads_1):
    np.testing.assert_allclose(g8, g1, rtol=1e-4, atol=1e-6)
  # Not vacuous: per-device statistics would give a very different loss.
  local = np.mean([reference_loss(z1[i:i + 2], z2[i:i + 2]) for i in range(0, 16, 2)])
  assert abs(local - float(loss_8)) > 1.0


def test_devices_agree():
  # No schedules or method state: one step value covers the method.
  config = harness.shrink(harness.load_config('vicreg'))
  _, _, _, target, state = harness.init_method(config)
  assert state == {} and target == {}
  harness.check_devices_agree(config, num_devices=8, batch_size=32, steps=(0,))


def test_config_recipes_and_validation():
  paper = harness.load_config('vicreg', 'backbone=resnet50,dataset=tfds:imagenet2012')
  m = paper.method
  assert (m.invariance_weight, m.variance_weight, m.covariance_weight,
          m.variance_epsilon) == (25.0, 25.0, 1.0, 1e-4)
  assert (m.projector_hidden_dim, m.projector_output_dim, m.projector_num_layers) == (
      8192, 8192, 3)
  assert (paper.batch_size, paper.optimizer.name, paper.optimizer.base_lr,
          paper.optimizer.weight_decay) == (2048, 'lars', 0.2, 1e-6)
  for devices in (1, 2, 4, 8):
    config_lib.validate(harness.load_config('vicreg'), num_devices=devices)
    config_lib.validate(paper, num_devices=devices)

  bad = harness.load_config('vicreg')
  bad.augment.num_local_crops = 2
  bad.method.variance_weight = -1.0
  bad.method.variance_epsilon = 0.0
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(bad, num_devices=1)
  message = str(info.value)
  assert 'augment.num_local_crops = 0' in message
  assert 'method.variance_weight must be >= 0' in message
  assert 'method.variance_epsilon must be positive' in message
  with pytest.raises(config_lib.ConfigError, match='batch_size must be >= 2'):
    config_lib.validate(harness.load_config('vicreg', 'batch=1'), num_devices=1)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  config = harness.shrink(harness.load_config('vicreg'), batch_size=64)
  config.eval.final_bank_size = 2000
  config.eval.final_test_size = 500
  config.eval.diagnostics = config.eval.plots = False  # not what this test checks
  # The recipe's one-epoch warm-up would cover the whole short run, its rate mostly near 0,
  # and LARS moves each weight by only lr x 0.001 of its norm per step: a 19-step warm-up to
  # 5 times the rate gives 150 steps a measurable effect. (Measured, kNN: 0.610 against 0.564
  # at random init; 0.584 with the recipe's rate, 0.580 after 200 steps with both defaults.)
  config.optimizer.warmup_epochs = 0.02
  config.optimizer.base_lr = 1.0
  state, results = harness.train_briefly(config, str(tmp_path_factory.mktemp('vicreg')), 150)
  return config, state, results


@pytest.mark.slow  # a real training run: `pytest -m slow` (README, Tests)
def test_short_training_beats_random_init_without_collapse(trained):
  config, state, results = trained
  spread = harness.encoder_spread(config, build_method(config), state)
  assert spread > 0.1, spread
  assert results['knn_top1'] > results['knn_top1_random_init'], results
