"""The training loop: init or restore, step, log, evaluate, checkpoint. Method-agnostic."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from ssl_jax import checkpoint, config_lib, optim, parallel
from ssl_jax.data import pipeline, sources
from ssl_jax.evaluation.history import DiagnosticsHistory
from ssl_jax.evaluation.monitor import DiagnosticsMonitor, KnnEvaluator
from ssl_jax.evaluation.online_probe import OnlineProbe
from ssl_jax.methods import RunLength, build_method, frozen_encoder
from ssl_jax.state import create_train_state
from ssl_jax.train_step import make_train_step

CONFIG_FILE = 'config.json'  # the run's config, written into the workdir
# At most this many steps are dispatched ahead of the host. With many more in flight, XLA:CPU's
# simulated devices have missed each other's collectives on a loaded machine (its all-reduce
# rendezvous aborts after 40 s; seen from 75 steps ahead); waiting every 16 steps costs one
# short pipeline drain per 16 steps.
MAX_STEPS_IN_FLIGHT = 16


def steps_per_epoch(config, num_train_examples: int) -> int:
  return max(1, num_train_examples // config.batch_size)


def schedule_steps(config, num_train_examples: int) -> tuple[int, int]:
  """(total_steps, warmup_steps) from epochs, unless total_steps is set."""
  per_epoch = steps_per_epoch(config, num_train_examples)
  total = config.total_steps or math.ceil(config.num_epochs * per_epoch)
  warmup = min(round(config.optimizer.warmup_epochs * per_epoch), total)
  return total, warmup


def _sample_images(config, source):
  channels = source[0]['image'].shape[-1]
  size = config.augment.crop_size
  return jnp.zeros((2, size, size, channels), jnp.float32)


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a run is built from; `train_and_evaluate` and `pretrained` share it, so a workdir is
  restored into exactly the structure that was trained."""
  mesh: Any
  train_source: Any
  total_steps: int
  warmup_steps: int
  schedule: Any
  tx: Any
  method: Any
  probe: Any
  init_fn: Callable  # PRNG key -> TrainState, replicated over the mesh


def build(config, mesh=None) -> Setup:
  config_lib.validate(config, jax.device_count(), jax.process_count())
  mesh = mesh or parallel.make_mesh()
  d = config.data
  train_source = sources.get_source(d.name, d.train_split, data_dir=d.data_dir,
                                    download=d.download)
  total_steps, warmup_steps = schedule_steps(config, len(train_source))
  schedule = optim.learning_rate_schedule(config.optimizer, config.batch_size, total_steps,
                                          warmup_steps)
  tx = optim.make_optimizer(config.optimizer, schedule)
  method = build_method(config, RunLength(total_steps, steps_per_epoch(config,
                                                                       len(train_source))))
  probe = None
  if config.eval.online_probe:
    num_classes = sources.source_info(d.name, d.data_dir).num_classes
    probe = OnlineProbe(num_classes, config.eval.online_probe_lr)
  sample = _sample_images(config, train_source)
  init_fn = jax.jit(lambda rng: create_train_state(method, tx, rng, sample, probe),
                    out_shardings=parallel.replicated(mesh))
  return Setup(mesh, train_source, total_steps, warmup_steps, schedule, tx, method, probe,
               init_fn)


def train_and_evaluate(config, workdir: str, stop_at_step: int | None = None):
  """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

  `stop_at_step` ends the run early (after checkpointing) as a pre-emption would; the
  schedule still spans the full run. Returns (final train state, results dict); the results
  hold the final evaluation when the run reached its last step.
  """
  setup = build(config)
  mesh, method, total_steps = setup.mesh, setup.method, setup.total_steps
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    config_lib.save_json(config, os.path.join(workdir, CONFIG_FILE))
  iterator = pipeline.make_train_iterator(setup.train_source,
                                          global_batch_size=config.batch_size,
                                          seed=config.seed, worker_count=config.data.worker_count)
  state = setup.init_fn(jax.random.PRNGKey(config.seed))

  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), config.keep_checkpoints)
  state, iterator, restored_step = ckpt.restore_or_keep(state, iterator)
  step = int(jax.device_get(state.step))

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if restored_step is None:
    writer.write_hparams(config_lib.flatten(config))
  logging.info('Training %s for %d steps (%d warm-up) on %d devices, global batch %d; '
               'starting at step %d.', config.method.name, total_steps, setup.warmup_steps,
               jax.device_count(), config.batch_size, step)

  train_step = make_train_step(method, setup.tx, mesh, config.augment, setup.schedule,
                               setup.probe)
  monitor = None
  if config.eval_every_steps:
    monitor = KnnEvaluator.from_config(config, config.eval.periodic_bank_size,
                                       config.eval.periodic_test_size)
  observer = None
  if config.eval.diagnostics:
    observer = RepresentationObserver(config, workdir, writer, resume_step=step)
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                           every_steps=config.log_every_steps, every_secs=None)
  last_step = min(total_steps, stop_at_step or total_steps)
  pending = []
  window_start = time.monotonic()
  window_steps = 0
  while step < last_step:
    batch = next(iterator)
    images, labels = parallel.global_batch_from_host((batch['image'], batch['label']), mesh)
    state, metrics = train_step(state, images, labels)
    pending.append(metrics)
    step += 1
    if step % MAX_STEPS_IN_FLIGHT == 0:
      jax.block_until_ready(metrics)
    window_steps += 1
    report(step)
    if step % config.log_every_steps == 0 or step == last_step:
      summary = {k: float(np.mean(v)) for k, v in
                 jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *pending)).items()}
      elapsed = time.monotonic() - window_start
      summary['images_per_sec'] = window_steps * config.batch_size / elapsed
      writer.write_scalars(step, summary)
      logging.info('step %d/%d: loss %.4f, %.0f images/s, ~%.0f s left', step, total_steps,
                   summary['loss'], summary['images_per_sec'],
                   (total_steps - step) * elapsed / window_steps)
      if not np.isfinite(summary['loss']):
        raise FloatingPointError(f'Loss is {summary["loss"]} at step {step}; lower '
                                 'optimizer.base_lr or raise warmup_epochs.')
      pending, window_start, window_steps = [], time.monotonic(), 0
    if monitor is not None and step % config.eval_every_steps == 0:
      eval_start = time.monotonic()
      with report.timed('eval'):
        encode_fn = frozen_encoder(method, state)
        writer.write_scalars(step, {'knn_top1': monitor.score_encoder(encode_fn)})
        if observer is not None:
          observer(step, encode_fn)
      window_start += time.monotonic() - eval_start  # images/s counts training time only
    if step % config.checkpoint_every_steps == 0 or step == last_step:
      ckpt.save(step, state, iterator)
  ckpt.wait()
  ckpt.close()

  results = {'step': step}
  if step == total_steps:
    # The random-init baseline is re-created rather than kept: the step donates its input.
    initial = setup.init_fn(jax.random.PRNGKey(config.seed)) if config.eval.baselines else None
    results.update(final_evaluation(config, method, state, initial))
    if observer is not None:
      results.update(observer(step, frozen_encoder(method, state), final=True))
    # The observer wrote its diagnostics/ scalars already.
    writer.write_scalars(step, {f'final/{k}': v for k, v in results.items()
                                if k != 'step' and not k.startswith('diagnostics/')})
    if jax.process_index() == 0:
      with open(os.path.join(workdir, 'results.json'), 'w') as f:
        json.dump(results, f, indent=2)
  writer.flush()
  return state, results


class RepresentationObserver:
  """Measures the representation diagnostics, raises the collapse alarm, logs the scalars and
  keeps the history and its plots in the workdir (process 0 writes files)."""

  def __init__(self, config, workdir: str, writer, resume_step: int):
    self.monitor = DiagnosticsMonitor.from_config(config)
    self.writer = writer
    self.plots = config.eval.plots
    self.chief = jax.process_index() == 0
    self.history = DiagnosticsHistory(workdir, resume_step) if self.chief else None
    self.class_names = sources.class_names(config.data.name, config.data.data_dir)

  def __call__(self, step: int, encode_fn, final: bool = False) -> dict:
    measurement, clean_features = self.monitor.measure(encode_fn)
    warnings = measurement.pop('collapse_warnings')
    for message in warnings:
      logging.warning('Step %d: possible collapse: %s', step, message)
    scalars = {f'diagnostics/{k}': v for k, v in measurement.items() if k != 'spectrum'}
    scalars['diagnostics/collapse_alarm'] = float(bool(warnings))
    self.writer.write_scalars(step, scalars)
    if not self.chief:
      return scalars
    self.history.append(step, dict(measurement, collapse_warnings=warnings))
    if self.plots:
      from ssl_jax.evaluation import plots
      figures = self.history.figures()
      if final:
        figures['embedding'] = plots.embedding_figure(clean_features, self.monitor.labels,
                                                      self.class_names)
      os.makedirs(self.history.plots_dir, exist_ok=True)
      for name, figure in figures.items():
        self.writer.write_images(step, {f'plots/{name}': plots.figure_to_array(figure)[None]})
        plots.save_figure(figure, os.path.join(self.history.plots_dir, f'{name}.png'))
    return scalars


def final_evaluation(config, method, state, initial_state=None) -> dict:
  """kNN top-1 on the full evaluation split, with the raw-pixel and random-init baselines."""
  evaluator = KnnEvaluator.from_config(config, config.eval.final_bank_size or None,
                                       config.eval.final_test_size or None)
  results = {'knn_top1': evaluator.score_encoder(frozen_encoder(method, state))}
  if initial_state is not None:
    results['knn_top1_random_init'] = evaluator.score_encoder(
        frozen_encoder(method, initial_state))
    results['knn_top1_raw_pixels'] = evaluator.score_raw_pixels()
  return results
