"""Population BatchNorm statistics for the random-init baseline.

A freshly initialised network holds BatchNorm running statistics of mean 0 and variance 1,
which have nothing to do with the activations its layers see; scored in inference mode, its
features then depend on how far each layer's true statistics happen to sit from (0, 1), which
changes with the seed. Before the random-init encoder is scored, `refreshed_frozen_encoder`
replaces those statistics with the population statistics of each BatchNorm layer's input:
the encoder runs in training mode (every layer normalised by its batch's statistics, as during
training) over `config.eval.bn_refresh_batches` batches of `config.eval.batch_size` training
images, preprocessed exactly as evaluation preprocesses them (read batch by batch), and each
layer's mean and (biased) variance over all those inputs are stored. They are exact over the K batches (the mean of the
per-batch means; the mean of the per-batch variances plus the variance of the per-batch
means), not an exponential moving average that would still carry 0.9^K of the initial
values. The weights are untouched.

Only the baseline is refreshed: a trained encoder is scored with the statistics its training
produced. The refreshed baseline scores lower than the unrefreshed one, and its kNN still
moves with the seed through the random weights (README, "Evaluating a trained encoder").

Every method's network has an `encoder` submodule built by
`ssl_jax.models.build_encoder(config.model, axis_name)`, whose parameters and statistics sit
under the 'encoder' key, and every method's `encode` is that submodule in inference mode
(tests/test_bn_refresh.py checks this for every registered method); the refresh runs that
submodule alone.
"""

from __future__ import annotations

from typing import Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax.evaluation import features
from ssl_jax.methods import evaluated_variables


def _batch_moments(module: nn.Module, variables, images):
  """{BatchNorm path: (mean, variance)} of every BatchNorm layer's input, in training mode,
  over this batch (float32, biased variance, reduced over all but the feature axes)."""
  moments = {}

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm) and context.method_name == '__call__':
      bn = context.module
      x = jnp.asarray(args[0], jnp.float32)
      feature_axes = {a % x.ndim for a in
                      (bn.axis if isinstance(bn.axis, tuple) else (bn.axis,))}
      reduce = tuple(a for a in range(x.ndim) if a not in feature_axes)
      mean = x.mean(axis=reduce)
      var = jnp.square(x - jnp.expand_dims(mean, reduce)).mean(axis=reduce)
      moments[tuple(bn.path)] = (mean, var)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    module.apply(variables, images, train=True, mutable=['batch_stats'])
  return moments


def population_statistics(module: nn.Module, variables, batches: Iterable) -> dict:
  """{BatchNorm path: (mean, var)}, float64: the mean and biased variance of each BatchNorm
  layer's input over all images of `batches` (float image arrays, the module's input), with
  `module` in training mode. Batches may differ in size; each image counts once."""
  moments_fn = jax.jit(lambda v, x: _batch_moments(module, v, x))
  sums, total = {}, 0
  for batch in batches:
    n = batch.shape[0]
    for path, (mean, var) in jax.device_get(moments_fn(variables, batch)).items():
      mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
      s = sums.setdefault(path, [0.0, 0.0])
      s[0] = s[0] + n * mean               # sum of x
      s[1] = s[1] + n * (var + mean ** 2)  # sum of x^2, from centred moments (no cancellation
      #                                      within a batch)
    total += n
  if not total:
    raise ValueError('population_statistics needs at least one batch.')
  stats = {}
  for path, (sum_x, sum_x2) in sums.items():
    mean = sum_x / total
    stats[path] = (mean, np.maximum(sum_x2 / total - mean ** 2, 0.0))
  return stats


def replace_statistics(batch_stats, stats: dict):
  """`batch_stats` (the module's 'batch_stats' collection) with each BatchNorm's 'mean' and
  'var' replaced by `stats` (paths as `population_statistics` returns them)."""
  def copy(tree):  # nested dicts, so that the caller's tree is left as it was
    return {k: copy(v) if hasattr(v, 'items') else v for k, v in tree.items()}

  batch_stats = copy(batch_stats)
  for path, (mean, var) in stats.items():
    node = batch_stats
    for name in path:
      if name not in node:
        raise KeyError(f'BatchNorm {"/".join(path)} has no statistics in batch_stats.')
      node = node[name]
    node['mean'] = jnp.asarray(mean, node['mean'].dtype).reshape(node['mean'].shape)
    node['var'] = jnp.asarray(var, node['var'].dtype).reshape(node['var'].shape)
  return batch_stats


def _refresh_set(config):
  """The training images the refresh reads (evaluation transform), as an EvalSet."""
  from ssl_jax.data import sources  # pylint: disable=g-import-not-at-top
  from ssl_jax.evaluation import eval_data  # pylint: disable=g-import-not-at-top
  d = config.data
  source = sources.get_source(d.name, d.train_split, data_dir=d.data_dir, download=d.download,
                              text=config.get('text'))
  return eval_data.make_eval_set(config, source)


def refresh_images(config, max_images: int | None = None) -> np.ndarray:
  """The training images the refresh reads, in memory: the first `bn_refresh_batches` x
  `eval.batch_size` of the training split (uint8; encoded images centre-cropped)."""
  wanted = refresh_batches(config) * config.eval.batch_size
  images, _ = _refresh_set(config).limited(min(wanted, max_images or wanted)).arrays()
  return images


def refresh_batches(config) -> int:
  # Workdirs written before the field existed get its default.
  return int(config.eval.get('bn_refresh_batches', 20))


def refreshed_encoder_batch_stats(config, params, batch_stats,
                                  images_uint8: np.ndarray | Iterable[np.ndarray],
                                  batch_size: int | None = None):
  """`batch_stats` with the encoder's ('encoder' key) BatchNorm statistics replaced by the
  population statistics of `images_uint8` (preprocessed as evaluation does: scaled to [0, 1]
  and resized to `config.eval.image_size` unless they come centre-cropped at that size),
  either one array, taken in batches of `batch_size` (default `config.eval.batch_size`; a
  last, smaller batch is dropped unless it is the only one), or an iterable of batches.
  An encoder without BatchNorm (a ViT) has no statistics to refresh: `batch_stats` is
  returned as it is."""
  from ssl_jax.models import build_encoder
  if 'encoder' not in params:
    raise ValueError("The method's network has no 'encoder' submodule; the BatchNorm refresh "
                     'cannot find its layers.')
  if 'encoder' not in batch_stats:
    return batch_stats
  if isinstance(images_uint8, np.ndarray):
    batch_size = min(batch_size or config.eval.batch_size, len(images_uint8))
    num_batches = max(1, len(images_uint8) // batch_size)
    images_uint8 = [images_uint8[i * batch_size:(i + 1) * batch_size]
                    for i in range(num_batches)]
  image_size = config.eval.image_size or None
  preprocess = jax.jit(lambda x: features.preprocess(x, image_size))
  batches = (preprocess(images) for images in images_uint8)
  encoder = build_encoder(config.model, None)
  variables = {'params': params['encoder'], 'batch_stats': batch_stats['encoder']}
  stats = population_statistics(encoder, variables, batches)
  new = dict(batch_stats)
  new['encoder'] = replace_statistics(batch_stats['encoder'], stats)
  return new


def refreshed_frozen_encoder(config, method, state, images_uint8: np.ndarray | None = None):
  """`frozen_encoder(method, state)` with the encoder's BatchNorm statistics refreshed (see
  the module docstring) on `images_uint8`, by default the first training images read batch
  by batch. With `eval.bn_refresh_batches = 0`, the statistics are left as they are."""
  # This process refreshes the statistics on its own device from the images it reads.
  params, batch_stats = features.local_copy(evaluated_variables(method, state))
  if refresh_batches(config) > 0:
    if images_uint8 is None:
      from ssl_jax.evaluation import eval_data  # pylint: disable=g-import-not-at-top
      images_uint8 = eval_data.population_batches(
          _refresh_set(config), config.eval.batch_size, refresh_batches(config))
    batch_stats = refreshed_encoder_batch_stats(config, params, batch_stats, images_uint8)
  return features.FrozenEncoder.of_method(method, (params, batch_stats))
