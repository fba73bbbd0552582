"""SimCLR's config validation. (Its loss is tested in test_info_nce.py and test_negatives.py,
the trainer's steps in test_train_step.py.)"""

import pytest

import method_harness as harness
from ssl_jax import config_lib
from ssl_jax.methods import method_class


@pytest.mark.parametrize('name', ['simclr', 'simclr_debiased', 'simclr_hard_negatives'])
def test_multi_crop_config_fails_validation_naming_the_fix(name):
  """SimCLR's loss takes two views: local crops must be a config error naming the fix, not a
  failure when the step is traced."""
  config = harness.load_config(name)
  config_lib.validate(config, num_devices=1)
  assert not method_class('simclr').config_problems(config)
  config.augment.num_local_crops = 2
  problems = method_class('simclr').config_problems(config)
  assert len(problems) == 1 and 'set augment.num_local_crops = 0' in problems[0], problems
  with pytest.raises(config_lib.ConfigError, match=r'set augment\.num_local_crops = 0'):
    config_lib.validate(config, num_devices=1)
