"""One process of the multi-host test: joins a localhost cluster, trains the tiny config and
saves its final parameters. Usage: multihost_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR OUT"""

import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'

import jax  # noqa: E402
import numpy as np  # noqa: E402

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
stop = int(os.environ.get('STOP_AT_STEP', '0')) or None
state, results = train.train_and_evaluate(config, workdir, stop_at_step=stop)
leaves = jax.tree.leaves(jax.device_get(state.params))
if jax.process_index() == 0:
  np.savez(out, *leaves, step=int(state.step))
print('devices', jax.device_count(), 'processes', jax.process_count(), 'step', int(state.step))
