"""Command line: python -m ssl_jax.main --config=configs/simclr.py[:ARG] --workdir=DIR.

Running the same command again in the same workdir resumes from the latest checkpoint.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys

from absl import flags
from ml_collections import config_flags

from ssl_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. configs/simclr.py or '
    'configs/simclr.py:backbone=resnet18,batch=512; override fields with --config.FIELD=VALUE.',
    lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
flags.DEFINE_bool(
    'multihost', False,
    'One process of a multi-process run: calls jax.distributed.initialize() first, which '
    'finds the coordinator, process count and process id itself on SLURM, Open MPI, Cloud '
    'TPU pods and Kubernetes; elsewhere give --coordinator_address, --num_processes and '
    '--process_id.')
flags.DEFINE_string('coordinator_address', None, 'With --multihost: host:port of process 0.')
flags.DEFINE_integer('num_processes', None, 'With --multihost: the number of processes.')
flags.DEFINE_integer('process_id', None, 'With --multihost: this process, 0 to num_processes-1.')
flags.mark_flags_as_required(['config', 'workdir'])


def resume_command() -> str:
  """This process's command line, as the user can type it again."""
  argv = list(sys.argv)
  if os.path.basename(argv[0]) in ('main.py', '__main__.py'):
    python = shutil.which('python')
    same = python and os.path.realpath(python) == os.path.realpath(sys.executable)
    argv[:1] = ['python' if same else sys.executable, '-m', 'ssl_jax.main']
  elif shutil.which(os.path.basename(argv[0])) == os.path.abspath(argv[0]):
    argv[0] = os.path.basename(argv[0])  # the console script, on the PATH
  return shlex.join(argv)


def format_results(results: dict) -> str:
  rows = [('trained encoder', results.get('knn_top1')),
          ('random-init encoder', results.get('knn_top1_random_init')),
          ('raw pixels', results.get('knn_top1_raw_pixels'))]
  lines = ['kNN top-1 on the evaluation split:']
  lines += [f'  {name:<22} {value:.4f}' for name, value in rows if value is not None]
  return '\n'.join(lines)


def main(argv):
  del argv
  # Imported after flag parsing so that --help stays fast and jax sees the environment.
  import jax

  jax.config.parse_flags_with_absl()
  if FLAGS.multihost:
    # Before anything touches devices. CPU processes need gloo for their collectives; the
    # setting does not affect GPU or TPU.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  with cli.native_info_dropped():  # TensorFlow's C++ start-up lines (clu's writers import it)
    from clu import metric_writers  # noqa: F401  (train_and_evaluate imports it: here, quiet)
    from ssl_jax import train
  # A ConfigError ends the program with its message alone (cli.run).
  try:
    _, results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except FloatingPointError as error:  # diverged: the message names the step and the fixes
    sys.stderr.write(f'{error}\n')
    sys.exit(1)
  if results['stopped_by']:
    # Exit status 128 + the signal's number, as a shell reports a process that the signal
    # ended: schedulers and scripts see a run that has not finished (and may restart it).
    sys.stderr.write(f'Stopped by {results["stopped_by"]} at step {results["step"]}; its '
                     'checkpoint is written. To resume, run the same command again:\n  '
                     f'{resume_command()}\n')
    sys.exit(128 + int(getattr(signal.Signals, results['stopped_by'], signal.SIGTERM)))
  if 'knn_top1' in results:
    print(format_results(results), flush=True)


def run():
  """Console-script entry point (`ssl-jax-train`): the short log by default (--verbosity
  shows the libraries' INFO lines), one message for a config mistake (ssl_jax.cli)."""
  cli.run(main, config_flag='config')


if __name__ == '__main__':
  run()
