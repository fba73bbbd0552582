"""The command line, as a user runs it: train, print the kNN table, resume, bad input."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
TINY = ['--config.batch_size=32', '--config.model.name=convnet', '--config.model.widths=(4,8)',
        '--config.model.convs_per_stage=1', '--config.method.projector_hidden_dim=16',
        '--config.method.projector_output_dim=8', '--config.augment.crop_size=12',
        '--config.log_every_steps=2', '--config.checkpoint_every_steps=2',
        '--config.eval.final_bank_size=500', '--config.eval.final_test_size=100']


def _run(*args, config='configs/simclr.py'):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  return subprocess.run([sys.executable, '-m', 'ssl_jax.main', f'--config={config}', *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


# What only the libraries' INFO chatter contains: orbax's checkpointing, jax's backend
# search, clu's hyper-parameter dump and progress notes, TensorFlow's C++ start-up.
CHATTER = ('orbax', 'checkpoint_manager.py', 'xla_bridge.py', '[Hyperparameters]',
           'Setting work unit notes', 'port.cc', 'absl::InitializeLog')


def test_train_prints_short_log_and_table_then_resumes(tmp_path):
  workdir = str(tmp_path / 'run')
  first = _run(f'--workdir={workdir}', '--config.total_steps=4', *TINY)
  assert first.returncode == 0, first.stderr[-3000:]
  lines = first.stdout.splitlines()
  assert lines[0] == 'kNN top-1 on the evaluation split:'
  assert [line.split()[0] for line in lines[1:]] == ['trained', 'random-init', 'raw']
  assert 'on 2 devices' in first.stderr
  assert os.path.exists(os.path.join(workdir, 'results.json'))
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(workdir))
  # The default log: progress, evaluations and results, none of the libraries' INFO lines.
  log = first.stderr.splitlines()
  assert 'step 2/4: loss' in first.stderr and 'step 4/4: loss' in first.stderr
  assert 'final/knn_top1=' in first.stderr
  assert not [line for line in log if any(c in line for c in CHATTER)], first.stderr
  assert len(log) <= 10, first.stderr
  # Same command with a longer schedule: resumes from step 4 rather than starting over;
  # an explicit --verbosity brings the libraries' INFO lines back.
  second = _run(f'--workdir={workdir}', '--config.total_steps=6', *TINY, '--verbosity=0')
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'starting at step 4' in second.stderr
  assert 'step 6/6: loss' in second.stderr
  for chatter in ('checkpoint_manager.py', 'atomicity.py'):  # orbax saving
    assert chatter in second.stderr, chatter


@pytest.mark.parametrize('flag,message', [
    ('--config.batch_szie=64', 'batch_szie'),
    ('--config.batch_size=33', 'not divisible by the 2 devices'),
    ('--config.data.data_dir=/nonexistent', 'apt-get install dataset-fashion-mnist'),
    ('--config.data.name=folder:/nonexistent/photos', 'Image folder /nonexistent/photos '
     'does not exist'),
])
def test_bad_input_fails_with_the_fix(tmp_path, flag, message):
  # Missing data, like a config mistake, is one message without a traceback.
  result = _run(f'--workdir={tmp_path}', '--config.total_steps=2', *TINY, flag)
  assert result.returncode != 0
  assert message in result.stderr
  assert 'Traceback' not in result.stdout + result.stderr, result.stderr


@pytest.mark.parametrize('flags,messages', [
    # A typo in an override: the field and ml_collections' or difflib's suggestion.
    (['--config.optimizer.base_lrr=0.1'],
     ['Unknown config field optimizer.base_lrr; did you mean optimizer.base_lr?']),
    (['--config.optimzer.base_lr=0.1', '--config.base_lr=0.1'],
     ['Unknown config field optimzer.base_lr; did you mean optimizer.base_lr?',
      'Unknown config field base_lr; did you mean optimizer.base_lr?']),
    # A typo in the config file's argument string (config_lib.parse_arg).
    (['configs/simclr.py:bacth=64'], ["Unknown config argument 'bacth'"]),
    # An invalid config (config_lib.ConfigError from validate, after jax started).
    (['--config.batch_size=33', '--config.log_every_steps=0'],
     ['Invalid config:', 'not divisible by the 2 devices', 'log_every_steps must be positive']),
])
def test_config_mistake_is_one_message_without_traceback(tmp_path, flags, messages):
  config, flags = ((flags[0], flags[1:]) if flags[0].startswith('configs/') else
                   ('configs/simclr.py', flags))
  result = _run(f'--workdir={tmp_path}', '--config.total_steps=2', *TINY, *flags, config=config)
  assert result.returncode == 1, result.stderr
  output = result.stdout + result.stderr
  assert 'Traceback' not in output, output
  for message in messages:
    assert output.count(message) == 1, output
  assert len(output.splitlines()) <= 4, output

