"""The method base and the config conventions every method shares: one base class, no method
importing another, configs that compose by import, one field name per concept."""

import ast
import importlib
import os

import pytest

import method_harness as harness
from ssl_jax import config_lib
from ssl_jax.methods import METHODS, method_class
from ssl_jax.methods.base import Method

ROOT = os.path.join(os.path.dirname(__file__), '..')
CONFIGS = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, 'configs'))
                 if f.endswith('.py') and f not in ('__init__.py', 'common.py'))


def _imports(path):
  tree = ast.parse(open(path).read())
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      yield node.module, [a.name for a in node.names]
    elif isinstance(node, ast.Import):
      for a in node.names:
        yield a.name, []


@pytest.mark.parametrize('name', sorted(METHODS))
def test_every_method_is_a_method_and_imports_no_other_method(name):
  cls = method_class(name)
  assert issubclass(cls, Method)
  method_modules = {METHODS[n].split(':')[0] for n in METHODS}
  path = os.path.join(ROOT, *cls.__module__.split('.')) + '.py'
  for module, names in _imports(path):
    imported = {module} | {f'{module}.{n}' for n in names}
    assert not imported & (method_modules - {cls.__module__}), (name, module)


@pytest.mark.parametrize('name', CONFIGS)
def test_configs_compose_by_import_and_validate(name):
  source = open(os.path.join(ROOT, 'configs', f'{name}.py')).read()
  assert 'spec_from_file_location' not in source and 'exec_module' not in source
  if name == 'lit':  # its backbone is the locked tower's: the workdir's config
    config = harness.load_config('lit')
    assert config.model.to_dict() == harness.shrink(harness.load_config('simclr')).model.to_dict()
    config_lib.validate(config, num_devices=8)
    return
  config = importlib.import_module(f'ssl_jax.configs.{name}').get_config(None)
  config_lib.validate(config, num_devices=8)
  backbone = 'vit_base' if name in ('mae', 'ibot') else 'resnet50'  # they mask a ViT's patches
  config_lib.validate(importlib.import_module(f'ssl_jax.configs.{name}').get_config(
      f'backbone={backbone}'), num_devices=8)


@pytest.mark.parametrize('old, new', sorted(config_lib.RENAMED_METHOD_FIELDS.items()))
def test_old_field_names_fail_with_the_new_name(old, new):
  config = importlib.import_module('ssl_jax.configs.simclr').get_config(None)
  config.method[old] = 0.5
  with pytest.raises(config_lib.ConfigError, match=f'method.{old} is now called method.'
                                                   f'{new.split()[0]}'):
    config_lib.validate(config, num_devices=8)


def test_one_name_per_concept_across_configs():
  """Momentum of the target network, queue size and projector widths: the same field in
  every method that has the concept."""
  seen = set()
  for name in CONFIGS:
    seen |= set(harness.load_config(name).method)
  assert not seen & set(config_lib.RENAMED_METHOD_FIELDS), seen & set(
      config_lib.RENAMED_METHOD_FIELDS)
  for name in ('byol', 'moco_v2', 'moco_v3', 'dino', 'adco'):
    cls = method_class(name)
    assert cls.target_networks is not None, name
    assert 'target_momentum' in importlib.import_module(
        f'ssl_jax.configs.{name}').get_config(None).method, name


def test_local_crops_are_refused_by_two_view_methods_with_the_fix():
  for name in ('simclr', 'byol', 'moco_v2', 'barlow_twins', 'triplet'):
    config = importlib.import_module(f'ssl_jax.configs.{name}').get_config(None)
    config.augment.num_local_crops = 2
    with pytest.raises(config_lib.ConfigError, match='set augment.num_local_crops = 0'):
      config_lib.validate(config, num_devices=8)
  # Multi-crop methods accept them (their ConvNet CPU recipes have none: configs/swav.py,
  # configs/dino.py).
  for name in ('swav', 'dino'):
    config = importlib.import_module(f'ssl_jax.configs.{name}').get_config(None)
    config.augment.num_local_crops = 2
    config_lib.validate(config, num_devices=8)
