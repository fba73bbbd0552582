"""Grain input pipeline: shuffled, repeated, per-host batches that can be checkpointed.

Design
------
The stream of examples is a sequence of epochs, each a fresh permutation of the source's
records (``numpy.random.default_rng([seed, epoch]).permutation(N)``: deterministic given the
seed, different for every epoch, unrelated between seeds). Global batch ``t`` is positions
``[t * B, (t + 1) * B)`` of that stream (batches run on across epoch boundaries, so no
example is dropped) and host ``h`` of ``P`` reads rows ``[h * B / P, (h + 1) * B / P)`` of
it. So the global batch at step ``t`` is the same, in the same row order, whatever the
number of hosts, and host ``h``'s rows are exactly the rows that
``jax.make_array_from_process_local_data`` places on it.

The grain graph is ``grain.MapDataset.range(num_steps).map(read_host_batch)
.to_iter_dataset(read_options)`` (+ ``.mp_prefetch`` with workers): one grain element is one
per-host batch, read with a single vectorised numpy gather (`get_batch`) instead of
``MapDataset.source(...).shuffle().repeat().batch()``, which calls Python per example
(~20 us/example here, 100x the gather) and, with striding ``[h::P]`` for hosts, interleaves
the hosts' rows within the global batch.

Checkpointing the iterator with orbax
-------------------------------------
``iter(...)`` returns a grain ``DatasetIterator``; its state is ``{'next_index': step}``
(the number of batches handed out). grain ships an orbax handler,
``grain.checkpoint.CheckpointHandler``, with the arguments ``grain.checkpoint.CheckpointSave``
/ ``CheckpointRestore`` registered for it, so it goes into a ``Composite`` next to the model
state; each host writes its own ``process_<i>-of-<n>.json``::

    import grain
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=3, create=True))
    iterator = make_train_iterator(source, global_batch_size=256, seed=0)
    ...
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state),
        data=grain.checkpoint.CheckpointSave(iterator)))
    ...
    # On restart: build the iterator exactly as before, then
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_train_state),
        data=grain.checkpoint.CheckpointRestore(iterator)))
    train_state, iterator = restored['state'], restored['data']  # iterator: same object

Notes: the grain state is read when ``save`` is called (also with asynchronous
checkpointing), so save right after the batches of the saved steps were consumed; if
batches are buffered outside the iterator (e.g. a device-prefetch queue), the saved state is
ahead of the training step by the buffer length. The state depends on the pipeline: restore
with the same seed, batch size, source and ``worker_count`` (with workers grain's state has
another format). Because ``next_index`` is just the step, a run can also be resumed under a
different number of hosts with ``iterator.set_state({'next_index': step})`` (worker_count=0).
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Sequence

import grain
import numpy as np

__all__ = ['make_eval_arrays', 'make_train_iterator', 'read_batch']


def read_batch(source: Any, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
  """{'image': uint8 [n, H, W, C], 'label': int32 [n]} for the given record indices.

  Uses the source's vectorised ``get_batch`` when it has one, else reads record by record.
  """
  get_batch = getattr(source, 'get_batch', None)
  if get_batch is not None:
    return get_batch(indices)
  records = [source[int(i)] for i in indices]
  images = [np.asarray(r['image']) for r in records]
  images = [x[..., None] if x.ndim == 2 else x for x in images]
  if any(x.dtype != np.uint8 for x in images):
    raise TypeError(f'{source!r}: images must be uint8.')
  return {'image': np.stack(images),
          'label': np.array([int(r['label']) for r in records], np.int32)}


class _ReadHostBatch:
  """Step t -> this host's rows of global batch t (a picklable grain map function)."""

  def __init__(self, source, *, num_records: int, global_batch_size: int,
               host_batch_size: int, host_offset: int, seed: int, shuffle: bool,
               total_positions: int | None):
    self.source = source
    self.num_records = num_records
    self.global_batch_size = global_batch_size
    self.host_batch_size = host_batch_size
    self.host_offset = host_offset
    self.seed = seed
    self.shuffle = shuffle
    self.total_positions = total_positions
    self._init_cache()

  def _init_cache(self):
    self._lock = threading.Lock()  # grain's prefetch threads call us concurrently
    self._perms: dict[int, np.ndarray] = {}

  def __getstate__(self):
    state = self.__dict__.copy()
    del state['_lock'], state['_perms']
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_cache()

  def permutation(self, epoch: int) -> np.ndarray:
    with self._lock:
      perm = self._perms.get(epoch)
      if perm is None:
        if self.shuffle:
          perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_records)
        else:
          perm = np.arange(self.num_records)
        if len(self._perms) >= 4:  # a batch touches at most 2 epochs; keep a few
          del self._perms[min(self._perms)]
        self._perms[epoch] = perm
      return perm

  def indices(self, step: int) -> np.ndarray:
    """Record indices of this host's rows of global batch `step`."""
    start = step * self.global_batch_size + self.host_offset
    stop = start + self.host_batch_size
    if self.total_positions is not None:
      stop = min(stop, self.total_positions)
    positions = np.arange(start, stop, dtype=np.int64)
    epochs, within = np.divmod(positions, self.num_records)
    out = np.empty_like(positions)
    for epoch in range(int(epochs[0]), int(epochs[-1]) + 1):
      mask = epochs == epoch
      out[mask] = self.permutation(epoch)[within[mask]]
    return out

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    return read_batch(self.source, self.indices(int(step)))


def make_train_iterator(source: Any, *, global_batch_size: int, seed: int,
                        process_index: int | None = None, process_count: int | None = None,
                        num_epochs: int | None = None, shuffle: bool = True,
                        drop_remainder: bool = True, worker_count: int = 0,
                        read_options: grain.ReadOptions | None = None
                        ) -> grain.DatasetIterator:
  """An iterator of this host's training batches, checkpointable with get_state/set_state.

  Args:
    source: a random-access source (`len`, `[i]` -> {'image', 'label'}; ideally `get_batch`).
    global_batch_size: examples per step summed over all hosts; must be divisible by
      `process_count`. Each element holds ``global_batch_size // process_count`` rows.
    seed: the shuffle seed (non-negative int). Same seed -> same stream.
    process_index, process_count: this host and the number of hosts; default to
      `jax.process_index()` / `jax.process_count()`.
    num_epochs: passes over the data; None repeats forever.
    shuffle: a fresh permutation every epoch (else the source's order every epoch).
    drop_remainder: with finite `num_epochs`, drop the last incomplete global batch (else
      it is returned smaller; single host only).
    worker_count: grain worker processes (`mp_prefetch`); 0 reads in this process.
    read_options: grain thread prefetching in each process; default 1 thread, 2 batches.

  Returns:
    A grain `DatasetIterator` of {'image': uint8 [per_host, H, W, C], 'label': int32
    [per_host]}. See the module docstring for saving it with orbax.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'Need 0 <= process_index < process_count, got {process_index} and '
                     f'{process_count}.')
  if global_batch_size < 1:
    raise ValueError(f'global_batch_size must be positive, got {global_batch_size}.')
  if global_batch_size % process_count:
    lower = max(process_count, global_batch_size // process_count * process_count)
    raise ValueError(
        f'global_batch_size={global_batch_size} is not divisible by process_count='
        f'{process_count}: every host reads an equal share. Use a multiple of '
        f'{process_count} (e.g. --config.batch_size={lower}).')
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f'seed must be a non-negative integer, got {seed!r}.')
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f'num_epochs must be positive or None, got {num_epochs}.')
  if worker_count < 0:
    raise ValueError(f'worker_count must be >= 0, got {worker_count}.')
  num_records = len(source)
  if num_records == 0:
    raise ValueError(f'{source!r} has no records.')

  if num_epochs is None:
    total_positions, num_steps = None, sys.maxsize
  else:
    total_positions = num_epochs * num_records
    num_steps, remainder = divmod(total_positions, global_batch_size)
    if remainder and not drop_remainder:
      if process_count > 1:
        raise ValueError('drop_remainder=False would give hosts unequal last batches; use '
                         'drop_remainder=True with more than one process.')
      num_steps += 1
    if num_steps == 0:
      raise ValueError(
          f'{num_epochs} epoch(s) of {num_records} records do not fill one global batch of '
          f'{global_batch_size}; lower the batch size or raise num_epochs.')

  host_batch_size = global_batch_size // process_count
  read_fn = _ReadHostBatch(
      source, num_records=num_records, global_batch_size=global_batch_size,
      host_batch_size=host_batch_size, host_offset=process_index * host_batch_size,
      seed=int(seed), shuffle=shuffle, total_positions=total_positions)
  if read_options is None:
    read_options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
  dataset = grain.MapDataset.range(num_steps).map(read_fn).to_iter_dataset(read_options)
  if worker_count > 0:
    _ensure_absl_flags_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(dataset)


def _ensure_absl_flags_parsed():
  """grain 0.2.18's worker processes read an absl flag, which fails with
  UnparsedFlagAccessError outside `absl.app.run` (e.g. in pytest or a notebook); grain's own
  workaround is to mark the flags parsed (google/grain#1355, fixed upstream by #1362)."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_eval_arrays(source: Any, max_examples: int | None = None,
                     chunk_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """The first `max_examples` (default all) records as (uint8 [N, H, W, C], int32 [N]).

  For an `ArraySource` these are views of its arrays (read-only for the cached datasets).
  """
  if len(source) == 0:
    raise ValueError(f'{source!r} has no records.')
  n = len(source) if max_examples is None else min(int(max_examples), len(source))
  if n < 0:
    raise ValueError(f'max_examples must be >= 0, got {max_examples}.')
  images, labels = getattr(source, 'images', None), getattr(source, 'labels', None)
  if isinstance(images, np.ndarray) and isinstance(labels, np.ndarray):
    return images[:n], labels[:n]
  chunks = [read_batch(source, np.arange(start, min(start + chunk_size, n)))
            for start in range(0, n, chunk_size)]
  if not chunks:
    first = read_batch(source, [0])
    return first['image'][:0], first['label'][:0]
  return (np.concatenate([c['image'] for c in chunks]),
          np.concatenate([c['label'] for c in chunks]))
