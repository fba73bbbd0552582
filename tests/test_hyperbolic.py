"""Hyperbolic contrastive learning: the Poincaré-ball operations against hand-computed values,
the loss and its gradient against a float64 numpy reference, finiteness at the clip radius
and at the ball's edge, 8 devices against 1 and float64, and the config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import method_harness as mh
from ssl_jax import config_lib
from ssl_jax.losses import hyperbolic as hyp
from ssl_jax.methods import method_class

C = 0.1
T = 0.2
R = 2.3


def _random(shape, seed=0, scale=1.0):
  return scale * np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize('c', [1.0, C])
def test_distance_to_origin_is_twice_artanh_of_the_scaled_norm(c):
  """d_c(0, y) = 2 / sqrt(c) artanh(sqrt(c) ||y||); with c = 1, 2 artanh(||y||)."""
  y = np.array([[0.3, -0.4], [0.0, 0.9 / c ** 0.5], [0.1, 0.0]], np.float32)
  norms = np.linalg.norm(y, axis=1)
  expected = 2 / c ** 0.5 * np.arctanh(c ** 0.5 * norms)
  if c == 1.0:
    np.testing.assert_allclose(expected[0], 2 * np.arctanh(0.5))
  np.testing.assert_allclose(hyp.distance_to_origin(y, c), expected, rtol=1e-6)
  # Through the Möbius sum, whose denominator has hyptorch's + 1e-5: a relative bias of
  # 1e-5 in ||(-x) (+) y||, 3e-5 after artanh at sqrt(c) ||y|| = 0.9.
  np.testing.assert_allclose(hyp.poincare_distance(np.zeros_like(y), y, c), expected, rtol=5e-5)
  # Symmetric, and 0 from a point to itself.
  np.testing.assert_allclose(hyp.poincare_distance(y, np.zeros_like(y), c), expected, rtol=5e-5)
  np.testing.assert_allclose(hyp.poincare_distance(y, y, c), 0.0, atol=1e-3)


def test_expmap0_norm_is_tanh_of_the_scaled_norm():
  """||exp_0(v)|| = tanh(sqrt(c) ||v||) / sqrt(c), in v's direction; 0 maps to 0."""
  v = _random((5, 4), scale=3.0)
  v[0] = 0.0
  out = np.asarray(hyp.expmap0(v, C))
  norms = np.linalg.norm(v, axis=1)
  np.testing.assert_allclose(np.linalg.norm(out, axis=1),
                             np.tanh(C ** 0.5 * norms) / C ** 0.5, rtol=1e-6)
  np.testing.assert_allclose(out[1:] / np.linalg.norm(out[1:], axis=1, keepdims=True),
                             v[1:] / norms[1:, None], rtol=1e-5)
  np.testing.assert_array_equal(out[0], 0.0)


def test_mobius_addition_identities():
  """0 (+) y = y, y (+) 0 = y, (-x) (+) x = 0, left cancellation (-x) (+) (x (+) y) = y, and
  in one dimension x (+) y = (x + y) / (1 + c x y), the relativistic velocity addition."""
  x = _random((6, 3), seed=1, scale=0.8)
  y = _random((6, 3), seed=2, scale=0.8)
  zero = np.zeros_like(x)
  np.testing.assert_allclose(hyp.mobius_add(zero, y, C), y, rtol=2e-5)
  np.testing.assert_allclose(hyp.mobius_add(y, zero, C), y, rtol=2e-5)
  np.testing.assert_allclose(hyp.mobius_add(-x, x, C), 0.0, atol=1e-6)
  np.testing.assert_allclose(hyp.mobius_add(-x, hyp.mobius_add(x, y, C), C), y,
                             rtol=1e-4, atol=1e-5)
  # In 1-D the numerator is (a + b)(1 + cab) and the denominator (1 + cab)^2 (+ 1e-5).
  a, b = 1.5, -2.0
  np.testing.assert_allclose(hyp.mobius_add(np.array([[a]]), np.array([[b]]), C)[0, 0],
                             (a + b) * (1 + C * a * b) / ((1 + C * a * b) ** 2 + 1e-5),
                             rtol=1e-6)


def test_pairwise_distance_closed_form_equals_the_mobius_form():
  """The loss's Gram-matrix distances equal d_c through the explicit Möbius sums, for points
  spread over the ball, close pairs (a positive) and a point with itself (0)."""
  x = np.asarray(hyp.to_poincare(_random((7, 5), seed=9, scale=1.0), C, R))
  y = np.concatenate([x[:3] + 1e-3 * _random((3, 5), seed=10), x[3:5],
                      np.asarray(hyp.expmap0(_random((4, 5), seed=11, scale=4.0), C))])
  explicit = hyp.poincare_distance(x[:, None, :], y[None, :, :], C)
  # To 1e-4 relative, or ~1e-3 absolute for close pairs (cancellation in ||x - y||^2 from
  # the Gram matrix; the loss computes its positives from the Möbius sums).
  np.testing.assert_allclose(hyp.pairwise_poincare_distance(x, y, C), explicit,
                             rtol=1e-4, atol=2e-3)
  assert np.all(np.asarray(explicit)[:3, :3].diagonal() < 0.01)
  np.testing.assert_allclose(np.asarray(explicit).diagonal()[3:5], 0.0, atol=2e-3)
  assert np.asarray(explicit).max() > 5  # far pairs too


def test_clipping_bounds_norms_at_the_radius_and_keeps_short_vectors():
  """x min(1, r / ||x||): norms above r become r (up to the 1e-5 in the denominator), in
  the same direction; shorter vectors are unchanged."""
  x = _random((8, 5), seed=3, scale=1.0)
  norms = np.linalg.norm(x, axis=1)
  assert (norms > R).any() and (norms < R).any()
  out = np.asarray(hyp.clip_features(x, R))
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), np.minimum(norms, R), rtol=1e-5)
  np.testing.assert_allclose(out[norms < R], x[norms < R], rtol=1e-5)


def test_projection_keeps_points_strictly_inside_the_ball():
  """Points beyond (1 - 1e-3) / sqrt(c) are pulled back to that norm; others unchanged."""
  x = _random((6, 3), seed=4, scale=1.5)
  max_norm = (1 - hyp.BALL_EPS) / C ** 0.5
  norms = np.linalg.norm(x, axis=1)
  assert (norms > max_norm).any() and (norms < max_norm).any()
  out = np.asarray(hyp.project(x, C))
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), np.minimum(norms, max_norm),
                             rtol=1e-6)


# --- float64 numpy reference of the whole loss ---

def _reference_loss(z1, z2, c=C, temperature=T, radius=R):
  """The loss and metrics in float64 numpy, written from the formulas (Ermolov et al.'s
  train.py `contrastive_loss` with hyptorch's constants), one device, all 2N queries."""
  def to_ball(x):
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    x = x * np.minimum(1.0, radius / (norm + 1e-5))
    norm = np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-5)
    x = np.tanh(np.sqrt(c) * norm) * x / (np.sqrt(c) * norm)
    norm = np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-5)
    max_norm = (1 - 1e-3) / np.sqrt(c)
    return np.where(norm > max_norm, x / norm * max_norm, x)

  def dist(x, y):
    u, v = -x[:, None, :], y[None, :, :]
    uv, u2, v2 = (u * v).sum(-1)[..., None], (u * u).sum(-1)[..., None], (v * v).sum(-1)[..., None]
    num = (1 + 2 * c * uv + c * v2) * u + (1 - c * u2) * v
    den = 1 + 2 * c * uv + c ** 2 * u2 * v2
    arg = np.sqrt(c) * np.linalg.norm(num / (den + 1e-5), axis=-1)
    return 2 / np.sqrt(c) * np.arctanh(np.clip(arg, 0, 1 - 1e-5))

  n = len(z1)
  p = to_ball(np.concatenate([z1, z2]).astype(np.float64))
  d = dist(p, p)
  logits = -d / temperature
  np.fill_diagonal(logits, -np.inf)
  positive = np.concatenate([np.arange(n, 2 * n), np.arange(n)])
  rows = np.arange(2 * n)
  log_softmax = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1,
                                keepdims=True)) - logits.max(1, keepdims=True)
  loss = -log_softmax[rows, positive].mean()
  origin = 2 / np.sqrt(c) * np.arctanh(np.sqrt(c) * np.linalg.norm(p, axis=1))
  neg = np.ones_like(d, bool)
  neg[rows, rows] = neg[rows, positive] = False
  metrics = {'contrastive_acc': (logits.argmax(1) == positive).mean(),
             'pos_distance': d[rows, positive].mean(), 'neg_distance': d[neg].mean(),
             'origin_distance_mean': origin.mean(), 'origin_distance_std': origin.std(),
             'origin_distance_min': origin.min(), 'origin_distance_max': origin.max(),
             'norm_fraction_max': np.sqrt(c) * np.linalg.norm(p, axis=1).max()}
  return loss, metrics


def _loss_and_grads(z1, z2, radius=R):
  (loss, metrics), grads = jax.jit(jax.value_and_grad(
      lambda a, b: hyp.hyperbolic_nt_xent(a, b, C, T, radius), argnums=(0, 1),
      has_aux=True))(z1, z2)
  return loss, metrics, grads


def _numeric_gradient(f, x, h=1e-6):
  grad = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[i] += h
    down[i] -= h
    grad[i] = (f(up) - f(down)) / (2 * h)
  return grad


@pytest.mark.parametrize('view_noise', [0.5, 1e-3])
def test_loss_and_gradient_match_a_float64_numpy_reference(view_noise):
  """Loss, metrics and d loss / d (z1, z2) of the float32 JAX loss equal the float64 numpy
  formulas (gradient by central differences); norms straddle the clip radius, so both
  branches of the clipping are exercised. With views 1e-3 apart, positives are close, where
  distances from the Gram matrix alone would be off by a sizeable fraction."""
  n, d = 6, 4
  z1 = _random((n, d), seed=5, scale=1.2)
  z2 = z1 + _random((n, d), seed=6, scale=view_noise)
  norms = np.linalg.norm(np.concatenate([z1, z2]), axis=1)
  assert (norms > R).any() and (norms < R).any()
  loss, metrics, grads = _loss_and_grads(z1, z2)
  ref_loss, ref_metrics = _reference_loss(z1, z2)
  # Close views make the loss small (~1e-6): logsumexp - positive logit then cancels to an
  # absolute float32 error of u x |logits|, whatever the distances' accuracy.
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-7)
  for name, value in ref_metrics.items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
  if view_noise < 0.1:
    return  # the gradient of a ~1e-6 loss is at the finite differences' noise
  z64 = np.concatenate([z1, z2]).astype(np.float64)
  ref_grad = _numeric_gradient(lambda z: _reference_loss(z[:n], z[n:])[0], z64)
  np.testing.assert_allclose(np.concatenate(grads), ref_grad, rtol=1e-3, atol=1e-5)
  assert np.abs(ref_grad).max() > 1e-2  # not vacuous




def _assert_finite(*trees):
  for leaf in jax.tree.leaves(trees):
    assert np.isfinite(np.asarray(leaf)).all(), leaf


def test_loss_is_finite_at_the_clip_radius_and_beyond():
  """Embeddings of norm exactly r, far beyond it (1e6), zero, and identical across views
  (a positive at distance 0): finite loss and gradients; clipped points sit at
  tanh(sqrt(c) r) / sqrt(c) from the origin, well inside the ball."""
  d = 8
  direction = _random((4, d), seed=7)
  direction /= np.linalg.norm(direction, axis=1, keepdims=True)
  z1 = np.concatenate([R * direction, 1e6 * direction[:2], np.zeros((1, d), np.float32)])
  z2 = z1.copy()
  loss, metrics, grads = _loss_and_grads(z1, z2)
  _assert_finite(loss, metrics, grads)
  np.testing.assert_allclose(metrics['norm_fraction_max'], np.tanh(C ** 0.5 * R), rtol=1e-5)


def test_distance_and_loss_are_finite_within_1e5_of_the_ball_edge():
  """Points with sqrt(c) ||x|| = 1 - 1e-5 (closer to the edge than the projection allows):
  distances between them, to themselves and to their antipodes, and a contrastive loss on
  their distances, are finite with finite gradients; far pairs are clamped at
  2 / sqrt(c) artanh(1 - 1e-5)."""
  direction = _random((4, 6), seed=8)
  direction /= np.linalg.norm(direction, axis=1, keepdims=True)
  edge = (1 - 1e-5) / C ** 0.5 * direction
  points = np.concatenate([edge, -edge]).astype(np.float32)

  def loss(x):
    dist = hyp.poincare_distance(x[:, None, :], x[None, :, :], C)
    logits = -dist / T
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits)), dist

  (value, dist), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(points)
  _assert_finite(value, dist, grad)
  limit = 2 / C ** 0.5 * np.arctanh(np.float32(hyp.ARTANH_LIMIT))
  np.testing.assert_allclose(dist[0, 4], limit, rtol=1e-4)  # antipodes
  assert np.all(np.asarray(dist) <= limit * (1 + 1e-5))
  # The full loss on points mapped next to the edge (huge pre-clipping norms, no clipping).
  z = 1e4 * direction.astype(np.float32)
  value, _, grads = _loss_and_grads(z, z[::-1].copy(), radius=1e9)
  _assert_finite(value, grads)


def test_eight_devices_agree_with_one_and_with_float64():
  """Loss, gradients, metrics and BN statistics on 8 devices and on 1 equal the float64
  computation of the same global batch (the shrunk ConvNet with the method's loss values)."""
  ref = mh.check_devices_agree(mh.shrink(mh.load_config('hyperbolic', 'backbone=convnet')))
  assert 0 < float(ref[2]['norm_fraction_max']) < 1


@pytest.mark.slow
def test_eight_devices_agree_with_a_vit():
  """The same with the default backbone's kind, a (tiny) ViT: drop-path off, mean-pooled."""
  with mh.tiny_vit_registered():
    mh.check_devices_agree(mh.tiny_vit_config('hyperbolic'))


@pytest.mark.parametrize('field, value', [('curvature', 0.0), ('curvature', -0.1),
                                          ('clip_radius', 0.0), ('temperature', 0.0),
                                          ('temperature', -1.0)])
def test_config_errors_name_the_fix(field, value):
  config = mh.load_config('hyperbolic')
  config_lib.validate(config, num_devices=1)
  config.method[field] = value
  problems = method_class('hyperbolic').config_problems(config)
  assert len(problems) == 1 and f'method.{field}={value}' in problems[0], problems
  assert 'must be > 0' in problems[0]
  with pytest.raises(config_lib.ConfigError, match=f'method.{field}'):
    config_lib.validate(config, num_devices=1)


def test_config_defaults_to_vit_micro_and_accepts_other_backbones():
  """The CPU default is the small-image ViT recipe with the paper's loss values; other
  backbones are accepted; a real-data ViT takes the paper's batch, head and weight decay."""
  config = mh.load_config('hyperbolic')
  assert config.model.name == 'vit_micro' and config.optimizer.name == 'adamw'
  assert (config.method.curvature, config.method.temperature,
          config.method.clip_radius) == (0.1, 0.2, 2.3)
  assert mh.load_config('hyperbolic', 'backbone=convnet').model.name == 'convnet'
  paper = mh.load_config('hyperbolic', 'backbone=vit_small,dataset=tfds:imagenet2012')
  assert (paper.batch_size, paper.method.projector_num_layers, paper.model.patch_size,
          paper.optimizer.weight_decay) == (896, 1, 16, 0.01)
  np.testing.assert_allclose(paper.optimizer.base_lr * 900 / 256, 1e-5)  # 1e-5 at their 900
