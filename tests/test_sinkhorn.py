"""SwAV's Sinkhorn-Knopp codes and swapped-prediction loss: hand-computed values, the authors'
`distributed_sinkhorn` written out in numpy, the transport marginals, the queue's extra rows,
and 8 devices equal to one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ssl_jax import parallel
from ssl_jax.losses.sinkhorn import sinkhorn_knopp, swapped_prediction


def reference_sinkhorn(scores, epsilon, num_iters, extra=None):
  """The authors' distributed_sinkhorn (main_swav.py) in float64, on one device: Q is K x B,
  the queue's rows come first, and the codes of the batch are the last rows."""
  out = np.asarray(scores, np.float64)
  if extra is not None:
    out = np.concatenate([np.asarray(extra, np.float64), out])
  q = np.exp(out / epsilon).T
  k, b = q.shape
  q /= q.sum()
  for _ in range(num_iters):
    q /= q.sum(axis=1, keepdims=True)
    q /= k
    q /= q.sum(axis=0, keepdims=True)
    q /= b
  q *= b
  return q.T[-len(scores):]


def reference_swapped_loss(scores, codes, temperature):
  """main_swav.py's loss loop: crops with codes are the first len(codes)."""
  total = 0.0
  for i, q in enumerate(codes):
    sub = 0.0
    for v in range(len(scores)):
      if v == i:
        continue
      x = np.asarray(scores[v], np.float64) / temperature
      log_p = x - x.max(axis=1, keepdims=True)
      log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
      sub -= np.mean(np.sum(q * log_p, axis=1))
    total += sub / (len(scores) - 1)
  return total / len(codes)


def _cosines(rng, n, k):
  z = rng.normal(size=(n, 8))
  c = rng.normal(size=(8, k))
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  c /= np.linalg.norm(c, axis=0, keepdims=True)
  return (z @ c).astype(np.float32)


def test_hand_computed_two_by_two():
  # exp(scores / eps) = [[1, 1], [1, 3]] (eps = 1). Sum to 1: [[1, 1], [1, 3]] / 6.
  # Prototype (column) totals 1/3, 2/3 -> divide, / K: [[1/4, 1/8], [1/4, 3/8]].
  # Sample (row) totals 3/8, 5/8 -> divide, / B: [[1/3, 1/6], [1/5, 3/10]]; times B = 2:
  scores = jnp.log(jnp.array([[1.0, 1.0], [1.0, 3.0]]))
  codes = sinkhorn_knopp(scores, epsilon=1.0, num_iters=1)
  np.testing.assert_allclose(codes, [[2 / 3, 1 / 3], [2 / 5, 3 / 5]], rtol=1e-6)


def test_extra_rows_join_the_problem_but_are_not_returned():
  # The hand example's second row held as an extra (queue) row: the first row's codes are
  # those of the full 2 x 2 problem. Without it (use_extra False) the problem is the single
  # row [1, 1], whose codes are uniform.
  first = jnp.log(jnp.array([[1.0, 1.0]]))
  extra = jnp.log(jnp.array([[1.0, 3.0]]))
  with_extra = sinkhorn_knopp(first, 1.0, 1, extra_scores=extra, use_extra=True)
  np.testing.assert_allclose(with_extra, [[2 / 3, 1 / 3]], rtol=1e-6)
  # `use_extra` is traced in the method (the queue fills during training).
  without = jax.jit(lambda u: sinkhorn_knopp(first, 1.0, 1, extra_scores=extra,
                                             use_extra=u))(False)
  np.testing.assert_allclose(without, [[0.5, 0.5]], rtol=1e-6)


@pytest.mark.parametrize('epsilon, num_iters', [(0.05, 3), (0.1, 1), (0.05, 10)])
def test_matches_authors_iteration(epsilon, num_iters):
  rng = np.random.default_rng(0)
  scores = _cosines(rng, 12, 5)
  extra = _cosines(rng, 20, 5)
  np.testing.assert_allclose(sinkhorn_knopp(jnp.asarray(scores), epsilon, num_iters),
                             reference_sinkhorn(scores, epsilon, num_iters), rtol=2e-5,
                             atol=1e-7)
  np.testing.assert_allclose(
      sinkhorn_knopp(jnp.asarray(scores), epsilon, num_iters, extra_scores=jnp.asarray(extra)),
      reference_sinkhorn(scores, epsilon, num_iters, extra), rtol=2e-5, atol=1e-7)


def test_marginals_equipartition():
  """Each sample's codes sum to 1 after any number of rounds; converged, every prototype
  takes 1/K of the batch (the constraint set of eq. 3) and the plan has the solution's form
  Diag(u) exp(C^T Z / eps) Diag(v)."""
  scores = jnp.asarray(_cosines(np.random.default_rng(1), 40, 8))
  for num_iters in (3, 200):
    codes = np.asarray(sinkhorn_knopp(scores, 0.05, num_iters), np.float64)
    np.testing.assert_allclose(codes.sum(axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(codes.mean(axis=0), 1 / 8, rtol=1e-4)
  # log Q - S / eps = log u_b + log v_k: no interaction left after removing row/column means.
  resid = np.log(codes) - np.asarray(scores, np.float64) / 0.05
  resid = resid - resid.mean(0) - resid.mean(1, keepdims=True) + resid.mean()
  np.testing.assert_allclose(resid, 0.0, atol=1e-3)
  # Not trivially uniform: the codes follow the scores.
  assert codes.max(axis=1).mean() > 0.5
  assert (np.argmax(codes, 1) == np.argmax(np.asarray(scores), 1)).mean() > 0.5


def test_large_scores_do_not_overflow():
  # s / eps reaches 200: exp overflows float32 without the max shift.
  scores = np.array([[10.0, 9.9, 9.5], [9.0, 10.0, 9.8]], np.float32)
  codes = sinkhorn_knopp(jnp.asarray(scores), 0.05, 3)
  assert np.all(np.isfinite(codes))
  np.testing.assert_allclose(codes, reference_sinkhorn(scores, 0.05, 3), rtol=1e-5, atol=1e-7)


def test_codes_pass_no_gradient():
  scores = jnp.asarray(_cosines(np.random.default_rng(2), 6, 4))
  grad = jax.grad(lambda s: jnp.sum(sinkhorn_knopp(s) * jnp.arange(4.0)))(scores)
  np.testing.assert_array_equal(grad, 0.0)


def test_eight_devices_give_the_single_device_codes():
  """Prototype totals are psum'd and the queue rows counted once, so each device's rows get
  the codes one device holding the global batch computes."""
  rng = np.random.default_rng(3)
  scores = jnp.asarray(_cosines(rng, 32, 6))
  extra = jnp.asarray(_cosines(rng, 16, 6))
  mesh = parallel.make_mesh(8)
  axis = parallel.DATA_AXIS
  for kwargs in ({}, {'extra_scores': extra}):
    sharded = jax.jit(jax.shard_map(
        lambda s, kw=kwargs: sinkhorn_knopp(s, 0.05, 3, axis, **kw), mesh=mesh,
        in_specs=P(axis), out_specs=P(axis)))(scores)
    single = sinkhorn_knopp(scores, 0.05, 3, None, **kwargs)
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(single, reference_sinkhorn(
        scores, 0.05, 3, kwargs.get('extra_scores')), rtol=2e-5, atol=1e-7)
  # Per-device Sinkhorn (no psum) would differ: the check above can fail.
  local = sinkhorn_knopp(scores[:4], 0.05, 3)
  assert np.abs(np.asarray(local) - np.asarray(single[:4])).max() > 1e-3


def test_swapped_prediction_hand_computed():
  # tau = 1, one sample, K = 2. Crop 0 scores [0, 0]: p0 = (1/2, 1/2); crop 1 [0, ln 3]:
  # p1 = (1/4, 3/4). Codes q0 = (1, 0), q1 = (1/4, 3/4). Crop 1 predicts q0: -ln(1/4);
  # crop 0 predicts q1: ln 2 whatever q1. Loss = (ln 4 + ln 2) / 2.
  scores = [jnp.array([[0.0, 0.0]]), jnp.array([[0.0, np.log(3.0)]])]
  codes = [jnp.array([[1.0, 0.0]]), jnp.array([[0.25, 0.75]])]
  loss, metrics = swapped_prediction(scores, codes, temperature=1.0)
  np.testing.assert_allclose(loss, 1.5 * np.log(2.0), rtol=1e-6)
  np.testing.assert_allclose(metrics['code_max'], (1.0 + 0.75) / 2, rtol=1e-6)
  # Temperature divides the scores: tau = 0.5 on halved scores is the same problem.
  halved = [s / 2 for s in scores]
  np.testing.assert_allclose(swapped_prediction(halved, codes, 0.5)[0], 1.5 * np.log(2.0),
                             rtol=1e-6)


def test_multicrop_swapped_prediction_matches_authors_loop_on_eight_devices():
  """2 global crops with codes, 3 local crops that only predict; loss and gradients on 8
  devices equal one device and the authors' loop."""
  rng = np.random.default_rng(4)
  scores = [jnp.asarray(_cosines(rng, 16, 5)) for _ in range(5)]
  codes = [sinkhorn_knopp(s, 0.05, 3) for s in scores[:2]]
  expected = reference_swapped_loss(scores, [np.asarray(q) for q in codes], 0.1)

  def single(s):
    return swapped_prediction(s, codes, 0.1)[0]

  mesh = parallel.make_mesh(8)
  axis = parallel.DATA_AXIS
  sharded = jax.shard_map(lambda s, q: swapped_prediction(s, q, 0.1, axis)[0], mesh=mesh,
                          in_specs=(P(axis), P(axis)), out_specs=P())
  loss_1, grads_1 = jax.value_and_grad(single)(scores)
  loss_8, grads_8 = jax.jit(jax.value_and_grad(sharded))(scores, codes)
  np.testing.assert_allclose(loss_1, expected, rtol=1e-5)
  np.testing.assert_allclose(loss_8, expected, rtol=1e-5)
  for g8, g1 in zip(grads_8, grads_1):
    np.testing.assert_allclose(g8, g1, rtol=1e-5, atol=1e-8)
  # Every crop gets a gradient, the local ones included.
  assert all(float(jnp.abs(g).max()) > 1e-4 for g in grads_1)
