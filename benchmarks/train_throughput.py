"""Training throughput and model FLOP utilisation (MFU) of one config's train step.

  python benchmarks/train_throughput.py [--config=configs/simclr.py[:ARG]] \
      [--config.FIELD=VALUE ...] [--steps=20] [--warmup_steps=3]

Builds the train step exactly as `ssl_jax.train` does (method, optimizer, replicated state,
mesh over all visible devices) and feeds it a synthetic uint8 batch of the dataset's image
shape, so no data is read and the input pipeline is not part of the figure. Reports the step
time, images/s, the step's FLOPs from XLA's cost analysis, and the fraction of this machine's
matmul peak (measured in the same run) that the step achieves. Prints a table, then the same
figures as one JSON line for scripts.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

# Runnable as a plain script from anywhere: the repository root holds `ssl_jax` and `configs`
# (the package need not be pip-installed). Set before the config flag, which loads its default.
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
# The default is resolved from this file so the script works from any directory; a path given
# on the command line is relative to the current directory, as for ssl_jax.main.
config_flags.DEFINE_config_file(
    'config', os.path.join(ROOT, 'configs', 'simclr.py'),
    'Experiment config file, as for ssl_jax.main; override fields with --config.FIELD=VALUE.',
    lock_config=True)
flags.DEFINE_integer('steps', 20, 'Timed train steps.', lower_bound=1)
flags.DEFINE_integer('warmup_steps', 3, 'Untimed steps run first (after compilation).',
                     lower_bound=0)
flags.DEFINE_integer('matmul_repeats', 20, 'Timed repeats of the peak-measuring matmul.',
                     lower_bound=1)

MATMUL_SIZE = 2048


def build_step(config, mesh):
  """(train_step, state): the jitted step and a replicated initial state, built by the
  trainer's builder. The data set is not read: its size only sets the schedule's length,
  whose values do not change the step's cost."""
  from ssl_jax import experiment
  from ssl_jax.data import sources

  info = sources.source_info(config.data.name)
  built = experiment.build(config, num_train_examples=config.batch_size * 1000,
                           image_channels=info.image_shape[-1], mesh=mesh)
  return built.make_train_step(), built.init_state()


def synthetic_batch(config, mesh):
  """A global uint8 batch of the dataset's stored image shape and its int32 labels, sharded
  as the trainer's."""
  import jax
  import numpy as np
  from ssl_jax import parallel
  from ssl_jax.data import sources

  height, width, channels = sources.source_info(config.data.name).image_shape
  if height is None or width is None:  # variable-size TFDS images: use the crop size
    height = width = config.augment.crop_size
  local_rows = config.batch_size // jax.process_count()
  rng = np.random.default_rng(config.seed)
  local = rng.integers(0, 256, (local_rows, height, width, channels), dtype=np.uint8)
  labels = rng.integers(0, 10, (local_rows,), dtype=np.int32)
  return parallel.global_batch_from_host((local, labels), mesh)


def compile_step(train_step, state, images, labels):
  """(compiled step, seconds to lower and compile, FLOPs per step over all devices).

  Lowering only traces: the donated state is consumed by the first *call*, not here. XLA's
  cost analysis is of the partitioned per-device program, hence the factor of device count.
  """
  import jax

  start = time.perf_counter()
  compiled = train_step.lower(state, images, labels).compile()
  seconds = time.perf_counter() - start
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per program
    cost = cost[0]
  return compiled, seconds, float(cost['flops']) * jax.device_count()


def time_steps(compiled, state, images, labels, steps: int, warmup_steps: int) -> list[float]:
  """Seconds per step for `steps` steps after `warmup_steps`. Each call donates its input
  state, so the loop always passes on the state the previous call returned."""
  import jax

  times = []
  for i in range(warmup_steps + steps):
    start = time.perf_counter()
    state, metrics = compiled(state, images, labels, ())  # no paired inputs
    jax.block_until_ready((state, metrics))
    if i >= warmup_steps:
      times.append(time.perf_counter() - start)
  return times


def matmul_peak_gflops(repeats: int) -> float:
  """GFLOP/s of a jitted float32 2048x2048 matmul on one device: the practical peak that the
  step's achieved rate is compared with. The median (as for the step time) keeps both figures
  comparable when other work shares the machine."""
  import jax
  import jax.numpy as jnp

  device = jax.devices()[0]
  keys = jax.random.split(jax.random.PRNGKey(0))
  a, b = (jax.device_put(jax.random.normal(k, (MATMUL_SIZE, MATMUL_SIZE), jnp.float32), device)
          for k in keys)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * MATMUL_SIZE**3 / statistics.median(times) / 1e9


def model_summary(config) -> str:
  m = config.model
  size = f'width={m.width}' if m.name.startswith('resnet') else f'widths={tuple(m.widths)}'
  return (f'{config.method.name}, {m.name} {size}, crop {config.augment.crop_size}, '
          f'global batch {config.batch_size}, {m.dtype}')


def measure(config, steps: int, warmup_steps: int, matmul_repeats: int) -> dict:
  import jax
  from ssl_jax import config_lib, parallel

  config_lib.validate(config, jax.device_count(), jax.process_count())
  mesh = parallel.make_mesh()
  train_step, state = build_step(config, mesh)
  images, labels = synthetic_batch(config, mesh)
  compiled, compile_s, flops = compile_step(train_step, state, images, labels)
  times = time_steps(compiled, state, images, labels, steps, warmup_steps)
  median, mean = statistics.median(times), statistics.mean(times)

  devices, platform = jax.device_count(), jax.devices()[0].platform
  peak_per_device = matmul_peak_gflops(matmul_repeats)
  # Simulated CPU devices share the same cores, so the machine's peak is one device's.
  peak = peak_per_device if platform == 'cpu' else peak_per_device * devices
  achieved = flops / median / 1e9
  return {
      'method': config.method.name, 'model': config.model.name,
      'summary': model_summary(config), 'batch_size': config.batch_size,
      'devices': devices, 'platform': platform, 'compile_s': compile_s,
      'step_ms_median': median * 1e3, 'step_ms_mean': mean * 1e3,
      'images_per_sec': config.batch_size / median, 'gflop_per_step': flops / 1e9,
      'achieved_gflops': achieved, 'peak_gflops_per_device': peak_per_device,
      'peak_gflops': peak, 'mfu_percent': 100 * achieved / peak,
  }


def format_table(r: dict) -> str:
  peak = f'{r["peak_gflops_per_device"]:.1f} per device'
  if r['devices'] > 1 and r['platform'] != 'cpu':
    peak += f' (x{r["devices"]} = {r["peak_gflops"]:.1f})'
  rows = [
      ('config', r['summary']),
      ('devices', f'{r["devices"]} x {r["platform"]}'),
      ('compile time', f'{r["compile_s"]:.1f} s'),
      ('step time median / mean', f'{r["step_ms_median"]:.1f} / {r["step_ms_mean"]:.1f} ms'),
      ('images/s', f'{r["images_per_sec"]:.1f} (each image is two augmented views)'),
      ('model GFLOP per step', f'{r["gflop_per_step"]:.2f} (XLA cost analysis, all devices)'),
      ('achieved GFLOP/s', f'{r["achieved_gflops"]:.1f}'),
      ('matmul peak GFLOP/s', f'{peak} (float32 {MATMUL_SIZE}x{MATMUL_SIZE})'),
      ('MFU (fraction of peak)', f'{r["mfu_percent"]:.1f} %'),
  ]
  width = max(len(name) for name, _ in rows)
  lines = [f'{name:<{width}}  {value}' for name, value in rows]
  if r['platform'] == 'cpu' and r['devices'] > 1:
    lines.append(f'note: the {r["devices"]} cpu devices are simulated and share the same '
                 'cores; the peak is that of the whole machine (one device).')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Imported after flag parsing so that jax sees XLA_FLAGS and its own absl flags.
  import jax
  jax.config.parse_flags_with_absl()
  result = measure(FLAGS.config, FLAGS.steps, FLAGS.warmup_steps, FLAGS.matmul_repeats)
  print(format_table(result))
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  app.run(main)
