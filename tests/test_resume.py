"""Checkpoints: exact resume, interrupted saves, damaged checkpoints."""

import os

import jax
import numpy as np
import pytest

from ssl_jax import checkpoint, train


def _assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_resumed_run_ends_with_identical_state(tiny_config, tmp_path):
  straight, _ = train.train_and_evaluate(tiny_config, str(tmp_path / 'straight'))
  first, results = train.train_and_evaluate(tiny_config, str(tmp_path / 'resumed'),
                                            stop_at_step=2)
  assert int(first.step) == 2 and 'knn_top1' not in results
  resumed, results = train.train_and_evaluate(tiny_config, str(tmp_path / 'resumed'))
  assert int(resumed.step) == int(straight.step) == 4
  _assert_trees_equal(resumed, straight)
  assert 0.0 <= results['knn_top1'] <= 1.0
  # The comparison is not vacuous: the state changed between step 2 and step 4.
  with pytest.raises(AssertionError):
    _assert_trees_equal(first.params, resumed.params)


def test_interrupted_save_is_ignored(tiny_config, tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_config, workdir, stop_at_step=2)
  # What a save killed mid-write leaves behind: a temporary directory for a later step.
  partial = os.path.join(workdir, 'checkpoints', '4.orbax-checkpoint-tmp-1234')
  os.makedirs(os.path.join(partial, 'state'))
  assert checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints')).latest_step() == 2
  state, _ = train.train_and_evaluate(tiny_config, workdir)
  assert int(state.step) == 4


def test_damaged_checkpoint_gives_clear_error_and_is_kept(tiny_config, tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_config, workdir, stop_at_step=2)
  step_dir = os.path.join(workdir, 'checkpoints', '2')
  for root, _, files in os.walk(os.path.join(step_dir, 'state')):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'garbage')
  before = sorted(os.listdir(step_dir))
  with pytest.raises(checkpoint.CheckpointError, match=r'mv .*/2 .*2\.bad'):
    train.train_and_evaluate(tiny_config, workdir)
  assert sorted(os.listdir(step_dir)) == before


def test_changed_config_is_reported(tiny_config, tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_config, workdir, stop_at_step=2)
  tiny_config.model.widths = (4, 16)
  with pytest.raises(checkpoint.CheckpointError, match='new --workdir'):
    train.train_and_evaluate(tiny_config, workdir)
