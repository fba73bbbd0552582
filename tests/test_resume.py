"""Checkpoints: exact resume, interrupted saves, damaged checkpoints."""

import os
import re

import jax
import numpy as np
import pytest

from ssl_jax import checkpoint, train


def _assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_resumed_run_ends_with_identical_state(tiny_config, tmp_path):
  straight, straight_results = train.train_and_evaluate(tiny_config, str(tmp_path / 'straight'))
  assert straight_results['restored_step'] is None and straight_results['steps_run'] == 4
  first, results = train.train_and_evaluate(tiny_config, str(tmp_path / 'resumed'),
                                            stop_at_step=2)
  assert int(first.step) == 2 and 'knn_top1' not in results
  assert results['restored_step'] is None and results['steps_run'] == 2
  first = jax.device_get(first)
  resumed, results = train.train_and_evaluate(tiny_config, str(tmp_path / 'resumed'))
  # It started from the checkpoint of step 2 and trained only steps 3 and 4 (a restore
  # skipped silently would train 4 steps from scratch and end in the same state).
  assert results['restored_step'] == 2 and results['steps_run'] == 2
  assert int(resumed.step) == int(straight.step) == 4
  _assert_trees_equal(resumed, straight)
  # The same state gives the same final evaluation, and the encoder is far above chance (0.1).
  assert results['knn_top1'] == straight_results['knn_top1'] > 0.3
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
  state, results = train.train_and_evaluate(tiny_config, workdir)
  assert int(state.step) == 4
  assert results['restored_step'] == 2 and results['steps_run'] == 2


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


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_config,
                                                                                tmp_path):
  """A learning rate that diverges (the loss is NaN at step 4): the run stops with a message
  naming the step and the fixes, and every checkpoint left is finite and restorable. A
  checkpoint every step and no log before the end: only the check before each save can keep
  the diverged state out of the checkpoints."""
  tiny_config.optimizer.warmup_epochs = 0.0
  tiny_config.optimizer.base_lr = 1e8
  tiny_config.total_steps = 6
  tiny_config.checkpoint_every_steps = 1
  tiny_config.log_every_steps = 100
  tiny_config.keep_checkpoints = 10
  workdir = str(tmp_path)
  with pytest.raises(FloatingPointError) as error:
    train.train_and_evaluate(tiny_config, workdir)
  message = str(error.value)
  bad_step = int(re.search(r'diverged at step (\d+)', message).group(1))
  assert 2 <= bad_step < 6, message  # the setting diverges, but not from the first step
  assert f'last good checkpoint, step {bad_step - 1}' in message
  for fix in ('--config.optimizer.base_lr', '--config.optimizer.warmup_epochs'):
    assert fix in message
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'))
  assert ckpt.all_steps() == list(range(1, bad_step))  # none of the diverged state
  template = train.build(tiny_config)[0].init_fn(jax.random.PRNGKey(0))
  for step in ckpt.all_steps():
    state = jax.device_get(ckpt.restore_state(template, step))
    assert int(state.step) == step
    for leaf in jax.tree.leaves(state):
      if np.issubdtype(np.asarray(leaf).dtype, np.floating):
        assert np.isfinite(leaf).all(), step
  ckpt.close()
