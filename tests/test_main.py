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


def _run(*args):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  return subprocess.run([sys.executable, '-m', 'ssl_jax.main', '--config=configs/simclr.py',
                         *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_train_prints_table_then_resumes(tmp_path):
  workdir = str(tmp_path / 'run')
  first = _run(f'--workdir={workdir}', '--config.total_steps=4', *TINY)
  assert first.returncode == 0, first.stderr[-3000:]
  lines = first.stdout.splitlines()
  assert lines[0] == 'kNN top-1 on the evaluation split:'
  assert [line.split()[0] for line in lines[1:]] == ['trained', 'random-init', 'raw']
  assert 'on 2 devices' in first.stderr
  assert os.path.exists(os.path.join(workdir, 'results.json'))
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(workdir))
  # Same command with a longer schedule: resumes from step 4 rather than starting over.
  second = _run(f'--workdir={workdir}', '--config.total_steps=6', *TINY)
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'starting at step 4' in second.stderr


@pytest.mark.parametrize('flag,message', [
    ('--config.batch_szie=64', 'batch_szie'),
    ('--config.batch_size=33', 'not divisible by the 2 devices'),
    ('--config.data.data_dir=/nonexistent', 'apt-get install dataset-fashion-mnist'),
])
def test_bad_input_fails_with_the_fix(tmp_path, flag, message):
  result = _run(f'--workdir={tmp_path}', '--config.total_steps=2', *TINY, flag)
  assert result.returncode != 0
  assert message in result.stderr
