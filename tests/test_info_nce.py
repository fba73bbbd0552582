"""NT-Xent: hand-computed values, and sharded == single-device for loss and gradients."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ssl_jax import parallel
from ssl_jax.losses.info_nce import nt_xent


def reference_nt_xent(z1, z2, temperature):
  """The SimCLR paper's formula written out over the 2N x 2N similarity matrix."""
  z = np.concatenate([z1, z2]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  sim = z @ z.T / temperature
  n = len(z1)
  total = 0.0
  for i in range(2 * n):
    pos = (i + n) % (2 * n)
    denom = sum(np.exp(sim[i, k]) for k in range(2 * n) if k != i)
    total += -np.log(np.exp(sim[i, pos]) / denom)
  return total / (2 * n)


def test_hand_computed_two_images():
  # Two images, 2-D embeddings: view 1 of image 0 along x, its view 2 at 90 degrees, image 1's
  # views along -x and -y. Cosines: pos pairs 0, and every query sees one negative at cos -1
  # and one at cos 0. With tau = 1: loss = -log(e^0 / (e^0 + e^-1 + e^0)) = log(2 + e^-1).
  z1 = jnp.array([[1.0, 0.0], [-1.0, 0.0]])
  z2 = jnp.array([[0.0, 1.0], [0.0, -1.0]])
  loss, metrics = nt_xent(z1, z2, temperature=1.0)
  np.testing.assert_allclose(loss, np.log(2.0 + np.exp(-1.0)), rtol=1e-6)
  np.testing.assert_allclose(metrics['pos_cosine'], 0.0, atol=1e-7)
  np.testing.assert_allclose(metrics['neg_cosine'], -0.5, atol=1e-7)


def test_matches_reference_formula():
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(2, 6, 5)).astype(np.float32)
  loss, _ = nt_xent(jnp.asarray(z1), jnp.asarray(z2), temperature=0.3)
  np.testing.assert_allclose(loss, reference_nt_xent(z1, z2, 0.3), rtol=1e-5)


def test_perfect_alignment_accuracy_and_scale_invariance():
  z = jax.random.normal(jax.random.PRNGKey(1), (8, 16))
  loss_a, m = nt_xent(z, 3.0 * z, temperature=0.1)
  loss_b, _ = nt_xent(z, z, temperature=0.1)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
  assert float(m['contrastive_acc']) == 1.0
  np.testing.assert_allclose(m['pos_cosine'], 1.0, rtol=1e-6)


@pytest.mark.parametrize('num_devices', [2, 8])
def test_sharded_equals_single_device_loss_and_gradients(num_devices):
  assert jax.device_count() >= num_devices, 'conftest should provide 8 CPU devices'
  mesh = parallel.make_mesh(num_devices)
  rng = np.random.default_rng(42)
  z1, z2 = (jnp.asarray(a) for a in rng.normal(size=(2, 16, 8)).astype(np.float32))
  tau = 0.2

  def single(z1, z2):
    return nt_xent(z1, z2, tau)[0]

  sharded_loss = jax.shard_map(
      lambda a, b: nt_xent(a, b, tau, axis_name=parallel.DATA_AXIS)[0],
      mesh=mesh, in_specs=(P(parallel.DATA_AXIS), P(parallel.DATA_AXIS)), out_specs=P())

  loss_1, grads_1 = jax.value_and_grad(single, argnums=(0, 1))(z1, z2)
  loss_d, grads_d = jax.jit(jax.value_and_grad(sharded_loss, argnums=(0, 1)))(z1, z2)
  np.testing.assert_allclose(loss_d, loss_1, rtol=1e-6)
  np.testing.assert_allclose(loss_1, reference_nt_xent(np.asarray(z1), np.asarray(z2), tau),
                             rtol=1e-5)
  for g_d, g_1 in zip(grads_d, grads_1):
    np.testing.assert_allclose(g_d, g_1, rtol=1e-5, atol=1e-7)
  # The gradient is not trivially zero: the test would catch dropped cotangents.
  assert float(jnp.abs(grads_1[0]).max()) > 1e-3


def test_gradient_matches_finite_differences():
  rng = np.random.default_rng(3)
  z1, z2 = rng.normal(size=(2, 4, 3))
  f = lambda a: reference_nt_xent(a, z2, 0.5)
  analytic = np.asarray(jax.grad(lambda a: nt_xent(a, jnp.asarray(z2, jnp.float32), 0.5)[0])(
      jnp.asarray(z1, jnp.float32)))
  eps = 1e-5
  numeric = np.zeros_like(z1)
  for idx in np.ndindex(z1.shape):
    d = np.zeros_like(z1)
    d[idx] = eps
    numeric[idx] = (f(z1 + d) - f(z1 - d)) / (2 * eps)
  np.testing.assert_allclose(analytic, numeric, rtol=1e-3, atol=1e-5)
