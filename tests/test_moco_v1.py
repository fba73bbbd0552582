"""MoCo v1 as a config of the MoCo v2 method: the config's fields, the linear head (and v2's
MLP head unchanged), devices agreeing, and the head's config check."""

import jax
import numpy as np
import pytest

import method_harness as mh
from ssl_jax import config_lib
from ssl_jax.methods.moco_v2 import MLPHead


def test_paper_recipe_with_a_resnet():
  c = mh.load_config('moco_v1', 'backbone=resnet50,dataset=tfds:imagenet2012')
  m, o, a = c.method, c.optimizer, c.augment
  assert m.name == 'moco_v2'  # the same method, v1's head
  assert (m.projector_hidden_dim, m.projector_output_dim, m.temperature) == (0, 128, 0.07)
  assert (m.queue_size, m.target_momentum) == (65536, 0.999)
  assert (o.name, o.base_lr, o.lr_scaling, o.momentum, o.weight_decay) == (
      'sgd', 0.03, 'linear', 0.9, 1e-4)
  assert (c.batch_size, c.num_epochs, o.warmup_epochs) == (256, 200.0, 0.0)
  # main_moco.py without --aug-plus: jitter (0.4, 0.4, 0.4, 0.4) always, grayscale 0.2, no blur.
  assert tuple(a.crop_scale) == (0.2, 1.0)
  assert (a.brightness, a.contrast, a.saturation, a.hue) == (0.4, 0.4, 0.4, 0.4)
  assert (a.jitter_prob, a.grayscale_prob, a.blur_prob, a.flip_prob) == (1.0, 0.2, 0.0, 0.5)
  config_lib.validate(c, 8)


def test_cpu_recipe_is_moco_v2s_with_v1s_head():
  v1, v2 = mh.load_config('moco_v1'), mh.load_config('moco_v2')
  for field in ('queue_size', 'target_momentum', 'projector_output_dim'):
    assert v1.method[field] == v2.method[field], field
  assert v1.optimizer.to_dict() == v2.optimizer.to_dict()
  assert (v1.batch_size, v1.num_epochs, v1.augment.crop_size) == (
      v2.batch_size, v2.num_epochs, v2.augment.crop_size)
  assert (v1.method.projector_hidden_dim, v1.method.temperature) == (0, 0.07)
  assert (v1.augment.brightness, v1.augment.contrast) == (0.8, 0.8)  # v2's CPU strength
  assert (v1.augment.jitter_prob, v1.augment.blur_prob) == (1.0, 0.0)
  config_lib.validate(v1, 8)


def _shrunk():
  config = mh.shrink(mh.load_config('moco_v1'))
  config.method.queue_size = 80  # not a multiple of the batch of 32: the queue wraps
  return config


def test_linear_head():
  config = _shrunk()
  method, params, stats, _, _ = mh.init_method(config)
  images = jax.random.normal(jax.random.PRNGKey(1), (4, 12, 12, 1))
  (features, z), _ = method.network().apply({'params': params, 'batch_stats': stats}, images,
                                            train=True, mutable=['batch_stats'])
  # One Dense layer from the encoder's features to 128 dimensions, nothing else.
  head = params['projector']
  assert jax.tree.map(np.shape, head) == {
      'Dense_0': {'kernel': (features.shape[1], 128), 'bias': (128,)}}
  kernel, bias = (np.asarray(head['Dense_0'][k], np.float64) for k in ('kernel', 'bias'))
  np.testing.assert_allclose(z, np.asarray(features, np.float64) @ kernel + bias, rtol=1e-5,
                             atol=1e-6)


def test_v2_head_unchanged():
  # fc (2048) -> ReLU -> fc (128), with the parameter names v2's checkpoints have.
  x = jax.random.normal(jax.random.PRNGKey(2), (3, 24))
  params = MLPHead().init(jax.random.PRNGKey(0), x)['params']
  assert jax.tree.map(np.shape, params) == {
      'Dense_0': {'kernel': (24, 2048), 'bias': (2048,)},
      'Dense_1': {'kernel': (2048, 128), 'bias': (128,)}}
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  hidden = np.maximum(np.asarray(x, np.float64) @ p['Dense_0']['kernel'] + p['Dense_0']['bias'],
                      0.0)
  expected = hidden @ p['Dense_1']['kernel'] + p['Dense_1']['bias']
  np.testing.assert_allclose(MLPHead().apply({'params': params}, x), expected, rtol=1e-5,
                             atol=1e-6)


def test_devices_agree():
  mh.check_devices_agree(_shrunk(), steps=(0,))


def test_negative_hidden_width_names_the_fix():
  c = mh.load_config('moco_v1')
  c.method.projector_hidden_dim = -1
  with pytest.raises(config_lib.ConfigError, match="or 0 for MoCo v1's linear head"):
    config_lib.validate(c, 8)
