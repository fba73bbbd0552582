"""The launch scripts' dry runs print the right commands (no SLURM or gcloud needed), and the
throughput benchmark runs end to end on a tiny config."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
LAUNCH = os.path.join(ROOT, 'launch')
CONFIG = 'configs/simclr.py:batch=64'
EXTRA = ['--config.total_steps=10', '--config.model.widths=(8,16)']


def _dry_run(script, *args, cwd=ROOT, **env):
  """Runs launch/<script> with DRY_RUN=1 in a minimal environment."""
  full_env = {'PATH': os.environ['PATH'], 'DRY_RUN': '1', **env}
  return subprocess.run(['bash', os.path.join(LAUNCH, script), *args], cwd=cwd, env=full_env,
                        capture_output=True, text=True, timeout=30)


def _main_args(argv):
  """The arguments after `python -m ssl_jax.main` in a command's argv."""
  i = argv.index('ssl_jax.main')
  assert argv[i - 1] == '-m' and argv[i - 2].endswith('python')
  return argv[i + 1:]


@pytest.mark.parametrize('script', ['local.sh', 'slurm.sh', 'tpu_pod.sh'])
def test_usage_error_without_arguments(script):
  result = _dry_run(script, TPU_NAME='t', ZONE='z', REPO_URL='u', BRANCH='b')
  assert result.returncode == 2
  assert 'usage:' in result.stderr


def test_local_prints_the_training_command(tmp_path):
  workdir = str(tmp_path / 'run dir')  # a space, to check the quoting
  result = _dry_run('local.sh', CONFIG, workdir, *EXTRA)
  assert result.returncode == 0, result.stderr
  argv = shlex.split(result.stdout)
  assert _main_args(argv) == [f'--config={CONFIG}', f'--workdir={workdir}', *EXTRA]
  assert not os.path.exists(workdir)


def _slurm(tmp_path, **env):
  result = _dry_run('slurm.sh', CONFIG, 'runs/x', *EXTRA, cwd=str(tmp_path), **env)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0].startswith('# ') and lines[-2] == '# submit with:'
  return '\n'.join(lines[1:-2]) + '\n', lines[-1]


def test_slurm_prints_batch_script_and_sbatch(tmp_path):
  script, submit = _slurm(tmp_path, NODES='3', GPUS_PER_NODE='4', PARTITION='gpu',
                          ACCOUNT='proj', TIME='02:00:00')
  workdir = str(tmp_path / 'runs' / 'x')  # made absolute: the job may start elsewhere
  for directive in ('--nodes=3', '--ntasks-per-node=1', '--gpus-per-node=4',
                    '--partition=gpu', '--account=proj', '--time=02:00:00',
                    f'--output={workdir}/slurm-%j.out', f'--chdir={tmp_path}'):
    assert f'#SBATCH {directive}\n' in script
  assert 'export JAX_LOCAL_DEVICE_IDS=0,1,2,3\n' in script
  assert shlex.split(submit) == ['sbatch', f'{workdir}/slurm_job.sbatch']
  assert not os.path.exists(workdir)  # a dry run creates nothing

  # Running the script with a stand-in `srun` shows the command every node would run.
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'srun').write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
  (bin_dir / 'srun').chmod(0o755)
  ran = subprocess.run(['bash', '-c', script], capture_output=True, text=True, timeout=30,
                       env={'PATH': f'{bin_dir}:{os.environ["PATH"]}'})
  assert ran.returncode == 0, ran.stderr
  argv = ran.stdout.splitlines()
  assert argv[0] == '--kill-on-bad-exit=1'
  assert _main_args(argv) == [f'--config={CONFIG}', f'--workdir={workdir}', '--multihost',
                              *EXTRA]


def test_slurm_omits_unset_options_and_rejects_bad_counts(tmp_path):
  script, _ = _slurm(tmp_path)
  assert '#SBATCH --nodes=2\n' in script
  assert '--partition' not in script and '--account' not in script
  bad = _dry_run('slurm.sh', CONFIG, 'w', NODES='two')
  assert bad.returncode == 2 and 'NODES must be a positive integer' in bad.stderr


def _gcloud_commands(stdout):
  """The two printed gcloud commands (setup, train) as argv lists."""
  setup, train = re.split(r'^# 2\..*$', stdout, flags=re.M)
  return [shlex.split(text, comments=True) for text in (setup, train)]


def test_tpu_pod_prints_setup_and_train_on_all_workers():
  result = _dry_run('tpu_pod.sh', CONFIG, '/mnt/shared/run', *EXTRA, TPU_NAME='pod-1',
                    ZONE='us-central2-b', REPO_URL='https://example.com/ssl_jax.git',
                    BRANCH='dev', PROJECT='my-project')
  assert result.returncode == 0, result.stderr
  setup, train = _gcloud_commands(result.stdout)
  for argv in (setup, train):
    assert argv[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod-1']
    assert {'--zone=us-central2-b', '--worker=all', '--project=my-project'} <= set(argv)
    assert argv[-2] == '--command'
    syntax = subprocess.run(['bash', '-n', '-c', argv[-1]], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
  assert 'git clone -q --branch dev https://example.com/ssl_jax.git' in setup[-1]
  assert 'launch/setup_local.sh' in setup[-1] and 'jax[tpu]' in setup[-1]
  assert _main_args(shlex.split(train[-1])) == [
      f'--config={CONFIG}', '--workdir=/mnt/shared/run', '--multihost', *EXTRA]


def test_tpu_pod_needs_name_and_zone():
  result = _dry_run('tpu_pod.sh', CONFIG, 'w', ZONE='z', REPO_URL='u', BRANCH='b')
  assert result.returncode != 0 and 'TPU_NAME' in result.stderr


def test_throughput_benchmark_runs_on_a_tiny_config():
  # One device: drop the simulated-device count conftest puts in XLA_FLAGS.
  xla_flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                     os.environ.get('XLA_FLAGS', '')).strip()
  env = dict(os.environ, XLA_FLAGS=xla_flags)
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'benchmarks', 'train_throughput.py'),
       '--config.batch_size=32', '--config.model.widths=(4,8)',
       '--config.model.convs_per_stage=1', '--config.method.projector_hidden_dim=16',
       '--config.method.projector_output_dim=8', '--config.augment.crop_size=12',
       '--steps=3', '--warmup_steps=1', '--matmul_repeats=3'],
      env=env, capture_output=True, text=True, timeout=180)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  rows = {line.split('  ')[0]: line for line in lines[:-1]}
  assert 'images/s' in rows and 'MFU (fraction of peak)' in rows
  figures = json.loads(lines[-1])
  assert figures['devices'] == 1 and figures['batch_size'] == 32
  for key in ('compile_s', 'step_ms_median', 'step_ms_mean', 'images_per_sec',
              'gflop_per_step', 'achieved_gflops', 'peak_gflops', 'mfu_percent'):
    assert isinstance(figures[key], float) and figures[key] > 0, key


def test_end_to_end_benchmark_times_the_trainer_on_a_tiny_config():
  # JAX only (torch is not a dependency); one device, as above.
  xla_flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                     os.environ.get('XLA_FLAGS', '')).strip()
  env = dict(os.environ, XLA_FLAGS=xla_flags)
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'benchmarks', 'vs_pytorch_run.py'), '--order=jax',
       '--steps=3', '--config.batch_size=32', '--config.model.widths=(4,8)',
       '--config.model.convs_per_stage=1', '--config.method.projector_hidden_dim=16',
       '--config.method.projector_output_dim=8', '--config.augment.crop_size=12',
       '--config.eval.image_size=12'],
      env=env, capture_output=True, text=True, timeout=180)
  assert result.returncode == 0, result.stderr[-3000:]
  figures = json.loads(result.stdout.strip().splitlines()[-1])
  [row] = figures['rows']
  assert (figures['steps'], figures['batch_size'], row['implementation']) == (3, 32, 'jax')
  assert row['images_per_sec'] == 3 * 32 / row['seconds'] and row['jax_over_this'] is None
