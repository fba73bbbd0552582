"""A FIFO queue of embeddings kept in `method_state`: MoCo's dictionary of negative keys
(He et al. 2020, Sec. 3.1 "Dictionary as a queue") and NNCLR's support set (Dwibedi et al.
2021, Sec. 3.2).

The state is {'queue': [K, d] float32, 'ptr': int32 scalar}; row `ptr` holds the oldest
entry, the next to be overwritten. `enqueue` writes the embeddings of the whole global batch,
gathered from every device in global-batch order, at rows ptr, ptr + 1, ... modulo K. Every
device computes the same new state, for any number of devices, and K need not be a multiple
of the batch: writes wrap around.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_jax import parallel, precision
from ssl_jax.losses.info_nce import l2_normalize


def init_queue(rng, size: int, dim: int) -> dict:
  """K random unit vectors, as MoCo's reference code starts: until real embeddings replace
  them they are uninformative negatives (MoCo) or random neighbours (NNCLR)."""
  return {'queue': l2_normalize(jax.random.normal(rng, (size, dim), jnp.float32)),
          'ptr': jnp.zeros((), jnp.int32)}


def enqueue(state: dict, local_rows: jnp.ndarray, axis_name: str | None) -> dict:
  """Replaces the oldest N entries by the global batch's N rows (this device's `local_rows`
  plus the other devices'), the first row going to position `ptr`; returns the new state.

  Stored as given (callers normalise) and without gradient: the queue is data, not a
  function of the parameters being optimised.
  """
  queue, ptr = state['queue'], state['ptr']
  rows = parallel.gather_rows_replicated(jax.lax.stop_gradient(local_rows), axis_name)
  size, n = queue.shape[0], rows.shape[0]
  if n > size:
    raise ValueError(f'A queue of {size} entries cannot take a global batch of {n} rows: '
                     f'make the queue at least as large as the batch.')
  positions = (ptr + jnp.arange(n, dtype=jnp.int32)) % size
  queue = queue.at[positions].set(rows.astype(queue.dtype), unique_indices=True)
  return {'queue': queue, 'ptr': (ptr + n) % size}


def nearest_neighbours(queries: jnp.ndarray, queue: jnp.ndarray
                       ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """For each row of `queries` (unit vectors), the queue entry of highest cosine similarity
  (NNCLR's NN(z, Q), Dwibedi et al. 2021, eq. 2) and that similarity.

  The queue is replicated, so this is local to each device. The neighbours carry no gradient:
  an argmax selects them, and they are stored data.
  """
  queries, queue = precision.to_float32((queries, queue))
  similarity = precision.matmul(queries, queue.T)                 # [n, K]
  index = jnp.argmax(similarity, axis=1)
  neighbours = jax.lax.stop_gradient(queue[index])
  return neighbours, jax.lax.stop_gradient(jnp.max(similarity, axis=1))
