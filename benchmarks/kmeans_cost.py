"""The cost of PCL's clustering step against its ordinary train step, on this machine.

  python benchmarks/kmeans_cost.py [--paper=false] [--repeats=2]

PCL (methods/pcl.py) runs, at each epoch start after its warm-up, spherical k-means of every
granularity on the memory bank and each cluster's concentration phi, inside that epoch's
first step. This prints a Markdown table: the time of that clustering step (k-means of all
granularities + phi, compiled, the best of `--repeats` runs after one that compiles) on a
random bank of the CPU recipe's size (60,000 x 128, K = configs/pcl.py's), next to one
ordinary train step of the CPU recipe (batch 256, no clustering), both on one device; and
for the paper's recipe (ImageNet's 1.28M x 128, K = 25000/50000/100000, 20 iterations) the
estimate from FLOPs at the rate the CPU-size clustering reached (`--paper` runs it instead,
where memory and patience allow).

FLOPs of one k-means run: each of its iterations scores every row against every centroid
(2 N K d) and sums the rows per cluster as a one-hot product (2 N K d), the final
assignment scores once more (2 N K d): (4 iterations + 2) N K d, plus N K for phi.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from ssl_jax import experiment, parallel
from ssl_jax.configs import pcl as pcl_config
from ssl_jax.methods import RunLength, build_method

FLAGS = flags.FLAGS
flags.DEFINE_bool('paper', False, "Run the paper's clustering (1.28M x 128) instead of "
                  'estimating it from FLOPs.')
flags.DEFINE_integer('repeats', 2, 'Timed runs of each step (the best is shown).')

PAPER_ROWS = 1_281_167  # ImageNet's training images


def clustering_flops(rows: int, dim: int, ks, iterations: int) -> float:
  return float(sum((4 * iterations + 2) * rows * k * dim + rows * k for k in ks))


def best_time(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # compiles
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def clustering_seconds(config, rows: int, repeats: int) -> float:
  """The method's clustering (`PCL._cluster`) on a random full bank of `rows` keys."""
  method = build_method(config, RunLength(total_steps=1, steps_per_epoch=1, num_examples=rows))
  d = config.method.projector_output_dim
  ks = method.config.method.num_clusters
  memory = jax.random.normal(jax.random.PRNGKey(0), (rows, d), jnp.float32)
  memory = memory / jnp.linalg.norm(memory, axis=1, keepdims=True)
  state = {'memory': memory, 'filled': jnp.ones((rows,), bool),
           'assignments': jnp.full((len(ks), rows), -1, jnp.int32)}
  # The method's own clustering step, as its objective calls it at an epoch start.
  cluster = jax.jit(lambda s: method._cluster(s, jnp.int32(1), None))  # pylint: disable=W0212
  return best_time(lambda: cluster(state), repeats)


def train_step_seconds(config, repeats: int) -> float:
  """One step of the CPU recipe (no clustering: step 1 is not an epoch start)."""
  built = experiment.build(config, num_train_examples=60000, image_channels=1,
                           mesh=parallel.make_mesh(1))
  state = built.init_state(0)
  step = built.make_train_step()
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (config.batch_size, 28, 28, 1), np.uint8)
  index = rng.permutation(60000)[:config.batch_size].astype(np.int32)
  images, paired = parallel.global_batch_from_host((images, (index,)), built.mesh)
  state, _ = step(state, images, paired=paired)  # compiles; the state is donated
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = step(state, images, paired=paired)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return min(times)


def main(argv):
  del argv
  cpu = pcl_config.get_config()
  paper = pcl_config.get_config('backbone=resnet50')
  d = cpu.method.projector_output_dim
  rows = []
  cpu_flops = clustering_flops(60000, d, cpu.method.num_clusters, cpu.method.kmeans_iterations)
  cpu_seconds = clustering_seconds(cpu, 60000, FLAGS.repeats)
  rate = cpu_flops / cpu_seconds
  rows.append(('clustering, CPU recipe', f'60000 x {d}', cpu.method.num_clusters,
               cpu.method.kmeans_iterations, cpu_flops, f'{cpu_seconds:.2f}'))
  paper_flops = clustering_flops(PAPER_ROWS, paper.method.projector_output_dim,
                                 paper.method.num_clusters, paper.method.kmeans_iterations)
  if FLAGS.paper:
    shown = f'{clustering_seconds(paper, PAPER_ROWS, 1):.1f}'
  else:
    shown = f'~{paper_flops / rate:.0f} (estimate)'
  rows.append(("clustering, paper's recipe", f'{PAPER_ROWS} x 128',
               paper.method.num_clusters, paper.method.kmeans_iterations, paper_flops, shown))
  step_seconds = train_step_seconds(cpu, FLAGS.repeats)
  rows.append(('train step, CPU recipe (batch 256)', '-', '-', '-', float('nan'),
               f'{step_seconds:.3f}'))
  print(f'{jax.devices()[0].device_kind}, {len(jax.devices())} device(s); clustering at '
        f'{rate / 1e9:.1f} GFLOP/s')
  print('| step | bank | K | iterations | GFLOP | seconds |')
  print('|---|---|---|---|---|---|')
  for name, bank, ks, iters, flops, seconds in rows:
    gflop = '-' if np.isnan(flops) else f'{flops / 1e9:.0f}'
    print(f'| {name} | {bank} | {ks} | {iters} | {gflop} | {seconds} |')
  print(f'One CPU-recipe epoch is {int(60000 // cpu.batch_size)} steps: the clustering adds '
        f'{cpu_seconds / (step_seconds * (60000 // cpu.batch_size)):.1%} to it.')


if __name__ == '__main__':
  app.run(main)
