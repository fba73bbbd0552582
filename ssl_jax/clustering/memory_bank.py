"""A memory bank of one embedding per training example, kept in `method_state` and written
at each example's dataset index ('index', which every training batch carries).

Methods that cluster the training set inside the step (DeepCluster-v2, PCL) keep such a
bank: each step gathers the global batch's rows and indices from every device and writes
them, so the bank is the same on every device, for any number of devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_jax import config_lib, parallel


def num_clusters(config) -> tuple[int, ...]:
  """K of each clustering (`method.num_clusters`: a sequence, or one int for one)."""
  k = config.method.num_clusters
  return tuple(int(x) for x in k) if isinstance(k, (list, tuple)) else (int(k),)


def bank_size(method_name: str, config, run_length) -> int:
  """The number of memory slots, one per training example (`run_length.num_examples`), after
  checking that every clustering asks for at most that many clusters."""
  n = run_length.num_examples if run_length is not None else None
  if not n:
    raise config_lib.ConfigError(
        f'{method_name} keeps one memory slot per training example, so it needs the '
        'training set size: build it through experiment.build (RunLength.num_examples).')
  if any(k > n for k in num_clusters(config)):
    raise config_lib.ConfigError(
        f'method.num_clusters={num_clusters(config)} asks for more clusters than '
        f'the {n} training examples: set each to at most {n}.')
  return n


def init_bank(num_examples: int, dim: int) -> dict:
  """{'memory': [N, d] zeros, 'filled': bool [N], which examples have been written}."""
  return {'memory': jnp.zeros((num_examples, dim), jnp.float32),
          'filled': jnp.zeros((num_examples,), bool)}


def write_rows(memory: jax.Array, filled: jax.Array, local_rows: jax.Array,
               local_index: jax.Array, axis_name) -> tuple[jax.Array, jax.Array]:
  """(memory, filled) with the global batch's rows (this device's `local_rows` [n, d] and
  the other devices', gathered) written at their indices (`local_index` int32 [n]). Banks
  of several views that share the slots are written at once: `memory` [V, N, d] and
  `local_rows` [V, n, d].

  A batch that crosses an epoch boundary may hold an example twice: its later row is
  written (an explicit rule; a scatter of both would leave either). Rows carry no gradient:
  the bank is data."""
  index = parallel.gather_rows_replicated(local_index, axis_name)
  # Examples first, as they are gathered.
  rows = parallel.gather_rows_replicated(
      jnp.moveaxis(jax.lax.stop_gradient(local_rows), -2, 0), axis_name)
  n = filled.shape[0]
  seen_later = jnp.triu(index[:, None] == index[None, :], k=1).any(axis=1)
  slot = jnp.where(seen_later, n, index)  # out of range: dropped
  at = memory.at[slot] if memory.ndim == 2 else memory.at[:, slot]
  return (at.set(jnp.moveaxis(rows, 0, -2).astype(memory.dtype), mode='drop'),
          filled.at[slot].set(True, mode='drop'))
