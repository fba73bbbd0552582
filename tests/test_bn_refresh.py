"""The random-init baseline's BatchNorm refresh (`ssl_jax.evaluation.batch_norm`): population
statistics of every BatchNorm layer's input, computed here independently, land where the
evaluated encoder reads them (for every method), and only the random-init baseline is
refreshed."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from method_harness import init_method, load_config, shrink
from ssl_jax.evaluation import batch_norm
from ssl_jax.evaluation.final import final_evaluation
from ssl_jax.evaluation.monitor import KnnEvaluator
from ssl_jax.methods import (METHODS, RunLength, build_method, evaluated_variables,
                             frozen_encoder)
from ssl_jax.models import build_encoder


def _state(params, batch_stats, target_params, method_state):
  return types.SimpleNamespace(params=params, batch_stats=batch_stats,
                               target_params=target_params, method_state=method_state)


def _bn_input_moments(config, encoder_vars, batches_uint8):
  """Independently of the refresh: each BatchNorm's input is the output of the conv before
  it (ConvNet: conv-BN-ReLU), captured in training mode on each batch after the evaluation
  preprocessing written out here (scale to [0, 1], bilinear antialiased resize); the mean and
  biased variance over all batches' inputs together, in float64 numpy."""
  encoder = build_encoder(config.model, None)
  size = config.eval.image_size

  @jax.jit
  def intermediates(batch):
    x = jnp.asarray(batch, jnp.float32) / 255.0
    x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), 'bilinear', antialias=True)
    return encoder.apply(encoder_vars, x, train=True, capture_intermediates=True,
                         mutable=['batch_stats', 'intermediates'])[1]

  conv_outputs = {}
  for batch in batches_uint8:
    captured = intermediates(batch)
    for name, out in captured['intermediates'].items():
      if name.startswith('Conv_'):
        conv_outputs.setdefault(name, []).append(np.asarray(out['__call__'][0], np.float64))
  moments = {}
  for name, outputs in conv_outputs.items():
    x = np.concatenate(outputs).reshape(-1, outputs[0].shape[-1])
    moments[name.replace('Conv_', 'BatchNorm_')] = (x.mean(0), x.var(0))
  return moments


def test_refresh_stores_the_population_statistics_of_each_layer_input():
  config = shrink(load_config('simclr'))
  config.model.convs_per_stage = 2  # four BatchNorm layers, two per resolution
  config.eval.image_size = 15       # evaluation resizes: the refresh must see the same images
  config.eval.batch_size = 100
  config.eval.bn_refresh_batches = 3
  method, params, batch_stats, target, method_state = init_method(config, seed=3)
  state = _state(params, batch_stats, target, method_state)
  images = batch_norm.refresh_images(config)
  assert images.shape == (300, 28, 28, 1)
  eval_params, eval_stats = evaluated_variables(method, state)
  refreshed = batch_norm.refreshed_encoder_batch_stats(config, eval_params, eval_stats, images)

  enc_vars = {'params': eval_params['encoder'], 'batch_stats': eval_stats['encoder']}
  expected = _bn_input_moments(config, enc_vars, np.split(images, 3))
  assert sorted(expected) == sorted(refreshed['encoder']) == [f'BatchNorm_{i}' for i in range(4)]
  for layer, (mean, var) in expected.items():
    np.testing.assert_allclose(refreshed['encoder'][layer]['mean'], mean, rtol=1e-4, atol=1e-6,
                               err_msg=layer)
    np.testing.assert_allclose(refreshed['encoder'][layer]['var'], var, rtol=1e-4, atol=1e-6,
                               err_msg=layer)
    # Far from the initial (0, 1): what the baseline was scored with before.
    assert np.abs(np.asarray(eval_stats['encoder'][layer]['var']) - var).max() > 0.05
  # Only the encoder's statistics change; the inputs are left as they were.
  for key in eval_stats:
    if key != 'encoder':
      jax.tree.map(np.testing.assert_array_equal, refreshed[key], eval_stats[key])
  assert float(eval_stats['encoder']['BatchNorm_0']['var'][0]) == 1.0

  # The refreshed frozen encoder evaluates with exactly those statistics.
  x = jax.random.uniform(jax.random.PRNGKey(0), (6, 15, 15, 1))
  encode = batch_norm.refreshed_frozen_encoder(config, method, state, images)
  expected_stats = {layer: {'mean': jnp.asarray(m, jnp.float32), 'var': jnp.asarray(v, jnp.float32)}
                    for layer, (m, v) in expected.items()}
  want = jax.jit(build_encoder(config.model, None).apply, static_argnames='train')(
      {'params': eval_params['encoder'], 'batch_stats': expected_stats}, x, train=False)
  np.testing.assert_allclose(jax.jit(encode)(x), want, rtol=1e-4, atol=1e-5)
  initial = jax.jit(frozen_encoder(method, state))(x)
  assert not np.allclose(initial, want, rtol=1e-2)

  config.eval.bn_refresh_batches = 0  # off: the initial statistics, as frozen_encoder
  np.testing.assert_array_equal(
      jax.jit(batch_norm.refreshed_frozen_encoder(config, method, state))(x), initial)


# MAE's and iBOT's encoders are ViTs, without BatchNorm to refresh (tests/test_mae.py checks
# that `encode` is the plain ViT).
# LiT (a locked tower of a SimCLR workdir, trained for it first) under `slow`: CLIP and SigLIP
# keep the image-text methods' path in the default run.
@pytest.mark.parametrize('name', [
    pytest.param(n, marks=pytest.mark.slow) if n == 'lit' else n
    for n in sorted(set(METHODS) - {'mae', 'ibot'})])
def test_every_method_evaluates_its_encoder_submodule(name):
  """What the refresh relies on: the evaluated network's parameters and statistics hold an
  'encoder' subtree, and `method.encode` is `build_encoder(config.model)` on it in inference
  mode, so refreshing that subtree refreshes what evaluation scores."""
  config = shrink(load_config(name))  # each method has configs/<name>.py
  # A training set as large as DeepCluster-v2's clusters need (a memory row per example).
  method = build_method(config, RunLength(total_steps=1, steps_per_epoch=1, num_examples=1024))
  x = jax.random.uniform(jax.random.PRNGKey(2), (4, 12, 12, 1))

  @jax.jit  # one compilation per method: init, then both ways of encoding
  def encodings(rng):
    params, batch_stats, method_state = method.init(rng, jnp.zeros((2, 12, 12, 1)))
    target = method.init_target(params)
    state = _state(params, batch_stats, target, method_state)
    eval_params, eval_stats = evaluated_variables(method, state)
    # Statistics other than the initial ones, so that a method reading another subtree shows.
    stats = jax.tree.map(lambda s: s + 0.5, eval_stats['encoder'])
    want = build_encoder(config.model, None).apply(
        {'params': eval_params['encoder'], 'batch_stats': stats}, x, train=False)
    got = method.encode(eval_params, dict(eval_stats, encoder=stats), x)
    return got, want

  params, batch_stats, _ = jax.eval_shape(method.init, jax.random.PRNGKey(1),
                                          jnp.zeros((2, 12, 12, 1)))
  assert 'encoder' in params and 'encoder' in batch_stats
  got, want = encodings(jax.random.PRNGKey(1))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_final_evaluation_refreshes_the_random_init_baseline_only():
  """The trainer's final evaluation scores the random-init encoder with refreshed statistics,
  and the trained encoder with its own."""
  config = shrink(load_config('simclr'))
  config.eval.final_bank_size, config.eval.final_test_size = 2000, 1000
  config.eval.bn_refresh_batches = 2
  method, params, batch_stats, target, method_state = init_method(config, seed=4)
  initial = _state(params, batch_stats, target, method_state)
  # A "trained" state: the same weights with other statistics, which must be kept.
  trained = _state(params, jax.tree.map(lambda s: s * 0.5 + 0.25, batch_stats), target,
                   method_state)
  results = final_evaluation(config, method, trained, initial)
  evaluator = KnnEvaluator.from_config(config, 2000, 1000)
  assert results['knn_top1'] == evaluator.score_encoder(frozen_encoder(method, trained))
  refreshed = evaluator.score_encoder(batch_norm.refreshed_frozen_encoder(config, method, initial))
  assert results['knn_top1_random_init'] == refreshed
  assert refreshed != evaluator.score_encoder(frozen_encoder(method, initial))
  assert results['knn_top1_raw_pixels'] == evaluator.score_raw_pixels()
