"""CLIP and SigLIP losses: hand-computed values, float64 references of the papers' formulas,
and sharded (one mesh axis, and the ('data', 'fsdp') tuple) == single-device for the loss and
the gradients with respect to both embeddings, the log-scale and the bias; SigLIP's ring of
text chunks == its all-gather form."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from ssl_jax import parallel
from ssl_jax.losses import image_text
from ssl_jax.losses.image_text import clamp_log_scale, clip_loss, siglip_loss

B, D = 16, 8
CLIP_LOG_SCALE = math.log(5.0)
# Not the paper's init (t = 10, b = -10): there every negative's loss and gradient are ~e^-10
# and a wrong negative term would hide under the tolerance.
SIGLIP_LOG_SCALE, SIGLIP_BIAS = math.log(5.0), -2.0


def _np_normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _np_logsumexp(a, axis):
  m = a.max(axis=axis, keepdims=True)
  return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def reference_clip(x, y, log_scale):
  """CLIP's pseudo-code (Radford et al. 2021, fig. 3) in float64: cross-entropy over the rows
  and over the columns of the scaled cosine matrix, labels on the diagonal."""
  logits = np.exp(log_scale) * _np_normalize(x) @ _np_normalize(y).T
  diag = np.diag(logits)
  loss_i = np.mean(_np_logsumexp(logits, axis=1) - diag)
  loss_t = np.mean(_np_logsumexp(logits, axis=0) - diag)
  return (loss_i + loss_t) / 2


def reference_siglip(x, y, log_scale, bias):
  """SigLIP's pseudo-code (Zhai et al. 2023, algorithm 1) in float64."""
  logits = np.exp(log_scale) * _np_normalize(x) @ _np_normalize(y).T + bias
  labels = 2 * np.eye(len(x)) - 1
  return np.sum(np.logaddexp(0.0, -labels * logits)) / len(x)


def jnp_clip(x, y, log_scale):
  """The same formula in jnp over the full matrix, written independently, for jax.grad."""
  x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
  y = y / jnp.linalg.norm(y, axis=1, keepdims=True)
  logits = jnp.exp(log_scale) * jnp.matmul(x, y.T, precision='highest')
  labels = jnp.arange(x.shape[0])
  lp_i = jax.nn.log_softmax(logits, axis=1)[labels, labels]
  lp_t = jax.nn.log_softmax(logits, axis=0)[labels, labels]
  return -(lp_i.mean() + lp_t.mean()) / 2


def jnp_siglip(x, y, log_scale, bias):
  x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
  y = y / jnp.linalg.norm(y, axis=1, keepdims=True)
  logits = jnp.exp(log_scale) * jnp.matmul(x, y.T, precision='highest') + bias
  labels = 2 * jnp.eye(x.shape[0]) - 1
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / x.shape[0]


@pytest.fixture(scope='module')
def batch():
  """Texts correlated with their images, so positives stand out (accuracies are neither 0
  nor trivially 1) and every term of the loss carries gradient."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(B, D)).astype(np.float32)
  y = (x + 0.8 * rng.normal(size=(B, D))).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(y)


def _one_axis_mesh():
  return Mesh(np.asarray(jax.devices()[:8]), (parallel.DATA_AXIS,)), parallel.DATA_AXIS


def _two_axis_mesh():
  return parallel.make_mesh(8, fsdp=2), parallel.BATCH_AXES


MESHES = {'data8': _one_axis_mesh, 'data4_fsdp2': _two_axis_mesh}


# ---------------------------------------------------------------------------------------------
# Hand-computed values.
#
# Images x0 = (1, 0), x1 = (0, 1); texts y0 = (3, 4), y1 = (0, 2) (unnormalised: the losses
# must normalise them). Cosines C[i, j] = x_i . y_j / |y_j| = [[0.6, 0], [0.8, 1]].


HAND_X = jnp.array([[1.0, 0.0], [0.0, 1.0]])
HAND_Y = jnp.array([[3.0, 4.0], [0.0, 2.0]])


def test_clip_hand_computed():
  # Scale t = 2: logits [[1.2, 0], [1.6, 2]].
  # Image rows: -log(e^1.2 / (e^1.2 + e^0)) = log(1 + e^-1.2); log(1 + e^(1.6 - 2)).
  # Text columns: column 0 is (1.2, 1.6) with positive 1.2: log(1 + e^0.4); column 1 is
  # (0, 2) with positive 2: log(1 + e^-2).
  loss, m = clip_loss(HAND_X, HAND_Y, jnp.log(2.0))
  i2t = (np.log1p(np.exp(-1.2)) + np.log1p(np.exp(-0.4))) / 2
  t2i = (np.log1p(np.exp(0.4)) + np.log1p(np.exp(-2.0))) / 2
  np.testing.assert_allclose(loss, (i2t + t2i) / 2, rtol=1e-6)
  # Both images rank their own text first; text 0 prefers image 1 (1.6 > 1.2).
  assert float(m['i2t_accuracy']) == 1.0
  assert float(m['t2i_accuracy']) == 0.5
  np.testing.assert_allclose(m['scale'], 2.0, rtol=1e-6)
  np.testing.assert_allclose(m['positive_cosine'], (0.6 + 1.0) / 2, rtol=1e-6)


@pytest.mark.parametrize('chunked', [True, False])
def test_siglip_hand_computed(chunked):
  # t = 2, b = -1: logits 2C - 1 = [[0.2, -1], [0.6, 1]]. -log sigmoid(u) = log(1 + e^-u):
  # positives (z = +1): log(1 + e^-0.2), log(1 + e^-1); negatives (z = -1): the logit -1
  # gives log(1 + e^-1), the logit 0.6 gives log(1 + e^0.6). Sum over the 4 pairs / B = 2.
  loss, m = siglip_loss(HAND_X, HAND_Y, jnp.log(2.0), -1.0, chunked=chunked)
  expected = (np.log1p(np.exp(-0.2)) + np.log1p(np.exp(-1.0)) + np.log1p(np.exp(-1.0)) +
              np.log1p(np.exp(0.6))) / 2
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(m['positive_logit'], (0.2 + 1.0) / 2, rtol=1e-6)
  np.testing.assert_allclose(m['negative_logit'], (-1.0 + 0.6) / 2, rtol=1e-5)
  np.testing.assert_allclose(m['scale'], 2.0, rtol=1e-6)
  np.testing.assert_allclose(m['bias'], -1.0, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Float64 references on random inputs; gradients against an independent jnp formula and
# finite differences.


def test_clip_matches_reference_and_gradients(batch):
  x, y = batch
  loss, m = clip_loss(x, y, CLIP_LOG_SCALE)
  np.testing.assert_allclose(loss, reference_clip(x, y, CLIP_LOG_SCALE), rtol=1e-5)
  cos = np.sum(_np_normalize(x) * _np_normalize(y), axis=1)
  np.testing.assert_allclose(m['positive_cosine'], cos.mean(), rtol=1e-5)
  logits = _np_normalize(x) @ _np_normalize(y).T
  np.testing.assert_allclose(m['i2t_accuracy'], np.mean(logits.argmax(1) == np.arange(B)))
  np.testing.assert_allclose(m['t2i_accuracy'], np.mean(logits.argmax(0) == np.arange(B)))
  assert 0.0 < float(m['i2t_accuracy']) < 1.0

  ls = jnp.float32(CLIP_LOG_SCALE)
  grads = jax.grad(lambda *a: clip_loss(*a)[0], argnums=(0, 1, 2))(x, y, ls)
  ref_grads = jax.grad(jnp_clip, argnums=(0, 1, 2))(x, y, ls)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
  eps = 1e-5
  numeric = (reference_clip(x, y, CLIP_LOG_SCALE + eps) -
             reference_clip(x, y, CLIP_LOG_SCALE - eps)) / (2 * eps)
  np.testing.assert_allclose(grads[2], numeric, rtol=1e-4)
  assert abs(float(grads[2])) > 1e-3


def test_siglip_matches_reference_and_gradients(batch):
  x, y = batch
  loss, m = siglip_loss(x, y, SIGLIP_LOG_SCALE, SIGLIP_BIAS)
  np.testing.assert_allclose(
      loss, reference_siglip(x, y, SIGLIP_LOG_SCALE, SIGLIP_BIAS), rtol=1e-5)
  logits = np.exp(SIGLIP_LOG_SCALE) * _np_normalize(x) @ _np_normalize(y).T + SIGLIP_BIAS
  off = ~np.eye(B, dtype=bool)
  np.testing.assert_allclose(m['positive_logit'], np.diag(logits).mean(), rtol=1e-5)
  np.testing.assert_allclose(m['negative_logit'], logits[off].mean(), rtol=1e-4, atol=1e-5)

  args = (x, y, jnp.float32(SIGLIP_LOG_SCALE), jnp.float32(SIGLIP_BIAS))
  grads = jax.grad(lambda *a: siglip_loss(*a)[0], argnums=(0, 1, 2, 3))(*args)
  ref_grads = jax.grad(jnp_siglip, argnums=(0, 1, 2, 3))(*args)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
  eps = 1e-5
  for k, (ls, b) in ((2, (eps, 0.0)), (3, (0.0, eps))):
    numeric = (reference_siglip(x, y, SIGLIP_LOG_SCALE + ls, SIGLIP_BIAS + b) -
               reference_siglip(x, y, SIGLIP_LOG_SCALE - ls, SIGLIP_BIAS - b)) / (2 * eps)
    np.testing.assert_allclose(grads[k], numeric, rtol=1e-4)
    assert abs(float(grads[k])) > 1e-3


def test_log_scale_is_not_clipped_inside_the_loss(batch):
  # Above ln 100 the loss still uses the given scale and passes it a gradient: clamping is the
  # method's after-update job, and a clip here would freeze the parameter above the bound.
  x, y = batch
  ls = jnp.float32(math.log(200.0))
  (loss, m), g = jax.value_and_grad(lambda s: clip_loss(x, y, s), has_aux=True)(ls)
  np.testing.assert_allclose(m['scale'], 200.0, rtol=1e-5)
  np.testing.assert_allclose(loss, reference_clip(x, y, math.log(200.0)), rtol=1e-4)
  assert float(g) != 0.0


def test_clamp_log_scale_and_constants():
  ln100 = math.log(100.0)
  values = jnp.array([0.0, math.log(1 / 0.07), ln100 - 1e-3, ln100, ln100 + 0.5, 10.0])
  out = np.asarray(clamp_log_scale(values))
  np.testing.assert_array_equal(out[:4], np.asarray(values[:4]))      # below: untouched
  np.testing.assert_allclose(out[4:], np.float32(ln100), rtol=1e-7)
  np.testing.assert_allclose(clamp_log_scale(jnp.float32(3.0), max_scale=10.0), math.log(10.0),
                             rtol=1e-7)
  assert image_text.CLIP_MAX_SCALE == 100.0
  np.testing.assert_allclose(math.exp(image_text.CLIP_INIT_LOG_SCALE), 1 / 0.07)
  np.testing.assert_allclose(math.exp(image_text.SIGLIP_INIT_LOG_SCALE), 10.0)
  assert image_text.SIGLIP_INIT_BIAS == -10.0


def test_bfloat16_inputs_are_computed_in_float32(batch):
  x, y = batch
  xb, yb = x.astype(jnp.bfloat16), y.astype(jnp.bfloat16)
  for fn, ref, scalars in ((clip_loss, reference_clip, (CLIP_LOG_SCALE,)),
                           (siglip_loss, reference_siglip, (SIGLIP_LOG_SCALE, SIGLIP_BIAS))):
    loss, _ = fn(xb, yb, *scalars)
    assert loss.dtype == jnp.float32
    # The reference on the bf16-rounded values: only the inputs were rounded.
    np.testing.assert_allclose(loss, ref(np.asarray(xb, np.float32), np.asarray(yb, np.float32),
                                         *scalars), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Sharded == single device.


def _value_and_grad(loss_fn, num_scalars, mesh=None, axis=None, **kwargs):
  """jit(value_and_grad) of the loss w.r.t. both embeddings and the scalars; sharded over
  `axis` of `mesh` (embeddings split, scalars replicated) when a mesh is given."""
  argnums = tuple(range(2 + num_scalars))
  if mesh is None:
    f = lambda *a: loss_fn(*a, **kwargs)
  else:
    f = jax.shard_map(lambda *a: loss_fn(*a, axis_name=axis, **kwargs), mesh=mesh,
                      in_specs=(P(axis), P(axis)) + (P(),) * num_scalars, out_specs=P())
  return jax.jit(jax.value_and_grad(f, argnums=argnums, has_aux=True))


def _assert_same(result, expected, rtol=1e-5, atol=1e-6):
  (loss, metrics), grads = result
  (loss_1, metrics_1), grads_1 = expected
  np.testing.assert_allclose(loss, loss_1, rtol=rtol)
  for k in metrics_1:
    np.testing.assert_allclose(metrics[k], metrics_1[k], rtol=rtol, atol=atol, err_msg=k)
  for i, (g, g_1) in enumerate(zip(grads, grads_1)):
    np.testing.assert_allclose(g, g_1, rtol=rtol, atol=atol, err_msg=f'argument {i}')
    # Not trivially zero: dropped cotangents (e.g. of the gathered columns) would show.
    assert float(jnp.abs(g_1).max()) > 1e-3, i


@pytest.mark.parametrize('mesh_name', sorted(MESHES))
def test_clip_sharded_equals_single_device(batch, mesh_name):
  mesh, axis = MESHES[mesh_name]()
  args = batch + (jnp.float32(CLIP_LOG_SCALE),)
  expected = _value_and_grad(clip_loss, 1)(*args)
  np.testing.assert_allclose(expected[0][0], reference_clip(*batch, CLIP_LOG_SCALE), rtol=1e-5)
  _assert_same(_value_and_grad(clip_loss, 1, mesh, axis)(*args), expected)


@pytest.fixture(scope='module')
def siglip_single(batch):
  args = batch + (jnp.float32(SIGLIP_LOG_SCALE), jnp.float32(SIGLIP_BIAS))
  return args, _value_and_grad(siglip_loss, 2)(*args)


@pytest.mark.parametrize('chunked', [True, False])
@pytest.mark.parametrize('mesh_name', sorted(MESHES))
def test_siglip_sharded_equals_single_device(siglip_single, mesh_name, chunked):
  # Both forms on both meshes match the single-device loss, hence each other (the chunked ==
  # unchunked check on 8 devices is the 'data8' pair of cases).
  args, expected = siglip_single
  mesh, axis = MESHES[mesh_name]()
  np.testing.assert_allclose(
      expected[0][0], reference_siglip(*args[:2], SIGLIP_LOG_SCALE, SIGLIP_BIAS), rtol=1e-5)
  result = _value_and_grad(siglip_loss, 2, mesh, axis, chunked=chunked)(*args)
  _assert_same(result, expected)


@pytest.mark.parametrize('mesh_name', sorted(MESHES))
def test_siglip_chunked_passes_chunks_instead_of_gathering(batch, mesh_name):
  # The chunked form must move texts by ppermute (axis_size - 1 hops, in a scan) and never
  # all-gather them; the unchunked form gathers.
  mesh, axis = MESHES[mesh_name]()
  args = batch + (jnp.float32(SIGLIP_LOG_SCALE), jnp.float32(SIGLIP_BIAS))

  def jaxpr(chunked):
    f = jax.shard_map(lambda *a: siglip_loss(*a, axis_name=axis, chunked=chunked)[0],
                      mesh=mesh, in_specs=(P(axis), P(axis), P(), P()), out_specs=P())
    return str(jax.make_jaxpr(f)(*args))

  chunked, gathered = jaxpr(True), jaxpr(False)
  assert 'ppermute' in chunked and 'all_gather' not in chunked
  assert 'scan' in chunked and 'length=7' in chunked
  assert 'all_gather' in gathered and 'ppermute' not in gathered


def test_siglip_chunked_equals_unchunked_uneven_positions(batch):
  # A batch whose positives would be misplaced by an off-by-one in the ring: pairs differ
  # strongly per device, so scoring any chunk's diagonal as positive changes the loss.
  mesh, axis = _one_axis_mesh()
  x, y = batch
  y = x + 0.05 * y                                   # near-perfect pairs: positives matter
  args = (x, y, jnp.float32(SIGLIP_LOG_SCALE), jnp.float32(SIGLIP_BIAS))
  ref = reference_siglip(x, y, SIGLIP_LOG_SCALE, SIGLIP_BIAS)
  for chunked in (True, False):
    f = jax.jit(jax.shard_map(lambda *a: siglip_loss(*a, axis_name=axis, chunked=chunked)[0],
                              mesh=mesh, in_specs=(P(axis), P(axis), P(), P()),
                              out_specs=P()))
    np.testing.assert_allclose(f(*args), ref, rtol=1e-5)
