"""Large global batches on one device with `--config.microbatches=K`: for each model and
batch, XLA's memory peak of the train step at K = 1, the smallest K whose peak fits a memory
budget, and the measured time and resident memory of the steps that fit.

  python benchmarks/large_batch.py [--models=convnet,resnet18] \
      [--batches=256,512,1024,2048,4096,8192] [--ks=1,2,4,8,16,32,64] [--budget_gib=22] \
      [--resnet_width=16] [--steps=3] [--run|--norun] [--json|--nojson]

Models (SimCLR, configs/simclr.py, its optimizer: LARS; no online probe):
* convnet: the default CPU recipe, the 16-32-64 ConvNet on 16-pixel crops of Fashion-MNIST's
  28x28x1 images (`configs/simclr.py:batch=B`);
* resnet18: the CIFAR recipe (`configs/simclr.py:backbone=resnet18,dataset=tfds:cifar10,
  batch=B`: CIFAR stem, 32-pixel crops of 32x32x3 images) with model.width = --resnet_width
  (the first stage's channels; 64 is the paper's ResNet-18). The default, 16, is chosen so that
  at batch 8192 the K = 1 step does not fit the default budget (XLA: 31.9 GiB) while K = 2
  does, and a K = 1 step at 4096 takes about two minutes on 2 cores;
* vit_small: ViT-S/4 (patch 4: 64 patches of 32-pixel CIFAR crops) with LayerNorm projection
  heads (`model.head_norm=layer`), so that every K gives the exact K = 1 gradient; the generic
  ViT AdamW recipe. A step costs minutes on 2 cores even at small batches: run it with --norun.

Each step is built exactly as the trainer builds it (`experiment.build`, `make_train_step`)
on one device (a one-device mesh: the real CPU, no simulated devices), with config.microbatches
= K (ssl_jax/microbatch.py: the exact gradient of the whole batch's loss, the networks run K
micro-batches at a time, for one more forward pass). It is lowered on abstract inputs (the
dataset's stored uint8 images, cropped on the device as for Fashion-MNIST and CIFAR) and
compiled with the trainer's options (`ssl_jax.compiler_options.for_train_step`; remat is off
here). For each batch:

1. K = 1 is compiled; if its peak exceeds --budget_gib, the next K of --ks that divides the
   batch is compiled, and so on until one fits (compilation only: nothing is allocated);
2. where K = 1 fits, the smallest K > 1 of --ks is compiled too, to time it against K = 1;
3. with --run (the default), the steps that fit are executed on random uint8 images
   (`parallel.global_batch_from_host`): one warm-up step, then --steps timed steps; from
   batch 4096 up, where a step takes minutes, one step, timed, without a warm-up. That first
   call costs a little more than later ones (convnet at 4096, K = 1: 12.0 s, then 10.1 and
   9.3 s), for every K alike, so the ratio to K = 1 stays like for like.

Columns (GiB = 2^30 bytes):
* model, batch (global = per device: one device), K (config.microbatches);
* args, temp, out, peak: XLA's memory analysis of the compiled step as benchmarks/memory.py
  defines it: args the inputs (train state and images), temp XLA's temporary buffers after
  buffer sharing (activations kept for the backward pass, gradients, optimizer temporaries),
  out the outputs that do not reuse a donated input (the step donates its state),
  peak = args + temp + out, every buffer the step owns at once at worst;
* fits: peak <= --budget_gib;
* compile s: seconds to build, lower and compile the step;
* step s: median seconds of the timed steps (each blocked until its results are ready);
* img/s: batch / step s (each image gives two augmented views);
* RSS +GiB: the largest growth of the process's resident memory during a step over what it
  held just before the call (sampled every millisecond from /proc/self/statm, warm-up step
  included): what executing the step allocated, the measured counterpart of temp + out;
* RSS GiB: the process's largest resident memory sampled during this row's steps (Python,
  jax, compiled programs, the state and the images included);
* vs K=1: step s / step s of K = 1 at the same batch (where both ran): the price of K.
Then one JSON line per row (--json) with the same figures, and the process's peak resident
memory (ru_maxrss) at the end.

On the CPU the micro-batches run as an unrolled loop with optimization barriers
(`microbatch.unrolled`): inside a `lax.scan` XLA:CPU (jaxlib 0.10.2) runs convolutions on its
naive fallback, 18-36 times slower (benchmarks/large_batch_results.md: figures and a ten-line
reproduction). The unrolled loop keeps more of each micro-batch's buffers than the scan would,
so the CPU's peak falls more slowly with K than an accelerator's would.

The default budget, 22 GiB, is this machine's 23.5 GiB of RAM less 1.5 GiB for the OS, the
Python process and the runtime's own reserve, which XLA's analysis does not count. XLA:CPU's
buffer assignment is not an accelerator's, so take the peaks as estimates; how they fall
with K is the point. Measured tables: benchmarks/large_batch_results.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import sys
import threading
import time

# Runnable as a plain script from anywhere: the repository root holds `ssl_jax` and `configs`.
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list('models', ['convnet', 'resnet18'], 'Models: convnet, resnet18, vit_small.')
flags.DEFINE_list('batches', ['256', '512', '1024', '2048', '4096', '8192'],
                  'Global batch sizes (one device: also the per-device batch).')
flags.DEFINE_list('ks', ['1', '2', '4', '8', '16', '32', '64'],
                  'Micro-batch counts to try, in order; those that do not divide a batch are '
                  'skipped there.')
flags.DEFINE_float('budget_gib', 22.0, "Memory budget for XLA's peak, GiB.")
flags.DEFINE_integer('resnet_width', 16, "resnet18's model.width (first stage's channels).",
                     lower_bound=1)
flags.DEFINE_integer('steps', 3, 'Timed steps per row, after one warm-up step, below batch '
                     '4096 (from 4096 up: one step, no warm-up).', lower_bound=1)
flags.DEFINE_bool('run', True, 'Execute and time the steps that fit (--norun: compile only).')
flags.DEFINE_bool('json', True, 'Print one JSON line per row after the table.')

MODELS = ('convnet', 'resnet18', 'vit_small')
GIB = 2**30
BIG_BATCH = 4096  # from here on, one timed step and no warm-up


@dataclasses.dataclass
class Row:
  model: str
  batch: int
  k: int
  args: int
  temp: int
  out: int
  compile_s: float
  fits: bool = False
  step_s: float | None = None
  step_times: list = dataclasses.field(default_factory=list)
  rss_growth: int | None = None
  rss_peak: int | None = None
  ratio: float | None = None

  @property
  def peak(self) -> int:
    return self.args + self.temp + self.out

  @property
  def images_per_s(self) -> float | None:
    return None if self.step_s is None else self.batch / self.step_s

  def as_dict(self) -> dict:
    return {'model': self.model, 'batch': self.batch, 'microbatches': self.k,
            'args_gib': self.args / GIB, 'temp_gib': self.temp / GIB, 'out_gib': self.out / GIB,
            'peak_gib': self.peak / GIB, 'fits': self.fits, 'budget_gib': FLAGS.budget_gib,
            'compile_s': self.compile_s, 'step_s': self.step_s, 'step_times_s': self.step_times,
            'images_per_sec': self.images_per_s,
            'rss_growth_gib': None if self.rss_growth is None else self.rss_growth / GIB,
            'rss_peak_gib': None if self.rss_peak is None else self.rss_peak / GIB,
            'time_vs_k1': self.ratio}


def make_config(model: str, batch: int, k: int, resnet_width: int):
  """configs/simclr.py's recipe for `model` at global batch `batch`, with microbatches = k;
  and the stored image shape it is fed."""
  from ssl_jax.configs import simclr
  if model == 'convnet':
    config = simclr.get_config(f'batch={batch}')
    shape = (28, 28, 1)  # Fashion-MNIST
  elif model == 'resnet18':
    config = simclr.get_config(f'backbone=resnet18,dataset=tfds:cifar10,batch={batch}')
    config.model.width = resnet_width
    config.model.small_images = True
    shape = (32, 32, 3)  # CIFAR
  elif model == 'vit_small':
    # ViT-S/4 on 32-pixel crops (64 patches), LayerNorm heads: no batch statistics anywhere,
    # so every K gives the whole batch's gradient.
    config = simclr.get_config(f'backbone=vit_small,dataset=tfds:cifar10,batch={batch},'
                               'crop=32')
    config.model.patch_size = 4
    config.model.head_norm = 'layer'
    shape = (32, 32, 3)
  else:
    raise ValueError(f'--models: {model!r} is not one of {MODELS}.')
  config.microbatches = k
  config.eval.online_probe = False
  return config, shape


def compile_row(model: str, batch: int, k: int, mesh):
  """(Row with XLA's memory analysis, (built, compiled step, image shape))."""
  import jax
  import numpy as np
  from ssl_jax import compiler_options, experiment, parallel

  config, shape = make_config(model, batch, k, FLAGS.resnet_width)
  start = time.perf_counter()
  built = experiment.build(config, num_train_examples=batch * 1000, image_channels=shape[-1],
                           mesh=mesh)
  state = jax.eval_shape(built.init_fn, jax.random.PRNGKey(0))
  images = jax.ShapeDtypeStruct((batch, *shape), np.uint8,
                                sharding=parallel.batch_sharded(mesh))
  compiled = built.make_train_step().lower(state, images).compile(
      compiler_options=compiler_options.for_train_step(config.model))
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  row = Row(model, batch, k, args=memory.argument_size_in_bytes,
            temp=memory.temp_size_in_bytes,
            out=memory.output_size_in_bytes - memory.alias_size_in_bytes, compile_s=seconds)
  row.fits = row.peak <= FLAGS.budget_gib * GIB
  return row, (built, compiled, shape)


def rss_bytes() -> int:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


class RssSampler:
  """The largest resident memory seen between `start()` and `stop()`, sampled every ms."""

  def __init__(self):
    self.peak = 0
    self._done = threading.Event()
    self._thread = threading.Thread(target=self._sample, daemon=True)

  def _sample(self):
    while not self._done.is_set():
      self.peak = max(self.peak, rss_bytes())
      time.sleep(0.001)

  def __enter__(self):
    self.peak = rss_bytes()
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._done.set()
    self._thread.join()
    self.peak = max(self.peak, rss_bytes())


def run_row(row: Row, built, compiled, shape, timed_steps: int, warmup_steps: int):
  """Executes the compiled step on random uint8 images: `warmup_steps` untimed steps, then
  `timed_steps` timed ones; fills the row's time and resident-memory figures."""
  import jax
  import numpy as np
  from ssl_jax import parallel

  state = built.init_state()
  rng = np.random.default_rng(0)
  images, labels = parallel.global_batch_from_host(
      (rng.integers(0, 256, (row.batch, *shape), np.uint8),
       np.zeros((row.batch,), np.int32)), built.mesh)
  jax.block_until_ready((state, images, labels))
  growth, peak, times = 0, 0, []
  for i in range(warmup_steps + timed_steps):
    before = rss_bytes()
    with RssSampler() as rss:
      start = time.perf_counter()
      state, metrics = compiled(state, images, labels, ())  # donates the previous state
      jax.block_until_ready((state, metrics))
      seconds = time.perf_counter() - start
    growth, peak = max(growth, rss.peak - before), max(peak, rss.peak)
    if i >= warmup_steps:
      times.append(seconds)
  loss = float(metrics['loss'])
  if not np.isfinite(loss):
    raise FloatingPointError(f'{row.model} batch {row.batch} K={row.k}: loss {loss}.')
  row.step_times, row.step_s = times, statistics.median(times)
  row.rss_growth, row.rss_peak = max(0, growth), peak
  del state, images, labels, metrics


def fmt(x, spec: str = '.2f', scale: float = 1.0) -> str:
  return '-' if x is None else format(x / scale, spec)


def table(rows: list[Row]) -> str:
  head = ['model', 'batch', 'K', 'args GiB', 'temp GiB', 'out GiB', 'peak GiB', 'fits',
          'compile s', 'step s', 'img/s', 'RSS +GiB', 'RSS GiB', 'vs K=1']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    cells = [r.model, str(r.batch), str(r.k), fmt(r.args, scale=GIB), fmt(r.temp, scale=GIB),
             fmt(r.out, scale=GIB), fmt(r.peak, scale=GIB), 'yes' if r.fits else 'no',
             f'{r.compile_s:.0f}', fmt(r.step_s, '.3g'), fmt(r.images_per_s, '.0f'),
             fmt(r.rss_growth, scale=GIB), fmt(r.rss_peak, scale=GIB),
             fmt(r.ratio, '.2f') + ('x' if r.ratio is not None else '')]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plan_batch(model: str, batch: int, ks: list[int], mesh, log) -> list:
  """Compiles K = 1, then the Ks of `ks` dividing `batch` until one fits; where K = 1 fits,
  the smallest K > 1 too. Returns [(row, compiled-or-None)] in K order."""
  out = []
  for k in [k for k in ks if batch % k == 0]:
    row, handle = compile_row(model, batch, k, mesh)
    log(row)
    out.append((row, handle if row.fits else None))  # only a step that fits is run
    if row.fits and k > 1:
      break
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  import jax
  jax.config.parse_flags_with_absl()
  from ssl_jax import parallel

  batches = [int(b) for b in FLAGS.batches]
  ks = [int(k) for k in FLAGS.ks]
  for m in FLAGS.models:
    if m not in MODELS:
      raise app.UsageError(f'--models: {m!r} is not one of {MODELS}.')
  ks = sorted(set(ks) | {1})
  mesh = parallel.make_mesh(1)
  print(f'SimCLR on 1 {jax.devices()[0].platform} device ({os.cpu_count()} cores), '
        f'models {FLAGS.models} (resnet18 width {FLAGS.resnet_width}), batches {batches}, '
        f'K in {ks}, budget {FLAGS.budget_gib:g} GiB, '
        f'{"compile only" if not FLAGS.run else "run"}', flush=True)

  def log(row: Row, what: str = 'compiled'):
    line = (f'  {row.model} batch {row.batch} K={row.k}: peak {row.peak / GIB:.2f} GiB '
            f'({"fits" if row.fits else "does not fit"}), {what} in {row.compile_s:.0f} s')
    if row.step_s is not None:
      line = (f'  {row.model} batch {row.batch} K={row.k}: step {row.step_s:.3g} s '
              f'({row.images_per_s:.0f} img/s), RSS +{row.rss_growth / GIB:.2f} GiB, '
              f'peak RSS {row.rss_peak / GIB:.2f} GiB')
    print(line, flush=True)

  start = time.perf_counter()
  rows = []
  for model in FLAGS.models:
    for batch in batches:
      planned = plan_batch(model, batch, ks, mesh, log)
      base = None
      for row, handle in planned:
        if FLAGS.run and handle is not None and row.fits:
          built, compiled, shape = handle
          big = batch >= BIG_BATCH
          run_row(row, built, compiled, shape, timed_steps=1 if big else FLAGS.steps,
                  warmup_steps=0 if big else 1)
          if row.k == 1:
            base = row.step_s
          elif base is not None:
            row.ratio = row.step_s / base
          log(row)
        rows.append(row)
      del planned
  print()
  print(table(rows))
  maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
  print(f'\nprocess peak RSS (ru_maxrss) {maxrss / GIB:.2f} GiB; '
        f'wall time {time.perf_counter() - start:.0f} s', flush=True)
  if FLAGS.json:
    for r in rows:
      print(json.dumps(r.as_dict()), flush=True)


if __name__ == '__main__':
  app.run(main)
