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

Encoded, variable-size images (folders, ImageNet) cannot be batched as stored: for those the
graph is per example, ``grain.MapDataset.range(host examples).map(crop_example)
.batch(b)``, where ``crop_example`` reads the record at the example's stream position,
decodes it and cuts one random-resized crop per view (`host_crop`), the randomness of view v
drawn from (seed, position, v) alone. One element is still one host batch, now of fixed-size
views, and the iterator state is the same kind of position, so everything below holds for
both. `make_eval_iterator` reads evaluation batches the same way, in order, padded at the
end, with the evaluation transform (short-side resize, central crop) for encoded images.

Every training batch carries 'index', int32 [n]: each row's record index in the source (for
methods that keep per-example state, as DeepCluster-v2's memory bank; `Method.paired_inputs`
asks for it like any other input). A batch that crosses an epoch boundary may hold a record
twice.

Image-caption sources (`ssl_jax.data.captions`) add 'texts' (int32 [K, L] a record) to
their records; every batch of such a source carries it, int32 [n, K, L], row for row with
its images (a skipped image's row has its replacement's texts; an invalid evaluation row
zeros). Image-only sources' batches are unchanged.

Checkpointing the iterator with orbax
-------------------------------------
`make_train_iterator` returns a `StepIterator`, a grain ``DatasetIterator`` whose state is
``{'next_index': step}`` (the number of batches handed out), with or without worker
processes: batch k is a pure function of k, and restoring starts the pipeline again at k.
grain ships an orbax handler, ``grain.checkpoint.CheckpointHandler``, with the arguments
``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore`` registered for it, so it goes
into a ``Composite`` next to the model state; each host writes its own
``process_<i>-of-<n>.json``::

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
ahead of the training step by the buffer length. Restore with the same seed, batch size and
source; because ``next_index`` is just the step, any number of worker processes or hosts
continues the same stream.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, Iterator, NamedTuple, Sequence

import grain
import numpy as np
from absl import logging

from ssl_jax import config_lib
from ssl_jax.data import host_crop

__all__ = ['EvalTransform', 'StepIterator', 'make_eval_arrays', 'make_eval_iterator',
           'make_train_iterator', 'read_batch', 'spread_indices', 'valid_rows']


def read_batch(source: Any, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
  """{'image': uint8 [n, H, W, C], 'label': int32 [n]} for the given record indices (and
  'texts': int32 [n, K, L] when the records have texts).

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
  batch = {'image': np.stack(images),
           'label': np.array([int(r['label']) for r in records], np.int32)}
  if records and 'texts' in records[0]:
    batch['texts'] = np.stack([np.asarray(r['texts'], np.int32) for r in records])
  return batch


def _host_position(layout, element: int) -> int:
  """Position in the global stream of this host's `element`-th example (row-major over its
  batches), for a `layout` with global_batch_size, host_batch_size and host_offset."""
  step, row = divmod(element, layout.host_batch_size)
  return step * layout.global_batch_size + layout.host_offset + row


class _StreamOrder:
  """Where each position of the example stream comes from (picklable, for grain workers).

  Position p of the stream is record ``permutation(p // N)[p % N]``; host h's rows of global
  batch t are positions ``[t * B + h * b, t * B + (h + 1) * b)``.
  """

  def __init__(self, *, num_records: int, global_batch_size: int, host_batch_size: int,
               host_offset: int, seed: int, shuffle: bool, total_positions: int | None):
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

  def host_positions(self, step: int) -> np.ndarray:
    """Stream positions of this host's rows of global batch `step`."""
    start = step * self.global_batch_size + self.host_offset
    stop = start + self.host_batch_size
    if self.total_positions is not None:
      stop = min(stop, self.total_positions)
    return np.arange(start, stop, dtype=np.int64)

  def position(self, element: int) -> int:
    return _host_position(self, element)

  def records(self, positions: np.ndarray) -> np.ndarray:
    """Record indices at stream `positions`."""
    positions = np.asarray(positions, np.int64)
    epochs, within = np.divmod(positions, self.num_records)
    out = np.empty_like(positions)
    for epoch in range(int(epochs.min()), int(epochs.max()) + 1):
      mask = epochs == epoch
      out[mask] = self.permutation(epoch)[within[mask]]
    return out

  def indices(self, step: int) -> np.ndarray:
    """Record indices of this host's rows of global batch `step`."""
    return self.records(self.host_positions(step))


class _ReadHostBatch:
  """Step t -> this host's rows of global batch t, with one vectorised read."""

  def __init__(self, source, order: _StreamOrder):
    self.source, self.order = source, order

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    indices = self.order.indices(int(step))
    return dict(read_batch(self.source, indices), index=indices.astype(np.int32))


# A file that cannot be read (OSError) or decoded.
_UNREADABLE = (host_crop.ImageDecodeError, OSError)

# Consecutive undecodable images after which a run stops even with data.skip_corrupt: a
# mounted-but-empty disk or a wrong format looks like this, not like a few bad files.
MAX_CONSECUTIVE_CORRUPT = 64


class _CropExample:
  """This host's `element`-th example -> {'views', 'label', 'skipped', 'index'} (+ 'texts'
  for a caption source; 'texts', 'label' and 'index' are those of the record whose image was
  cropped, the replacement's for a skipped image): the record at its
  stream position decoded and cropped once per view (`host_crop`), each view's randomness
  from (seed, position, view) only, so any number of hosts or workers, and a resumed run,
  make the same views.

  An image that cannot be decoded is replaced by the record at the next stream position
  (deterministic, so the batch is the same for any number of workers) after a warning that
  names it; 'skipped' counts the replacements. With `skip_corrupt=False` it is an error.
  """

  def __init__(self, source, order: _StreamOrder, specs, *, channels: int,
               skip_corrupt: bool):
    self.source, self.order, self.specs = source, order, tuple(specs)
    self.channels, self.skip_corrupt = channels, skip_corrupt

  def __call__(self, element: int) -> dict[str, Any]:
    position = self.order.position(int(element))
    skipped = 0
    while True:
      index = int(self.order.records([position + skipped])[0])
      try:
        record = self.source[index]
        image = host_crop.decode_image(record['image'], self.channels)
        break
      except _UNREADABLE as e:
        problem = _corrupt(self.source, index, e, self.skip_corrupt)
        skipped += 1
        if skipped >= MAX_CONSECUTIVE_CORRUPT:
          raise config_lib.DataError(
              f'{skipped} consecutive images could not be decoded, the last: {problem}. '
              'That is not a few bad files: check the path and the files\' format.') from e
    views = host_crop.random_views(image, self.specs, self.order.seed, position)
    example = {'views': views, 'label': np.int32(record['label']),
               'skipped': np.int32(skipped), 'index': np.int32(index)}
    if 'texts' in record:  # the replacement's captions when the image was skipped
      example['texts'] = np.asarray(record['texts'], np.int32)
    return example


def _corrupt(source, index: int, error: Exception, skip: bool) -> str:
  """Warns about (or, unless `skip`, raises for) an image that cannot be decoded."""
  describe = getattr(source, 'describe', None)
  what = f'{describe(index) if describe else f"record {index} of {source!r}"}: {error}'
  if not skip:
    raise config_lib.DataError(
        f'Cannot decode {what}. Remove or replace the file, or set '
        '--config.data.skip_corrupt=True to skip such images with a warning.') from error
  # Once per file and process: a bad file comes round every epoch; the count says how often.
  if what not in _WARNED:
    _WARNED.add(what)
    logging.warning('Skipping an image that cannot be decoded (it is replaced by the next '
                    'image; the count is reported): %s', what)
  return what


_WARNED: set[str] = set()


def make_train_iterator(source: Any, *, global_batch_size: int, seed: int,
                        process_index: int | None = None, process_count: int | None = None,
                        num_epochs: int | None = None, shuffle: bool = True,
                        drop_remainder: bool = True, worker_count: int = 0,
                        read_options: grain.ReadOptions | None = None,
                        crop_specs: Sequence[host_crop.CropSpec] | None = None,
                        channels: int = 3, skip_corrupt: bool = True
                        ) -> 'StepIterator':
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
    read_options: grain thread prefetching in each process; default 1 thread, 2 batches
      (with `crop_specs`: the host's cores shared out between the processes, since Pillow
      releases the GIL).
    crop_specs: for encoded, variable-size images (`source.encoded`): the views to crop on
      the host from each decoded image (`host_crop.crop_specs`). None reads the images as
      stored, for the devices to crop.
    channels: with `crop_specs`, the decoded images' channels (3: RGB, 1: luma).
    skip_corrupt: with `crop_specs`, replace an image that cannot be decoded by the next
      one, with a warning naming it (else raise).

  Returns:
    A `StepIterator` (a grain DatasetIterator) of {'image': uint8 [per_host, H, W, C],
    'label': int32 [per_host], 'index': int32 [per_host]}, or with `crop_specs` of
    {'views': (uint8 [per_host, s, s, C] per view), 'label', 'index', 'skipped': int32
    [per_host]} ('index': each row's record index in the source; 'skipped': how many
    undecodable images each row replaced); caption sources add 'texts': int32
    [per_host, K, L]. See the module docstring for saving it with orbax.
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
  order = _StreamOrder(
      num_records=num_records, global_batch_size=global_batch_size,
      host_batch_size=host_batch_size, host_offset=process_index * host_batch_size,
      seed=int(seed), shuffle=shuffle, total_positions=total_positions)
  if crop_specs is None:
    if getattr(source, 'encoded', False):
      raise ValueError(f'{source!r} holds encoded images of varying size: pass crop_specs '
                       'to decode and crop them on the host.')
    if read_options is None:
      read_options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
    read_fn = _ReadHostBatch(source, order)

    def batches_from(step: int) -> grain.MapDataset:
      return grain.MapDataset.range(step, num_steps).map(read_fn)
  else:
    if read_options is None:
      read_options = _decode_read_options(worker_count)
    crop = _CropExample(source, order, crop_specs, channels=channels,
                        skip_corrupt=skip_corrupt)
    if total_positions is None:
      num_elements = sys.maxsize // host_batch_size * host_batch_size
    else:  # single host when the last batch is partial
      num_elements = num_steps * host_batch_size if drop_remainder else total_positions

    def batches_from(step: int) -> grain.MapDataset:
      # Batched before grain's prefetch and workers: one element is one host batch, so the
      # batches are the same for any number of workers.
      return grain.MapDataset.range(step * host_batch_size, num_elements).map(crop).batch(
          host_batch_size)

  def iter_dataset_from(step: int) -> grain.IterDataset:
    dataset = batches_from(step).to_iter_dataset(read_options)
    if worker_count > 0:
      _ensure_absl_flags_parsed()
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return dataset

  return StepIterator(iter_dataset_from)


class StepIterator(grain.DatasetIterator):
  """Batches from a step on, whose checkpointed state is only that step: {'next_index': k}.

  Batch k is a pure function of k (and the pipeline's arguments), so the step is all a resumed
  run needs; grain's own iterator state with worker processes holds one entry per worker and
  cannot be restored under another worker count (a machine with other cores). `set_state`
  starts the pipeline again at the restored step. grain's orbax handler saves it like any
  grain iterator.
  """

  def __init__(self, iter_dataset_from, start: int = 0):
    super().__init__()
    self._iter_dataset_from = iter_dataset_from
    self._next_index = start
    self._iterator = None

  def _started(self):
    if self._iterator is None:
      self._iterator = iter(self._iter_dataset_from(self._next_index))
    return self._iterator

  def __next__(self):
    batch = next(self._started())
    self._next_index += 1
    return batch

  def get_state(self) -> dict[str, int]:
    return {'next_index': self._next_index}

  def set_state(self, state: dict[str, int]) -> None:
    self.close()
    self._next_index = int(state['next_index'])

  def start_prefetch(self) -> None:
    self._started()

  def close(self) -> None:
    if self._iterator is not None:
      close = getattr(self._iterator, 'close', None)
      if close is not None:
        close()
      self._iterator = None


def _decode_read_options(worker_count: int) -> grain.ReadOptions:
  """Prefetching for pipelines that decode images: each element is a whole host batch, read
  by one thread (Pillow releases the GIL, so threads decode batches in parallel); the host's
  cores are shared out between the worker processes (or all go to this process without
  workers), and each process buffers as many batches as it has threads, no more: a batch of
  224-pixel views is ~300 KB per example."""
  threads = max(1, (os.cpu_count() or 1) // max(1, worker_count))
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads)


def _ensure_absl_flags_parsed():
  """grain 0.2.18's worker processes read an absl flag, which fails with
  UnparsedFlagAccessError outside `absl.app.run` (e.g. in pytest or a notebook); grain's own
  workaround is to mark the flags parsed (google/grain#1355, fixed upstream by #1362)."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class EvalTransform(NamedTuple):
  """The evaluation transform of encoded, variable-size images: the short side resized to
  `resize_size`, then the central `crop_size` square (256 / 224 at ImageNet)."""
  resize_size: int
  crop_size: int
  channels: int = 3


class _EvalGeometry(NamedTuple):
  records: np.ndarray  # the record index at each position
  global_batch_size: int
  host_batch_size: int
  host_offset: int

  def position(self, element: int) -> int:
    return _host_position(self, element)


class _ReadEvalBatch:
  """Step t -> this host's rows of evaluation batch t, padded past the last example."""

  def __init__(self, source, geometry: _EvalGeometry):
    self.source, self.geometry = source, geometry

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    g = self.geometry
    positions = g.position(int(step) * g.host_batch_size) + np.arange(g.host_batch_size)
    valid = positions < len(g.records)
    batch = read_batch(self.source, g.records[np.minimum(positions, len(g.records) - 1)])
    return dict(batch, valid=valid)


class _EvalExample:
  """This host's `element`-th evaluation example, decoded and centre-cropped; rows past the
  last example, and images that cannot be decoded (with a warning), are invalid zeros.
  A caption source's examples carry 'texts' (zeros in invalid rows: the shape comes from
  its ``text_spec``, so every row of a batch has the key)."""

  def __init__(self, source, geometry: _EvalGeometry, transform: EvalTransform,
               skip_corrupt: bool):
    self.source, self.geometry, self.transform = source, geometry, transform
    self.skip_corrupt = skip_corrupt
    spec = getattr(source, 'text_spec', None)
    self.texts_shape = (None if spec is None
                        else (spec.captions_per_image, spec.context_length))

  def _invalid(self, image: np.ndarray) -> dict[str, Any]:
    example = {'image': image, 'label': np.int32(-1), 'valid': False}
    if self.texts_shape is not None:
      example['texts'] = np.zeros(self.texts_shape, np.int32)
    return example

  def __call__(self, element: int) -> dict[str, Any]:
    position = self.geometry.position(int(element))
    t = self.transform
    image = np.zeros((t.crop_size, t.crop_size, t.channels), np.uint8)
    if position >= len(self.geometry.records):
      return self._invalid(image)
    index = int(self.geometry.records[position])
    try:
      record = self.source[index]
      decoded = host_crop.decode_image(record['image'], t.channels)
    except _UNREADABLE as e:
      _corrupt(self.source, index, e, self.skip_corrupt)
      return self._invalid(image)
    example = {'image': host_crop.center_crop(decoded, t.resize_size, t.crop_size),
               'label': np.int32(record['label']), 'valid': True}
    if self.texts_shape is not None:
      example['texts'] = np.asarray(record['texts'], np.int32)
    return example


def spread_indices(num_records: int, num_examples: int | None) -> np.ndarray:
  """`num_examples` record indices spread evenly over `num_records` (all of them by default).

  Evaluation subsets are spread rather than the first N: a folder's records are sorted by
  class, so its first 10,000 ImageNet images hold 8 of the 1,000 classes."""
  n = num_records if not num_examples else min(int(num_examples), num_records)
  return np.arange(n, dtype=np.int64) * num_records // max(n, 1)


def make_eval_iterator(source: Any, *, global_batch_size: int,
                       records: Sequence[int] | np.ndarray | None = None,
                       transform: EvalTransform | None = None,
                       process_index: int | None = None, process_count: int | None = None,
                       worker_count: int = 0, skip_corrupt: bool = True
                       ) -> Iterator[dict[str, np.ndarray]]:
  """This host's rows of each evaluation batch over `records` (record indices, in order;
  default every record), for feature extraction that keeps only the features.

  Global batch t holds positions ``[t * B, (t + 1) * B)`` of `records`; host h reads rows
  ``[h * B / P, (h + 1) * B / P)`` of it, as in training. The last batch is padded: every
  element is {'image': uint8 [B / P, ...], 'label': int32 [B / P], 'valid': bool [B / P]},
  'valid' marking the real rows (undecodable images are invalid too, with a warning, unless
  `skip_corrupt` is False). Encoded sources need `transform`; for the others images come as
  stored.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f'The evaluation batch size {global_batch_size} must be a positive '
                     f'multiple of the {process_count} processes (--config.eval.batch_size).')
  records = (np.arange(len(source), dtype=np.int64) if records is None
             else np.asarray(records, np.int64))
  if len(records) == 0:
    raise ValueError(f'{source!r} has no records to evaluate on.')
  host_batch_size = global_batch_size // process_count
  geometry = _EvalGeometry(records, global_batch_size, host_batch_size,
                           process_index * host_batch_size)
  num_steps = -(-len(records) // global_batch_size)
  if getattr(source, 'encoded', False):
    if transform is None:
      raise ValueError(f'{source!r} holds encoded images of varying size: evaluation needs '
                       'an EvalTransform to decode and centre-crop them.')
    example = _EvalExample(source, geometry, transform, skip_corrupt)
    dataset = grain.MapDataset.range(num_steps * host_batch_size).map(example)
    dataset = dataset.batch(host_batch_size)
    read_options = _decode_read_options(worker_count)
  else:
    dataset = grain.MapDataset.range(num_steps).map(_ReadEvalBatch(source, geometry))
    read_options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
  dataset = dataset.to_iter_dataset(read_options)
  if worker_count > 0:
    _ensure_absl_flags_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(dataset)


def make_eval_arrays(source: Any, max_examples: int | None = None,
                     chunk_size: int = 4096, transform: EvalTransform | None = None,
                     *, with_texts: bool = False) -> tuple[np.ndarray, ...]:
  """The first `max_examples` (default all) records as (uint8 [N, H, W, C], int32 [N]), in
  this process's memory: for small sets only (diagnostics images, tests). Encoded sources
  need `transform`; undecodable images are left out.

  For an `ArraySource` these are views of its arrays (read-only for the cached datasets).
  ``with_texts=True`` (caption sources) adds a third array, 'texts' int32 [N, K, L].
  """
  if with_texts and getattr(source, 'text_spec', None) is None:
    raise ValueError(f'{source!r} has no captions (no text_spec): with_texts=True needs a '
                     'caption source (ssl_jax.data.captions).')
  if len(source) == 0:
    raise ValueError(f'{source!r} has no records.')
  n = len(source) if max_examples is None else min(int(max_examples), len(source))
  if n < 0:
    raise ValueError(f'max_examples must be >= 0, got {max_examples}.')
  images, labels = getattr(source, 'images', None), getattr(source, 'labels', None)
  if isinstance(images, np.ndarray) and isinstance(labels, np.ndarray):
    return images[:n], labels[:n]
  if n == 0:
    first = next(make_eval_iterator(source, global_batch_size=1, records=[0],
                                    transform=transform, process_index=0, process_count=1))
    keys = ('image', 'label', 'texts') if with_texts else ('image', 'label')
    return tuple(first[k][:0] for k in keys)
  return valid_rows(make_eval_iterator(source, global_batch_size=min(chunk_size, n),
                                       records=np.arange(n), transform=transform,
                                       process_index=0, process_count=1),
                    with_texts=with_texts)


def valid_rows(batches, *, with_texts: bool = False) -> tuple[np.ndarray, ...]:
  """(images, labels) of the valid rows of evaluation batches, concatenated (and texts,
  with ``with_texts=True``)."""
  chunks = list(batches)
  valid = np.concatenate([c['valid'] for c in chunks])
  keys = ('image', 'label', 'texts') if with_texts else ('image', 'label')
  return tuple(np.concatenate([c[k] for c in chunks])[valid] for k in keys)
