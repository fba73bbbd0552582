"""Transfer: the frozen encoder scored on another labelled dataset (`evaluate --transfer`).

The kNN classifier and the linear probe are fitted on the target's training split
(`data.eval_train_split`) and tested on its test split (`data.eval_split`), exactly as the
in-domain evaluation (`evaluate.evaluate_features`), with the images read as `eval_data` reads
evaluation images: encoded images (a folder, an encoded TFDS dataset) short-side resized and
centre-cropped to the run's evaluation size, fixed-size arrays as stored, then resized to
`eval.image_size` when it is set.

Channels: an encoder sees the channels it was trained on. A 1-channel (grayscale) encoder
scores RGB target images through their luma (ITU-R 601-2, `augment.to_grayscale`, as
torchvision's grayscale); a 3-channel encoder scores grayscale images repeated over the three
channels. Other mismatches are an error. Raw pixels are the target's own pixels.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp

from ssl_jax import config_lib
from ssl_jax.data import augment, sources
from ssl_jax.evaluation import eval_data, features


class TransferError(config_lib.ConfigError):
  """The --transfer dataset cannot be read as a labelled train/test pair."""


def dataset_label(name: str) -> str:
  """The row suffix of a dataset name: 'tfds:mnist' -> 'mnist', 'folder:/data/pets/' ->
  'pets', 'fashion_mnist' -> 'fashion_mnist'."""
  for prefix in (sources.TFDS_PREFIX, sources.FOLDER_PREFIX):
    if name.startswith(prefix):
      return os.path.basename(os.path.normpath(name[len(prefix):])) or name
  return name


def _fix(config, name: str) -> str:
  d = config.data
  return (f'--transfer needs a labelled dataset with a {d.eval_train_split!r} split (fitting '
          f'the kNN bank and the probe) and a {d.eval_split!r} split (scoring): '
          f"'tfds:<name>' prepared under --config.data.data_dir (now {d.data_dir!r}), or "
          f"'folder:<path>' holding <path>/{d.eval_train_split}/<class>/<images> and "
          f'<path>/{d.eval_split}/<class>/<images>.')


def open_target(config, name: str) -> tuple[eval_data.EvalSet, eval_data.EvalSet]:
  """(bank, queries) EvalSets of dataset `name`'s training and test splits, read as the
  run's evaluation images are; a TransferError naming the fix when they cannot be."""
  d = config.data
  if not sources.is_known_name(name):
    raise TransferError(f'--transfer={name!r} is not a dataset name. {_fix(config, name)}')
  splits = {}
  for split in (d.eval_train_split, d.eval_split):
    try:
      # eval_data's reader: a folder without split sub-folders is refused rather than read as
      # every split (its test images would all be in the bank).
      source = eval_data._open_eval_source(config, name, split)  # pylint: disable=protected-access
    except (FileNotFoundError, ValueError) as e:
      raise TransferError(f'--transfer={name!r}: cannot read its {split!r} split ({e}). '
                          f'{_fix(config, name)}') from e
    if not getattr(source, 'has_labels', True):
      raise TransferError(f'--transfer={name!r}: its {split!r} split has no labels. '
                          f'{_fix(config, name)}')
    splits[split] = source
  bank, queries = splits[d.eval_train_split], splits[d.eval_split]
  bank_classes = getattr(bank, 'class_names', None)
  query_classes = getattr(queries, 'class_names', None)
  if bank_classes is not None and query_classes is not None and bank_classes != query_classes:
    raise TransferError(f'--transfer={name!r}: its {d.eval_train_split!r} and {d.eval_split!r} '
                        'splits have different classes; give both the same class folders.')
  return eval_data.make_eval_set(config, bank), eval_data.make_eval_set(config, queries)


def image_channels(eval_set: eval_data.EvalSet) -> int:
  """The channels of the images `eval_set` yields."""
  if eval_set.transform is not None:
    return eval_set.transform.channels
  return int(eval_set.source.image_shape[-1])


def encoder_channels(config, params) -> int | None:
  """The input channels that the encoder's parameters (`params['encoder']`) were built for:
  the channel count (1 or 3) whose freshly built encoder has the same parameter shapes;
  None if neither has."""
  from ssl_jax.models import build_encoder  # pylint: disable=g-import-not-at-top
  encoder = build_encoder(config.model, None)
  size = config.augment.crop_size
  wanted = jax.tree.map(jnp.shape, params['encoder'])
  for channels in (1, 3):
    shapes = jax.eval_shape(lambda c=channels: encoder.init(
        jax.random.PRNGKey(0), jnp.zeros((1, size, size, c)), train=False))['params']
    if jax.tree.map(lambda s: s.shape, shapes) == wanted:
      return channels
  return None


def convert_channels(images, channels: int):
  """Float images [B, H, W, C] with `channels` channels: RGB -> luma for 1, grayscale
  repeated for 3 (the module docstring)."""
  have = images.shape[-1]
  if have == channels:
    return images
  if have == 3 and channels == 1:
    return augment.to_grayscale(images)
  if have == 1 and channels == 3:
    return jnp.repeat(images, 3, axis=-1)
  raise TransferError(f'The encoder reads {channels}-channel images; the --transfer images '
                      f'have {have} channels, which have no conversion to them.')


def adapted_encoder(encode_fn: features.FrozenEncoder, config,
                    target_channels: int) -> features.FrozenEncoder:
  """`encode_fn` fed the target's images converted to the encoder's channels."""
  params = encode_fn.variables[0]
  channels = encoder_channels(config, params) or target_channels
  if channels == target_channels:
    return encode_fn
  convert_channels(jnp.zeros((1, 1, 1, target_channels)), channels)  # an error, now if any
  apply = encode_fn.apply
  return features.FrozenEncoder(lambda v, x: apply(v, convert_channels(x, channels)),
                                encode_fn.variables, encode_fn.compiler_options)


def check_request(config, name: str, evals) -> None:
  """A TransferError now, naming the fix, if `name` cannot be read or `evals` has neither
  'knn' nor 'linear'."""
  _check_evals(evals)
  open_target(config, name)


def _check_evals(evals) -> None:
  if not any(e in evals for e in ('knn', 'linear')):
    raise TransferError('--transfer scores the kNN classifier and the linear probe: include '
                        'knn or linear in --evals.')


def transfer_rows(config, encoders: dict[str, Callable], name: str, evals, *,
                  raw_pixels: Callable, bank_size: int = 0, test_size: int = 0, seed: int = 0,
                  mesh=None) -> dict:
  """{'<encoder> -> <dataset>': kNN and/or linear-probe results} on dataset `name` for each
  of `encoders` (FrozenEncoders, or the `raw_pixels` function); `evals` chooses among 'knn'
  and 'linear'; `bank_size`/`test_size` limit the target's splits as --bank_size and
  --test_size do."""
  from ssl_jax import evaluate  # pylint: disable=g-import-not-at-top  (evaluate imports us)
  _check_evals(evals)  # open_target below raises what check_request would for the dataset
  wanted = [e for e in ('knn', 'linear') if e in evals]
  e = config.eval
  bank, queries = open_target(config, name)
  bank, queries = bank.limited(bank_size), queries.limited(test_size)
  target_channels = image_channels(bank)
  label = dataset_label(name)
  rows = {}
  for encoder_name, encode_fn in encoders.items():
    raw = encode_fn is raw_pixels
    if raw and bank.image_dims > eval_data.MAX_RAW_PIXEL_DIMS:
      continue
    if not raw:
      encode_fn = adapted_encoder(encode_fn, config, target_channels)
    extract = lambda s, f=encode_fn, r=raw: eval_data.stream_features(
        f, s, e.batch_size, e.image_size or None, mesh if not r else None, raw_pixels=r)
    train, test = extract(bank), extract(queries)
    num_classes = int(max(train[1].max(), test[1].max()) + 1)
    rows[f'{encoder_name} -> {label}'] = evaluate.evaluate_features(
        train, test, wanted, knn_k=min(e.knn_k, len(train[1])),
        knn_temperature=e.knn_temperature, seed=seed, num_classes=num_classes)
  return rows

