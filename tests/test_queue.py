"""The FIFO embedding queue: contents and pointer after several enqueues (with wrap-around)
against a hand-written FIFO, and 8 devices giving exactly the single-device queue."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ssl_jax import parallel
from ssl_jax.losses import queue as queue_lib


def _batches(num, n, d, seed=0):
  return [np.random.default_rng([seed, i]).normal(size=(n, d)).astype(np.float32)
          for i in range(num)]


def _reference_fifo(queue, ptr, batches):
  """A FIFO written out row by row: each row overwrites the oldest entry."""
  queue = np.array(queue, copy=True)
  for batch in batches:
    for row in batch:
      queue[ptr] = row
      ptr = (ptr + 1) % len(queue)
  return queue, ptr


def test_init_gives_unit_rows_and_pointer_zero():
  state = queue_lib.init_queue(jax.random.PRNGKey(0), 64, 8)
  assert state['queue'].shape == (64, 8) and state['ptr'].dtype == jnp.int32
  assert int(state['ptr']) == 0
  np.testing.assert_allclose(np.linalg.norm(state['queue'], axis=1), 1.0, rtol=1e-6)
  # Random directions, not one vector repeated.
  assert np.abs(np.asarray(state['queue'] @ state['queue'].T) - np.eye(64)).max() < 0.999


def test_hand_checked_wrap_around():
  # K = 5, batches of 2: pointer 0 -> 2 -> 4 -> 1 (the third batch wraps: rows 4, 0).
  state = {'queue': jnp.zeros((5, 1)), 'ptr': jnp.zeros((), jnp.int32)}
  for value in (1.0, 2.0, 3.0):
    state = queue_lib.enqueue(state, jnp.array([[value], [value + 0.5]]), None)
  np.testing.assert_array_equal(state['queue'][:, 0], [3.5, 1.5, 2.0, 2.5, 3.0])
  assert int(state['ptr']) == 1
  # The fourth batch overwrites the two oldest entries, rows 1 and 2.
  state = queue_lib.enqueue(state, jnp.array([[4.0], [4.5]]), None)
  np.testing.assert_array_equal(state['queue'][:, 0], [3.5, 4.0, 4.5, 2.5, 3.0])
  assert int(state['ptr']) == 3


@pytest.mark.parametrize('size, n', [(16, 4), (10, 4), (8, 8)])
def test_several_enqueues_match_reference_fifo(size, n):
  start = queue_lib.init_queue(jax.random.PRNGKey(1), size, 3)
  batches = _batches(7, n, 3)
  enqueue = jax.jit(lambda s, b: queue_lib.enqueue(s, b, None))
  state = start
  for batch in batches:
    state = enqueue(state, jnp.asarray(batch))
  expected, ptr = _reference_fifo(start['queue'], 0, batches)
  np.testing.assert_array_equal(state['queue'], expected)
  assert int(state['ptr']) == ptr == (7 * n) % size


def test_batch_larger_than_queue_is_an_error():
  state = queue_lib.init_queue(jax.random.PRNGKey(0), 4, 2)
  with pytest.raises(ValueError, match='at least as large as the batch'):
    queue_lib.enqueue(state, jnp.ones((6, 2)), None)


def test_eight_devices_give_the_single_device_queue():
  """Each device enqueues its rows; the gathered, replicated result after several steps
  (K = 20 with global batches of 8: wraps around) equals one device's, bit for bit."""
  mesh = parallel.make_mesh(8)
  axis = parallel.DATA_AXIS
  sharded = jax.jit(jax.shard_map(lambda s, b: queue_lib.enqueue(s, b, axis), mesh=mesh,
                                  in_specs=(P(), P(axis)), out_specs=P()))
  single = jax.jit(lambda s, b: queue_lib.enqueue(s, b, None))
  start = queue_lib.init_queue(jax.random.PRNGKey(2), 20, 4)
  state_8, state_1 = start, start
  batches = _batches(5, 8, 4, seed=3)
  for batch in batches:
    state_8 = sharded(state_8, jnp.asarray(batch))
    state_1 = single(state_1, jnp.asarray(batch))
  np.testing.assert_array_equal(state_8['queue'], state_1['queue'])
  assert int(state_8['ptr']) == int(state_1['ptr']) == 0  # 40 rows into 20: wrapped twice
  np.testing.assert_array_equal(state_1['queue'], _reference_fifo(start['queue'], 0,
                                                                  batches)[0])


def test_gather_rows_replicated_is_the_exact_gather():
  mesh = parallel.make_mesh(8)
  axis = parallel.DATA_AXIS
  x = jnp.asarray(np.random.default_rng(4).normal(size=(16, 3)).astype(np.float32))
  gathered = jax.jit(jax.shard_map(lambda v: parallel.gather_rows_replicated(v, axis),
                                   mesh=mesh, in_specs=P(axis), out_specs=P()))(x)
  np.testing.assert_array_equal(gathered, x)


def test_enqueue_passes_no_gradient():
  state = queue_lib.init_queue(jax.random.PRNGKey(0), 8, 2)
  grad = jax.grad(lambda b: jnp.sum(queue_lib.enqueue(state, b, None)['queue']))(jnp.ones((4, 2)))
  np.testing.assert_array_equal(grad, 0.0)


def test_nearest_neighbours_hand_computed():
  support = jnp.array([[1.0, 0.0], [0.0, 1.0], [-0.6, 0.8]])
  queries = jnp.array([[0.8, 0.6], [-1.0, 0.0], [0.0, -1.0]])
  neighbours, similarity = queue_lib.nearest_neighbours(queries, support)
  # Cosines: row 0 (0.8, 0.6, 0), row 1 (-1, 0, 0.6), row 2 (0, -1, -0.8).
  np.testing.assert_array_equal(neighbours, support[jnp.array([0, 2, 0])])
  np.testing.assert_allclose(similarity, [0.8, 0.6, 0.0], atol=1e-7)
