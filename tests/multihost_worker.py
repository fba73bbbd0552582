"""One process of the multi-host test: joins a localhost cluster, trains the tiny config and
saves its final parameters. Usage: multihost_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR OUT

With SIGTERM_AT_STEP=k, the last process sends itself SIGTERM after logging step k: a real
signal that reaches one process only, as a pre-emption notice may. The last line of stdout is
'RESULT ' and a JSON object: devices, processes, step, restored_step, steps_run, stopped_by
and the loss of every step this process trained."""

import json
import os
import signal
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'

import jax  # noqa: E402
import numpy as np  # noqa: E402
from clu import metric_writers  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

process_id, num_processes, port = (int(a) for a in sys.argv[1:4])
workdir, out = sys.argv[4:6]
if num_processes > 1:
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(f'localhost:{port}', num_processes=num_processes,
                             process_id=process_id)

sys.path.insert(0, os.path.dirname(__file__))
from tiny_config import make_tiny_config  # noqa: E402
from ssl_jax import train  # noqa: E402

config = make_tiny_config()
config.batch_size = 16
# Plain SGD at a large learning rate from the first step (no warm-up): in 4 steps every
# parameter moves by hundreds of times the comparison's tolerance.
config.optimizer.name = 'sgd'
config.optimizer.lr_scaling = 'none'
config.optimizer.base_lr = 0.2
config.optimizer.warmup_epochs = 0.0
config.log_every_steps = 1  # every step's loss reaches the writer
# FSDP=n splits the state over n devices (spanning processes when n exceeds a process's
# devices); the tiny model's leaves are split only below the real size threshold.
config.mesh.fsdp = int(os.environ.get('FSDP', '1'))
if config.mesh.fsdp > 1:
  from ssl_jax import sharding  # noqa: E402
  sharding.MIN_SHARDED_SIZE = 64
losses = {}
signal_at = int(os.environ.get('SIGTERM_AT_STEP', '0'))
_create_writer = metric_writers.create_default_writer


def _recording_writer(*args, **kwargs):
  writer = _create_writer(*args, **kwargs)
  write_scalars = writer.write_scalars

  def record(step, scalars):
    if 'loss' in scalars:
      losses[int(step)] = float(scalars['loss'])
      if step == signal_at and jax.process_index() == jax.process_count() - 1:
        os.kill(os.getpid(), signal.SIGTERM)
    return write_scalars(step, scalars)

  writer.write_scalars = record
  return writer


metric_writers.create_default_writer = _recording_writer
state, results = train.train_and_evaluate(config, workdir)
# The whole state on every host, also where its leaves are split over other hosts' devices.
host_state = multihost_utils.process_allgather(state, tiled=True)
leaves = jax.tree.leaves(host_state.params)

# Evaluation features streamed over the mesh, each host reading its rows of every batch
# (the last one padded), against this process reading every row itself.
from ssl_jax.evaluation import eval_data  # noqa: E402
from ssl_jax.methods import frozen_encoder  # noqa: E402

setup, _ = train.build(config)
encode_fn = frozen_encoder(setup.method, state)
queries = eval_data.plan(config).queries.limited(100)
sharded, sharded_labels = eval_data.stream_features(encode_fn, queries, 16,
                                                    config.eval.image_size, setup.mesh)
local, local_labels = eval_data.stream_features(frozen_encoder(setup.method, host_state),
                                                queries, 16, config.eval.image_size)
streamed = {'rows': len(sharded), 'labels_equal': bool((sharded_labels == local_labels).all()),
            'max_difference': float(np.max(np.abs(sharded - local))),
            'max_feature': float(np.max(np.abs(local)))}
if jax.process_index() == 0:
  np.savez(out, *leaves, step=int(state.step))
print('RESULT ' + json.dumps({
    'devices': jax.device_count(), 'processes': jax.process_count(), 'step': int(state.step),
    'restored_step': results['restored_step'], 'steps_run': results['steps_run'],
    'stopped_by': results['stopped_by'], 'losses': losses, 'streamed': streamed}),
      flush=True)
