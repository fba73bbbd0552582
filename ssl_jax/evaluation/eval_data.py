"""Which images evaluation reads, and reading them batch by batch into features.

Training may run on unlabelled images (a flat folder, stl10's 'unlabelled' split). The
label-based evaluations (kNN, probes) read a labelled *bank* (`data.eval_train_split`) and
*queries* (`data.eval_split`) of `data.eval_name` (default: the training dataset); the
label-free diagnostics read the queries, or the training images when there are none.
`plan(config)` resolves these once: with no labelled source the label-based evaluations are
off with the reason said once in the log, unless `data.eval_name` asks for one explicitly, in
which case a source without labels is an error naming the fix.

Features are extracted batch by batch through the input pipeline with the evaluation
transform (encoded images: short side resized, central crop), batch-sharded over the devices
(each host reading its rows), and only the features are kept: an ImageNet bank is N x D
floats, never N images.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Iterator

import numpy as np
from absl import logging

from ssl_jax import config_lib, parallel
from ssl_jax.data import folder, pipeline, sources
from ssl_jax.evaluation import features

# Raw pixels as a kNN baseline only for images up to this many values (Fashion-MNIST 784,
# CIFAR 3072); at 224 pixels a bank of raw images is what streaming avoids holding.
MAX_RAW_PIXEL_DIMS = 16384


class EvaluationConfigError(config_lib.ConfigError):
  """A label-based evaluation was asked for on images without labels."""


@dataclasses.dataclass(frozen=True, eq=False)
class EvalSet:
  """The records `records` of `source` (record indices, in order), as evaluation reads them."""
  source: Any
  records: np.ndarray
  transform: pipeline.EvalTransform | None  # None: images as stored
  worker_count: int = 0
  skip_corrupt: bool = True

  @property
  def num_examples(self) -> int:
    return len(self.records)

  def batches(self, batch_size: int, *, this_host_only: bool = False
              ) -> Iterator[dict[str, np.ndarray]]:
    """Padded batches with a 'valid' mask; each host reads its rows of every global batch
    unless `this_host_only` (then this process reads every row)."""
    hosts = dict(process_index=0, process_count=1) if this_host_only else {}
    return pipeline.make_eval_iterator(
        self.source, global_batch_size=batch_size, records=self.records,
        transform=self.transform, worker_count=self.worker_count,
        skip_corrupt=self.skip_corrupt, **hosts)

  def arrays(self, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images, labels) of the valid records in memory: for small sets (diagnostics)."""
    return pipeline.valid_rows(self.batches(batch_size, this_host_only=True))

  @property
  def image_dims(self) -> int:
    if self.transform is not None:
      return self.transform.crop_size ** 2 * self.transform.channels
    return int(np.prod(self.source.image_shape))

  def limited(self, num_examples: int | None) -> 'EvalSet':
    """At most `num_examples` of the records, spread evenly over them
    (`pipeline.spread_indices`: a folder's records are sorted by class)."""
    if not num_examples or num_examples >= self.num_examples:
      return self
    keep = pipeline.spread_indices(self.num_examples, num_examples)
    return dataclasses.replace(self, records=self.records[keep])


@dataclasses.dataclass(frozen=True)
class EvalPlan:
  bank: EvalSet | None         # labelled kNN bank / probe training set; None: label-based off
  queries: EvalSet | None      # labelled queries; None with bank
  diagnostics: EvalSet         # label-free diagnostics images (labels may be -1)
  off_reason: str | None       # why the label-based evaluations are off
  class_names: tuple[str, ...] | None

  @property
  def labelled(self) -> bool:
    return self.bank is not None


def eval_transform(config, source) -> pipeline.EvalTransform | None:
  """Short side to `eval.resize_size` (0: crop x 256/224), central `eval.image_size` (0: the
  training crop) for encoded sources; None (images as stored) for the others."""
  if not getattr(source, 'encoded', False):
    return None
  crop = config.eval.image_size or config.augment.crop_size
  resize = config.eval.get('resize_size', 0) or round(crop * 256 / 224)
  return pipeline.EvalTransform(resize, crop, source.channels)


def worker_count(config, source) -> int:
  """data.worker_count, where -1 (auto) means processes for decoded images only."""
  count = config.data.get('worker_count', 0)
  if count >= 0:
    return count
  return default_worker_count() if getattr(source, 'encoded', False) else 0


def default_worker_count() -> int:
  import os  # pylint: disable=g-import-not-at-top
  return max(1, min(16, (os.cpu_count() or 2) - 1))


def make_eval_set(config, source, num_examples: int | None = None) -> EvalSet:
  """`num_examples` records of `source` spread over it (all by default), read as `config`
  says (evaluation transform, workers, skip_corrupt)."""
  return EvalSet(source, pipeline.spread_indices(len(source), num_examples),
                 eval_transform(config, source), worker_count(config, source),
                 config.data.get('skip_corrupt', True))


def _open_eval_source(config, name: str, split: str):
  d = config.data
  if name.startswith(sources.FOLDER_PREFIX):
    # A folder without split sub-folders serves as the training split only: evaluating on
    # the training images would put every query in the bank.
    root = pathlib.Path(name[len(sources.FOLDER_PREFIX):]).expanduser()
    if not root.is_absolute() and d.data_dir:
      root = pathlib.Path(d.data_dir).expanduser() / root  # as get_source resolves it
    if folder.resolved_folder(root, split) == root:
      raise FileNotFoundError(f'{root} has no {split!r} sub-folder')
  return sources.get_source(name, split, data_dir=d.data_dir, download=d.download,
                            text=config.get('text'))


def plan(config, train_source=None) -> EvalPlan:
  """Resolves the evaluation sources of `config` (see the module docstring)."""
  d = config.data
  explicit = bool(d.get('eval_name', ''))
  name = d.get('eval_name', '') or d.name
  problem, bank, queries = None, None, None
  try:
    bank = _open_eval_source(config, name, d.eval_train_split)
    queries = _open_eval_source(config, name, d.eval_split)
  except (FileNotFoundError, ValueError) as e:
    problem = f'there are no evaluation images with labels ({e})'
  if problem is None:
    unlabelled = [f'{what} ({s.describe(0) if hasattr(s, "describe") else s!r})'
                  for what, s in (('bank', bank), ('queries', queries))
                  if not getattr(s, 'has_labels', True)]
    if unlabelled:
      problem = f'the evaluation images have no labels: {", ".join(unlabelled)}'
  if problem is not None:
    fix = (f'Point --config.data.eval_name at a labelled dataset (e.g. folder:<path> with '
           f'class sub-folders, or tfds:<name>) whose splits --config.data.eval_train_split '
           f'(now {d.eval_train_split!r}, the kNN bank) and --config.data.eval_split (now '
           f'{d.eval_split!r}, the queries) exist.')
    if explicit:
      raise EvaluationConfigError(
          f'data.eval_name={name!r} asks for label-based evaluation, but {problem}. {fix}')
    if train_source is None:
      train_source = sources.get_source(d.name, d.train_split, data_dir=d.data_dir,
                                        download=d.download, text=config.get('text'))
    diagnostics = make_eval_set(config, train_source, config.eval.diagnostics_size)
    return EvalPlan(None, None, diagnostics, f'{problem}. {fix}', None)
  bank_classes = getattr(bank, 'class_names', None)
  query_classes = getattr(queries, 'class_names', None)
  if bank_classes is not None and query_classes is not None and bank_classes != query_classes:
    # A folder's class index is its position among the split's class folders: with other
    # folders the queries' labels would not mean the bank's classes.
    raise EvaluationConfigError(
        f'The kNN bank ({d.eval_train_split!r}) and the queries ({d.eval_split!r}) of {name!r} '
        f'have different classes ({len(bank_classes)} and {len(query_classes)}; e.g. '
        f'{sorted(set(bank_classes) ^ set(query_classes))[:3]} in only one): give both '
        'splits the same class folders (an empty folder keeps a class in place).')
  return EvalPlan(make_eval_set(config, bank), make_eval_set(config, queries),
                  make_eval_set(config, queries, config.eval.diagnostics_size), None,
                  getattr(bank, 'class_names', None))


def announce(evaluation_plan: EvalPlan) -> None:
  """Says once in the log that the label-based evaluations are off, and why."""
  if not evaluation_plan.labelled:
    logging.warning('Label-based evaluation (kNN, probes) is off: %s The label-free '
                    'diagnostics still run.', evaluation_plan.off_reason)


def stream_features(encode_fn: Callable, eval_set: EvalSet, batch_size: int,
                    image_size: int | None = None, mesh=None, raw_pixels: bool = False
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(features [N, D], labels [N]) of `eval_set`, extracted batch by batch.

  With a `mesh`, every batch is sharded over its devices (each host reading its rows) and
  the features gathered to every host; `batch_size` must then divide by the devices. Without
  one, this process reads every row and encodes on its default device. `raw_pixels` returns
  the flattened images in [0, 1] instead (the raw-pixel baseline).
  """
  distributed = mesh is not None and not raw_pixels
  if raw_pixels:
    encode = lambda x: features.raw_pixel_features(np.asarray(x))
  else:
    apply, variables, options = features.encoder_parts(encode_fn,
                                                       mesh if distributed else None)
  if not raw_pixels and not distributed:
    local_encode = features.jitted_encoder(apply, image_size, options)
    encode = lambda x: local_encode(variables, x)
  elif distributed:
    # Labels and the padding mask come back replicated with the features: each host read
    # only its rows of them.
    sharded_encode = features.jitted_encoder(apply, image_size, options,
                                             out_shardings=parallel.replicated(mesh))
  outputs, labels = [], []
  for batch in eval_set.batches(batch_size, this_host_only=not distributed):
    if distributed:
      out, batch_labels, valid = (np.asarray(x) for x in sharded_encode(
          variables, *parallel.global_batch_from_host(
              (batch['image'], batch['label'], batch['valid']), mesh)))
    else:
      out = np.asarray(encode(batch['image']))
      batch_labels, valid = batch['label'], batch['valid']
    outputs.append(out[valid])
    labels.append(np.asarray(batch_labels)[valid])
  return np.concatenate(outputs), np.concatenate(labels)


def population_batches(eval_set: EvalSet, batch_size: int, num_batches: int
                       ) -> Iterator[np.ndarray]:
  """The first `num_batches` full uint8 batches of `eval_set`, read by this process (every
  host computes the same statistics from the same images). A last, smaller batch is dropped
  unless it is the only one (a set smaller than one batch)."""
  limited = eval_set.limited(batch_size * num_batches)
  yielded = False
  for batch in limited.batches(batch_size, this_host_only=True):
    images = batch['image'][batch['valid']]
    if len(images) == batch_size or not yielded:
      yielded = True
      yield images
