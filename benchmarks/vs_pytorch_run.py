"""JAX vs PyTorch end to end: images/s of command 1's training run, the same recipe in both.

  python benchmarks/vs_pytorch_run.py [--config=configs/simclr.py] [--steps=500]

`benchmarks/vs_pytorch.py` times the compiled step alone; this times the whole training loop
of README command 1, in which the step is one part:

- jax: `ssl_jax.train.train_and_evaluate` as command 1 runs it, in a temporary workdir,
  stopped after `steps` steps (`stop_at_step`: the schedule is the full run's; the final
  evaluation, which ends the run, is not part of the loop and is not run). The wall time
  covers building the input pipeline, initialising and compiling, the steps, the progress
  lines and TensorBoard scalars every `log_every_steps`, the kNN monitor and representation
  diagnostics every `eval_every_steps`, and orbax checkpoints every
  `checkpoint_every_steps` and at the stop.
- torch (channels-last): the same loop in eager PyTorch (the recipe of vs_pytorch.py, its
  faster memory format): the training images loaded by the same source, shuffled each epoch,
  batches of `batch_size` gathered from memory and augmented batched on tensors; the loss
  read and a progress line printed every `log_every_steps`; every `eval_every_steps` the
  same kNN monitor (the encoder in eval mode on the first `eval.periodic_bank_size` training
  and `eval.periodic_test_size` test images at `eval.image_size` pixels, cosine, k and
  temperature from the config, weighted votes); `torch.save` of the model and momenta at the
  same steps as the JAX checkpoints. It computes no representation diagnostics and writes
  no TensorBoard events: JAX does a little more work.

The two run one after the other (`--order`), each from a fresh start in a process of its own. `steps` defaults to
500, the monitor's period, so both loops pay one evaluation and one checkpoint per 500 steps,
as in command 1 (3,744 steps, 7 evaluations); start-up weighs more in a short run than in
command 1. Prints a table of wall time, images/s and the ratio of JAX's images/s to
PyTorch's, then one JSON line.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_throughput  # noqa: E402  (puts the repository root on sys.path; --config)
import vs_pytorch  # noqa: E402  (the PyTorch recipe; --rounds, unused here)
from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
FLAGS.set_default('steps', 500)
flags.DEFINE_list('order', ['jax', 'torch'], 'Which loops run, in this order.')

torch = vs_pytorch.torch
JAX, TORCH = 'jax', 'torch (channels-last)'


def _child(fn, config, steps: int, conn) -> None:
  from ssl_jax import cli
  cli.quiet_logging(sys.argv)
  conn.send(fn(config, steps))


def run_alone(fn, config, steps: int) -> dict:
  """fn(config, steps) in a spawned process of its own, as a user runs either loop: in one
  process, the second loop would share the cores with the first's waiting threads (the JAX
  step of vs_pytorch.py timed 15-18 % slower beside PyTorch's)."""
  import multiprocessing
  context = multiprocessing.get_context('spawn')
  conn, child_conn = context.Pipe()
  # Not a daemon: the JAX input pipeline starts worker processes of its own.
  process = context.Process(target=_child, args=(fn, config, steps, child_conn))
  process.start()
  while not conn.poll(1.0):
    if not process.is_alive():
      raise RuntimeError(f'{fn.__name__} failed (exit code {process.exitcode}); its error is '
                         'above.')
  result = conn.recv()
  process.join()
  return result


def run_jax(config, steps: int) -> dict:
  from ssl_jax import train

  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    _, results = train.train_and_evaluate(config, workdir, stop_at_step=steps)
    seconds = time.perf_counter() - start
  if results['steps_run'] != steps:
    raise RuntimeError(f'The JAX run trained {results["steps_run"]} steps, not {steps}.')
  return {'seconds': seconds}


class TorchKnnMonitor:
  """`evaluation.monitor.KnnEvaluator` in PyTorch: kNN top-1 of the encoder's features of the
  queries against the bank's (cosine similarity, the k most similar, votes weighted by
  exp(similarity / temperature))."""

  def __init__(self, config, train: dict, test_source):
    """`train`: the training images and labels, read already; the bank is their first
    `eval.periodic_bank_size`."""
    e = config.eval
    self.k, self.temperature, self.batch_size = e.knn_k, e.knn_temperature, e.batch_size
    self.image_size = e.image_size
    bank = {key: value[:e.periodic_bank_size] for key, value in train.items()}
    queries = test_source.get_batch(list(range(min(e.periodic_test_size, len(test_source)))))
    self.bank_images, self.queries = self._prepare(bank['image']), self._prepare(queries['image'])
    self.bank_labels = torch.tensor(bank['label'], dtype=torch.long)
    self.query_labels = torch.tensor(queries['label'], dtype=torch.long)
    self.num_classes = int(self.bank_labels.max()) + 1

  def _prepare(self, images):
    x = torch.tensor(images).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != self.image_size:  # the evaluation's centre crop at image_size
      raise ValueError(f'images of side {x.shape[-1]}, evaluation size {self.image_size}: '
                       'only the whole image is implemented')
    return x.contiguous(memory_format=torch.channels_last)

  def score(self, encoder) -> float:
    encoder.eval()
    features = lambda x: torch.cat([torch.nn.functional.normalize(encoder(chunk), dim=1)
                                    for chunk in x.split(self.batch_size)])
    with torch.no_grad():
      bank, queries = features(self.bank_images), features(self.queries)
      similarity, index = (queries @ bank.T).topk(self.k, dim=1)
      votes = torch.zeros(len(queries), self.num_classes).scatter_add_(
          1, self.bank_labels[index], (similarity / self.temperature).exp())
    encoder.train()
    return (votes.argmax(dim=1) == self.query_labels).float().mean().item()


def run_torch(config, steps: int) -> dict:
  from ssl_jax import experiment, optim
  from ssl_jax.data import sources

  import jax
  import jax.numpy as jnp

  torch.set_num_threads(os.cpu_count())
  start = time.perf_counter()
  train_source = sources.get_source(config.data.name, config.data.train_split)
  test_source = sources.get_source(config.data.name, config.data.eval_split)
  total, warmup = experiment.schedule_steps(config, len(train_source))
  schedule = optim.learning_rate_schedule(config.optimizer, config.batch_size, total, warmup)
  learning_rates = jax.device_get(schedule(jnp.arange(steps))).tolist()
  everything = train_source.get_batch(list(range(len(train_source))))
  images = torch.tensor(everything['image'])
  monitor = TorchKnnMonitor(config, everything, test_source)
  step = vs_pytorch.TorchStep(config, everything['image'][:config.batch_size], learning_rates,
                              torch.channels_last)
  per_epoch = len(images) // config.batch_size
  workdir = tempfile.TemporaryDirectory()
  order, losses = None, []
  for i in range(steps):
    if i % per_epoch == 0:
      order = torch.randperm(len(images))
    rows = order[(i % per_epoch) * config.batch_size:(i % per_epoch + 1) * config.batch_size]
    step.images = images[rows]
    losses.append(step.step())
    done = i + 1
    if done % config.log_every_steps == 0 or done == steps:
      loss = statistics.mean(x.item() for x in losses)
      logging.info('torch step %d/%d: loss %.4f', done, steps, loss)
      losses = []
    if config.eval_every_steps and done % config.eval_every_steps == 0:
      logging.info('torch step %d: kNN %.4f', done, monitor.score(step.model[0]))
    if done % config.checkpoint_every_steps == 0 or done == steps:
      torch.save({'model': step.model.state_dict(), 'momenta': step.momenta},
                 os.path.join(workdir.name, f'checkpoint_{done}.pt'))
  seconds = time.perf_counter() - start
  workdir.cleanup()
  return {'seconds': seconds}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  import jax
  jax.config.parse_flags_with_absl()
  from ssl_jax.data import sources

  config, steps = FLAGS.config, FLAGS.steps
  unknown = set(FLAGS.order) - {'jax', 'torch'}
  if unknown or not FLAGS.order:
    raise app.UsageError(f'--order takes jax and/or torch, not {FLAGS.order}.')
  if 'torch' in FLAGS.order:
    if torch is None:
      raise app.UsageError(vs_pytorch.TORCH_MISSING)
    channels = sources.source_info(config.data.name).image_shape[-1]
    if problems := vs_pytorch.torch_recipe_problems(config, channels,
                                                    jax.devices()[0].platform):
      raise app.UsageError('The PyTorch recipe does not implement this config:\n  '
                           + '\n  '.join(problems))

  runs = {}
  for name in FLAGS.order:
    runs[JAX if name == 'jax' else TORCH] = run_alone(run_jax if name == 'jax' else run_torch,
                                                      config, steps)
  images = steps * config.batch_size
  rows = [{'implementation': name, 'seconds': r['seconds'], 'images_per_sec': images / r['seconds']}
          for name, r in runs.items()]
  for row in rows:  # images/s of JAX over this one's, as vs_pytorch.py: > 1 when JAX is faster
    row['jax_over_this'] = (row['seconds'] / runs[JAX]['seconds']
                            if JAX in runs and row['implementation'] != JAX else None)
  print(f'{train_throughput.model_summary(config)}: {steps} steps of batch '
        f'{config.batch_size} from a fresh start, {os.cpu_count()} CPU cores')
  print(f'{"implementation":24}{"wall s":>9}{"images/s":>11}{"JAX / this":>12}')
  for row in rows:
    ratio = '-' if row['jax_over_this'] is None else f'{row["jax_over_this"]:.2f}'
    print(f'{row["implementation"]:24}{row["seconds"]:9.1f}{row["images_per_sec"]:11.1f}'
          f'{ratio:>12}')
  print(json.dumps({'steps': steps, 'batch_size': config.batch_size, 'rows': rows}))


if __name__ == '__main__':
  from ssl_jax import cli
  cli.quiet_logging(sys.argv)  # command 1's short log (--verbosity brings the rest back)
  app.run(main)
