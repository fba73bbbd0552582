"""The decoupled contrastive loss, DCL and DCLW (Yeh et al. 2022): hand-computed values,
lightly's DCLLoss / DCLWLoss on the same inputs, a float64 numpy reference of losses and
gradients (the vMF weights held constant), devices agreeing with the weights normalised over
the global batch, and config validation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import method_harness as mh
from ssl_jax import config_lib, parallel
from ssl_jax.losses.decoupled import decoupled_nt_xent, vmf_weights
from ssl_jax.losses.info_nce import nt_xent
from ssl_jax.methods import build_method


def _normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference_weights(z1, z2, sigma):
  """The paper's w_i = 2 - exp(s+_i / sigma) / mean_k exp(s+_k / sigma), float64."""
  e = np.exp(np.sum(_normalize(z1) * _normalize(z2), axis=1) / sigma)
  return 2.0 - e / e.mean()


def reference_loss(z1, z2, t, weighting='none', sigma=0.5, weights=None):
  """Yeh et al. 2022, eq. 6, written out in float64 with loops over the 2N queries: each
  query's positive is the other view of its image, its negatives the 2N - 2 other embeddings.
  `weights` replaces the vMF weights by constants (for finite differences: lightly detaches
  them, so the gradient holds them fixed)."""
  z1, z2 = _normalize(z1), _normalize(z2)
  n = len(z1)
  if weighting == 'vmf' and weights is None:
    weights = reference_weights(z1, z2, sigma)
  w = np.ones(n) if weighting == 'none' else np.asarray(weights, np.float64)
  out = np.concatenate([z1, z2])
  total = 0.0
  for q in range(2 * n):
    image, pos = q % n, (q + n) % (2 * n)
    negs = [out[q] @ out[j] / t for j in range(2 * n) if j not in (q, pos)]
    top = max(negs)
    total += -w[image] * (out[q] @ out[pos]) / t + top + math.log(
        sum(math.exp(s - top) for s in negs))
  return total / (2 * n)


def _pairs(n=6, d=5, seed=0):
  rng = np.random.default_rng(seed)
  z1 = rng.normal(size=(n, d))
  z2 = z1 + rng.normal(size=(n, d))  # unequal positive cosines, so the vMF weights differ
  return z1.astype(np.float32), z2.astype(np.float32)


def test_hand_computed_two_images():
  # Image 0: both views [1, 0] (s+ = 1); image 1: views [0, 1] and [1, 0] (s+ = 0). t = 1.
  # Negatives: view 1 of image 0 meets [0, 1] (cos 0) and [1, 0] (cos 1), view 2 likewise;
  # view 1 of image 1 meets [1, 0] twice (cos 0, 0); view 2 of image 1 meets [1, 0] twice
  # (cos 1, 1). DCL: 2 (-1 + log(1 + e)) + log 2 + log(2e), over 4 queries.
  z1 = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  z2 = jnp.array([[1.0, 0.0], [1.0, 0.0]])
  e = math.e
  dcl = (2 * (math.log(1 + e) - 1) + math.log(2) + math.log(2 * e)) / 4
  np.testing.assert_allclose(decoupled_nt_xent(z1, z2, 1.0)[0], dcl, rtol=1e-6)
  # NT-Xent keeps the positive in the denominator: log(e + 1 + e) - 1 for image 0's views.
  nt = (2 * (math.log(1 + 2 * e) - 1) + math.log(3) + math.log(1 + 2 * e)) / 4
  np.testing.assert_allclose(nt_xent(z1, z2, 1.0)[0], nt, rtol=1e-6)
  # DCLW with sigma = 1: w = 2 - 2 softmax(1, 0) = (2 / (1 + e), 2e / (1 + e)), mean 1; only
  # image 0's positive term (s+ = 1) is scaled, by w_0.
  w0 = 2 / (1 + e)
  np.testing.assert_allclose(vmf_weights(jnp.array([1.0, 0.0]), 1.0, None),
                             [w0, 2 * e / (1 + e)], rtol=1e-6)
  dclw = dcl + 2 * (1 - w0) / 4
  np.testing.assert_allclose(decoupled_nt_xent(z1, z2, 1.0, 'vmf', 1.0)[0], dclw, rtol=1e-6)


# lightly 1.6.0 (lightly/loss/dcl_loss.py, identical to the repository's master at e8d317f),
# torch 2.13.0, run once outside this project on these float64 inputs:
#   DCLLoss(temperature=t)(z1, z2) and DCLWLoss(temperature=t, sigma=0.5)(z1, z2), loss.backward()
LIGHTLY_Z1 = [[1.0, 0.5, -0.25], [-0.5, 1.5, 0.75], [0.25, -1.0, 2.0], [2.0, 0.0, -1.0]]
LIGHTLY_Z2 = [[0.75, 1.0, 0.0], [-1.0, 1.0, 1.25], [0.5, 0.25, 1.5], [1.0, -0.5, -2.0]]
# (weighting, temperature): (loss, gradient with respect to z1)
LIGHTLY = {
    ('none', 0.5): (0.39587087968922885, [
        [0.1066076731780194, -0.28935167164451836, -0.15227265057695924],
        [0.2260243238657166, 0.08354111017066455, -0.016399337764184757],
        [-0.0471426839818946, -0.026713591658262134, -0.007463960331394237],
        [0.09260617446432648, 0.15452693384400062, 0.185212348928653]]),
    ('none', 0.1): (-2.3218765053979147, [
        [0.6495807710243979, -2.1881515852851257, -1.7779800864726598],
        [1.1597218465897075, 0.5008530492233283, -0.22855820072018534],
        [-0.5742941494361679, -0.16812427343017153, -0.012275368035564838],
        [0.42552346771467664, 0.9649827409921967, 0.8510469354293534]]),
    ('vmf', 0.5): (0.40452953725522106, [
        [0.1014207449734774, -0.27592668099746853, -0.14617038210102748],
        [0.21741209181941543, 0.0762798164845675, -0.007618238422858109],
        [-0.05089336647550531, -0.03528196114797622, -0.011279309764549994],
        [0.09888701907358091, 0.15976097101837933, 0.19777403814716188]]),
    ('vmf', 0.1): (-2.278583217567954, [
        [0.623646130001688, -2.1210266320498765, -1.747468744093001],
        [1.1166606863582016, 0.46454658079284317, -0.18465270401355185],
        [-0.5930475619042211, -0.210966120878742, -0.0313521152013434],
        [0.4569276907609489, 0.9911529268640902, 0.9138553815218977]]),
}


@pytest.mark.parametrize('weighting, t', sorted(LIGHTLY))
def test_matches_lightly(weighting, t):
  expected_loss, expected_grad = LIGHTLY[weighting, t]
  with mh.float64_computation():
    z1, z2 = (jnp.asarray(z, jnp.float64) for z in (LIGHTLY_Z1, LIGHTLY_Z2))
    loss, grad = jax.jit(jax.value_and_grad(
        lambda a: decoupled_nt_xent(a, z2, t, weighting, 0.5)[0]))(z1)
    assert loss.dtype == jnp.float64
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-12)
  # The gradient pins what is differentiated: lightly's vMF weights are detached.
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-10, atol=1e-13)
  # ...and the float32 computation is as close as float32 allows.
  loss32 = decoupled_nt_xent(jnp.asarray(LIGHTLY_Z1), jnp.asarray(LIGHTLY_Z2), t, weighting,
                             0.5)[0]
  np.testing.assert_allclose(loss32, expected_loss, rtol=1e-5)


@pytest.mark.parametrize('weighting, t, sigma',
                         [('none', 0.5, 0.5), ('none', 0.1, 0.5), ('vmf', 0.5, 0.5),
                          ('vmf', 0.2, 0.25)])
def test_matches_reference(weighting, t, sigma):
  z1, z2 = _pairs()
  expected = reference_loss(z1, z2, t, weighting, sigma)
  loss, metrics = decoupled_nt_xent(jnp.asarray(z1), jnp.asarray(z2), t, weighting, sigma)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  # The metrics are NT-Xent's (the same pairs; only the loss differs).
  _, nt_metrics = nt_xent(jnp.asarray(z1), jnp.asarray(z2), t)
  for key in nt_metrics:
    np.testing.assert_allclose(metrics[key], nt_metrics[key], rtol=1e-6, err_msg=key)
  if weighting == 'vmf':
    weights = reference_weights(z1, z2, sigma)
    assert weights.min() < 0.8 and weights.max() > 1.2  # the weighting matters here
    assert abs(expected - reference_loss(z1, z2, t)) > 1e-3


@pytest.mark.parametrize('weighting', ['none', 'vmf'])
def test_gradient_matches_finite_differences(weighting):
  # Central differences of the float64 reference with the vMF weights held at their value
  # at z: no gradient flows through them (lightly detaches them).
  z1, z2 = _pairs(n=4, d=3, seed=2)
  t, sigma = 0.5, 0.5
  weights = reference_weights(z1, z2, sigma)
  analytic = jax.grad(lambda a, b: decoupled_nt_xent(a, b, t, weighting, sigma)[0],
                      argnums=(0, 1))(jnp.asarray(z1), jnp.asarray(z2))
  eps = 1e-5
  for which, analytic_z in enumerate(analytic):
    numeric = np.zeros(z1.shape)
    for idx in np.ndindex(z1.shape):
      d = np.zeros(z1.shape)
      d[idx] = eps
      plus = [z1, z2]
      minus = [z1, z2]
      plus[which] = plus[which] + d
      minus[which] = minus[which] - d
      numeric[idx] = (reference_loss(*plus, t, weighting, sigma, weights)
                      - reference_loss(*minus, t, weighting, sigma, weights)) / (2 * eps)
    np.testing.assert_allclose(analytic_z, numeric, rtol=2e-3, atol=2e-5)
    assert np.abs(numeric).max() > 1e-2


def test_eight_devices_equal_one_with_global_weights():
  # The vMF weights are a softmax over the global batch: normalised per device (lightly's
  # gather_distributed), 8 devices of 2 images each would give other weights.
  z1, z2 = (jnp.asarray(z) for z in _pairs(n=16, seed=3))
  axis = parallel.DATA_AXIS
  t, sigma = 0.2, 0.5
  sharded = jax.jit(jax.shard_map(
      lambda a, b: decoupled_nt_xent(a, b, t, 'vmf', sigma, axis), mesh=parallel.make_mesh(8),
      in_specs=(P(axis), P(axis)), out_specs=(P(), P())))
  (l8, m8), g8 = jax.value_and_grad(sharded, argnums=(0, 1), has_aux=True)(z1, z2)
  (l1, m1), g1 = jax.value_and_grad(
      lambda a, b: decoupled_nt_xent(a, b, t, 'vmf', sigma), argnums=(0, 1),
      has_aux=True)(z1, z2)
  np.testing.assert_allclose(l1, reference_loss(z1, z2, t, 'vmf', sigma), rtol=1e-5)
  np.testing.assert_allclose(l8, l1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g8, g1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), m8, m1)


def _config(weighted: bool):
  return mh.shrink(mh.load_config('simclr_decoupled', f'weighted={weighted}'))


def test_config_fields():
  dcl, dclw = (mh.load_config('simclr_decoupled', f'weighted={w}') for w in (False, True))
  assert (dcl.method.negatives, dcl.method.dcl_weighting) == ('decoupled', 'none')
  assert (dclw.method.dcl_weighting, dclw.method.dcl_sigma) == ('vmf', 0.5)
  # The paper's ImageNet recipe with a ResNet (SimCLR's at batch 256, 200 epochs).
  c = mh.load_config('simclr_decoupled', 'weighted=true,backbone=resnet50,'
                     'dataset=tfds:imagenet2012')
  assert (c.batch_size, c.num_epochs, c.method.temperature) == (256, 200.0, 0.1)
  assert (c.optimizer.name, c.optimizer.lr_scaling, c.optimizer.base_lr) == ('lars', 'sqrt',
                                                                             0.075)
  assert c.method.projector_hidden_dim == 2048 and c.method.dcl_weighting == 'vmf'
  # The loss the method builds from the config is the decoupled one.
  z1, z2 = (jnp.asarray(z) for z in _pairs())
  for config, weighting in ((dcl, 'none'), (dclw, 'vmf')):
    loss = build_method(config).contrastive_loss(z1, z2, None)[0]
    np.testing.assert_allclose(
        loss, reference_loss(z1, z2, config.method.temperature, weighting, 0.5), rtol=1e-5)


def test_devices_agree():
  # DCLW runs every line DCL does, and the weights' gather besides.
  mh.check_devices_agree(_config(weighted=True), num_devices=8, batch_size=32)


@pytest.mark.slow
def test_devices_agree_unweighted():
  mh.check_devices_agree(_config(weighted=False), num_devices=8, batch_size=32)


def _problems(config):
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(config, 8)
  return str(info.value)


def test_config_validation_names_the_fix():
  for weighted in (False, True):
    config_lib.validate(mh.load_config('simclr_decoupled', f'weighted={weighted}'), 8)
  c = mh.load_config('simclr_decoupled')
  c.method.dcl_weighting = 'vMF'
  assert "needs method.dcl_weighting in ('none', 'vmf')" in _problems(c)
  c = mh.load_config('simclr_decoupled', 'weighted=true')
  c.method.dcl_sigma = 0.0
  assert 'needs method.dcl_sigma > 0' in _problems(c)
  c = mh.load_config('simclr_decoupled')
  c.method.tau_plus = 0.1
  assert "method.tau_plus=0.1 would be ignored: set method.negatives='debiased'" in _problems(c)
  # The weighting on another estimator would be ignored.
  c = mh.load_config('simclr')
  c.method.dcl_weighting = 'vmf'
  assert "set method.negatives='decoupled' to use it" in _problems(c)
  with pytest.raises(config_lib.ConfigError, match='Unknown config argument'):
    mh.load_config('simclr_decoupled', 'weigthed=true')

