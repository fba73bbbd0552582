"""Command line: python -m ssl_jax.main --config=configs/simclr.py[:ARG] --workdir=DIR.

Running the same command again in the same workdir resumes from the latest checkpoint.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ssl_jax import config_lib

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


def format_results(results: dict) -> str:
  rows = [('trained encoder', results.get('knn_top1')),
          ('random-init encoder', results.get('knn_top1_random_init')),
          ('raw pixels', results.get('knn_top1_raw_pixels'))]
  lines = ['kNN top-1 on the evaluation split:']
  lines += [f'  {name:<22} {value:.4f}' for name, value in rows if value is not None]
  return '\n'.join(lines)


class _DropChattyLibraries(logging.logging.Filter):
  """Orbax logs every file of every save at INFO; keep its warnings, drop the rest."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or 'orbax' not in record.pathname


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_DropChattyLibraries())
  # Imported after flag parsing so that --help stays fast and jax sees the environment.
  import jax

  jax.config.parse_flags_with_absl()
  if FLAGS.multihost:
    # Before anything touches devices. CPU processes need gloo for their collectives; the
    # setting does not affect GPU or TPU.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  from ssl_jax import train
  try:
    _, results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except config_lib.ConfigError as e:
    logging.error('%s', e)
    sys.exit(f'{e}')
  if 'knn_top1' in results:
    print(format_results(results), flush=True)


def run():
  """Console-script entry point (`ssl-jax-train`)."""
  app.run(main)


if __name__ == '__main__':
  run()
