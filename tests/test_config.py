"""Configs: argument strings, overrides, and validation that names the fix."""

import importlib.util
import os

import pytest

from ssl_jax import config_lib

ROOT = os.path.join(os.path.dirname(__file__), '..')


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', name + '.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_arg_string_sets_fields():
  c = _load('simclr').get_config('backbone=resnet50,batch=512,epochs=100')
  assert (c.model.name, c.batch_size, c.num_epochs) == ('resnet50', 512, 100.0)
  config_lib.validate(c, num_devices=8)


def test_default_config_is_valid_on_any_power_of_two_devices():
  c = _load('simclr').get_config()
  for devices in (1, 2, 4, 8):
    config_lib.validate(c, num_devices=devices)


def test_unknown_arg_is_an_error_listing_known_keys():
  with pytest.raises(ValueError, match=r"Unknown config argument 'bacth'.*'batch'"):
    _load('simclr').get_config('bacth=512')


def test_arg_without_equals_is_an_error():
  with pytest.raises(ValueError, match='not key=value'):
    config_lib.parse_arg('batch', batch=1)


def test_bool_arg_parsing():
  assert config_lib.parse_arg('flag=False', flag=True).flag is False
  with pytest.raises(ValueError, match='true or false'):
    config_lib.parse_arg('flag=maybe', flag=True)


def test_batch_not_divisible_by_devices_names_the_fix():
  c = _load('simclr').get_config('batch=100')
  with pytest.raises(config_lib.ConfigError, match=r'not divisible by the 8 devices.*multiple of 8 '
                                                   r'\(e\.g\. 96\)'):
    config_lib.validate(c, num_devices=8)


def test_all_problems_are_reported_together():
  c = _load('simclr').get_config()
  c.optimizer.name = 'adam'
  c.augment.flip_prob = 1.5
  c.model.name = 'resnet1000'
  c.model.pool_grid = 0
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(c, num_devices=1)
  message = str(info.value)
  assert "optimizer.name='adam'" in message
  assert 'augment.flip_prob' in message
  assert "model.name='resnet1000'" in message
  assert 'model.pool_grid must be >= 1' in message


def test_bad_per_view_augmentation_is_reported_before_the_run():
  c = _load('byol').get_config()  # per_view.blur_prob = (1.0, 0.1): valid as shipped
  config_lib.validate(c, num_devices=1)
  c.augment.per_view.blur_prob = (1.0, 0.1, 0.5)
  c.augment.per_view.solarize_prob = (0.0, 1.2)
  c.augment.per_view.crop_size = (16, 16)
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(c, num_devices=1)
  message = str(info.value)
  assert 'augment.per_view.blur_prob needs one value per global view (2 for this method)' in message
  assert 'augment.per_view.solarize_prob must hold probabilities in [0, 1]' in message
  assert 'augment.per_view.crop_size is not a per-view field' in message


def test_unknown_dataset_is_reported():
  c = _load('simclr').get_config('dataset=mnist')
  with pytest.raises(config_lib.ConfigError, match="tfds:<dataset name>"):
    config_lib.validate(c, num_devices=1)


def test_flatten():
  flat = config_lib.flatten(_load('simclr').get_config())
  assert flat['optimizer.name'] == 'lars'
  assert flat['augment.crop_scale'] == str(_load('simclr').get_config().augment.crop_scale)
