"""The training loop: init or restore, step, log, evaluate, checkpoint. Method-agnostic."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ssl_jax import checkpoint, config_lib, experiment, parallel, preemption
from ssl_jax.data import augment, host_crop, pipeline, sources
from ssl_jax.evaluation import eval_data, image_text_eval
from ssl_jax.evaluation.final import final_evaluation
from ssl_jax.evaluation.monitor import KnnEvaluator
from ssl_jax.evaluation.observer import RepresentationObserver
from ssl_jax.methods import frozen_encoder

CONFIG_FILE = 'config.json'  # the run's config, written into the workdir
# At most this many steps are dispatched ahead of the host. With many more in flight, XLA:CPU's
# simulated devices have missed each other's collectives on a loaded machine (its all-reduce
# rendezvous aborts after 40 s; seen from 75 steps ahead); waiting every 16 steps costs one
# short pipeline drain per 16 steps.
MAX_STEPS_IN_FLIGHT = 16


@jax.jit
def _all_finite(tree) -> jax.Array:
  """Whether every floating-point value in `tree` is finite (one scalar on the devices)."""
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def build(config, mesh=None):
  """The run's `experiment.Experiment` and its training source (the source's size sets the
  epoch length)."""
  # Config errors before any data is read; experiment.build validates for its mesh again.
  config_lib.validate(config, mesh.devices.size if mesh else jax.device_count(),
                      jax.process_count())
  d = config.data
  train_source = sources.get_source(d.name, d.train_split, data_dir=d.data_dir,
                                    download=d.download, text=config.get('text'))
  if config.eval.online_probe and not getattr(train_source, 'has_labels', True):
    raise config_lib.ConfigError(
        f'eval.online_probe trains a classifier on the training labels, but {train_source!r} '
        'has none: set --config.eval.online_probe=False, or train on a labelled split.')
  channels = getattr(train_source, 'channels', None) or train_source[0]['image'].shape[-1]
  _check_paired_inputs(config, train_source)
  built = experiment.build(config, num_train_examples=len(train_source),
                           image_channels=channels, mesh=mesh)
  return built, train_source


# Per-example inputs that every training batch carries whatever the source (`pipeline`):
# 'index', each row's record index, for methods that keep per-example state (DeepCluster-v2).
ALWAYS_PROVIDED = ('index',)


def _check_paired_inputs(config, train_source):
  """A method that reads another modality beside the image (`Method.paired_inputs`: CLIP's
  captions) needs a source whose records carry it; 'index' comes with every batch."""
  from ssl_jax import methods  # the registry, as config_lib imports it
  wanted = methods.method_class(config.method.name).paired_inputs
  missing = [name for name in wanted
             if name not in ALWAYS_PROVIDED and name not in train_source[0]]
  if missing:
    raise config_lib.ConfigError(
        f'{config.method.name} trains on images paired with {", ".join(missing)}, which '
        f'{train_source!r} does not provide: use a captioned dataset, e.g. '
        "--config.data.name=fashion_mnist_captions (the embedded demo), "
        "'pairs:<file.jsonl or .csv>' or 'tfds:coco_captions'.")


def make_train_iterator(config, method, train_source):
  """The training batches: images as stored (the devices crop them), or for encoded,
  variable-size images each view decoded and cropped on the host (`data.host_crop`)."""
  crop_specs = None
  if getattr(train_source, 'encoded', False):
    crop_specs = host_crop.crop_specs(augment.view_configs(config.augment, method.num_views))
  return pipeline.make_train_iterator(
      train_source, global_batch_size=config.batch_size, seed=config.seed,
      worker_count=eval_data.worker_count(config, train_source), crop_specs=crop_specs,
      channels=getattr(train_source, 'channels', 3),
      skip_corrupt=config.data.get('skip_corrupt', True))


def train_and_evaluate(config, workdir: str, stop_at_step: int | None = None):
  """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

  `stop_at_step` ends the run early (after checkpointing) as a pre-emption would; the
  schedule still spans the full run. SIGTERM or SIGINT during training stops it the same way
  after the step in progress (`ssl_jax.preemption`). A non-finite loss or state raises
  FloatingPointError naming the step; no checkpoint of a non-finite state is ever written.

  Returns (final train state, results dict); the results hold the final evaluation when the
  run reached its last step, and always `step`, `restored_step` (the checkpoint this call
  resumed from, None if it started afresh), `steps_run` (the steps this call trained) and
  `stopped_by` (the signal that stopped it early, or None).
  """
  # Imported here, not at the top: clu's writers import TensorFlow (seconds), which
  # `python -m ssl_jax.evaluate` and the other readers of `build` do not need.
  from clu import metric_writers, periodic_actions

  setup, train_source = build(config)
  mesh, method, total_steps = setup.mesh, setup.method, setup.total_steps
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    config_lib.save_json(config, os.path.join(workdir, CONFIG_FILE))
  # Before any work: a label-based evaluation asked of images without labels is an error.
  evaluation_plan = eval_data.plan(config, train_source)
  eval_data.announce(evaluation_plan)
  iterator = make_train_iterator(config, method, train_source)
  state = setup.init_state()

  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), config.keep_checkpoints)
  state, iterator, restored_step = ckpt.restore_or_keep(state, iterator)
  step = int(jax.device_get(state.step))

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if restored_step is None:
    writer.write_hparams(config_lib.flatten(config))
  logging.info('Training %s for %d steps (%d warm-up) on %d devices, global batch %d; '
               'starting at step %d.', config.method.name, total_steps, setup.warmup_steps,
               jax.device_count(), config.batch_size, step)

  k = config.get('microbatches', 1)
  if k > 1:
    rows = config.batch_size // k
    logging.info('Micro-batched step: the exact gradient of the global batch\'s loss, the '
                 'networks run on %d micro-batches of %d images at a time (cached embeddings, '
                 'one more forward pass).', k, rows)
    if jax.tree.leaves(state.batch_stats):
      logging.warning('With microbatches=%d BatchNorm normalises each micro-batch of %d images '
                      'with its own statistics (a ghost batch), not the global batch of %d: '
                      'the gradient is that of this ghost-batch network. Without BatchNorm '
                      '(a ViT with model.head_norm=layer) it is the whole batch\'s.', k, rows,
                      config.batch_size)
  train_step = setup.make_train_step()
  monitor = None
  if config.eval_every_steps:
    monitor = KnnEvaluator.from_config(config, config.eval.periodic_bank_size,
                                       config.eval.periodic_test_size, evaluation_plan, mesh)
  observer = None
  if config.eval.diagnostics:
    observer = RepresentationObserver(config, workdir, writer, resume_step=step,
                                      evaluation_plan=evaluation_plan)
  skipped_images = skipped_logged = 0  # undecodable images replaced (data.skip_corrupt)
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                           every_steps=config.log_every_steps, every_secs=None)
  last_step = min(total_steps, stop_at_step or total_steps)
  start_step = step
  pending = []  # the metrics of the steps since the last log
  window_start = time.monotonic()
  window_steps = 0

  def check_finite():
    """Raises if a loss since the last log or the state is not finite: no checkpoint of a
    diverged state is ever written. Called only where the host waits for the devices."""
    if pending:
      losses = np.asarray(jax.device_get([m['loss'] for m in pending]), np.float64)
      bad = np.flatnonzero(~np.isfinite(losses.reshape(len(pending), -1)).all(axis=1))
      if bad.size:
        raise diverged(step - len(pending) + 1 + int(bad[0]),
                       f'the loss is {losses[bad[0]]}')
    if not bool(jax.device_get(_all_finite(state))):
      raise diverged(step, 'the train state (parameters, optimizer or method state) is not '
                     'finite after it')

  def diverged(bad_step, what):
    ckpt.wait()  # saves in flight are of finite states: let them complete
    good = ckpt.latest_step()
    if good is None:
      kept, rerun = 'No checkpoint was written', 'and run again'
    else:
      kept = f'The last good checkpoint, step {good}, is kept in {ckpt.directory}'
      rerun = ('and rerun in the same --workdir to resume from it with the change, or in a new '
               'one to start over')
    dtype = ('' if config.model.dtype == 'float32' else
             f' or compute in float32 (--config.model.dtype=float32, now {config.model.dtype})')
    return FloatingPointError(
        f'Training diverged at step {bad_step}: {what}. {kept}; no checkpoint of a non-finite '
        f'state is ever written. Try a lower --config.optimizer.base_lr (now '
        f'{config.optimizer.base_lr}) or a longer warm-up (--config.optimizer.warmup_epochs, now '
        f'{config.optimizer.warmup_epochs}){dtype}, {rerun}.')

  stopped_by = None  # the signal that stopped the run before last_step
  with preemption.StopSignals() as signals:
    try:
      while step < last_step:
        batch = next(iterator)
        if 'skipped' in batch:
          skipped_images += int(batch['skipped'].sum())
        images = batch['views'] if 'views' in batch else batch['image']
        paired = tuple(batch[name] for name in method.paired_inputs)
        images, labels, paired = parallel.global_batch_from_host(
            (images, batch['label'], paired), mesh)
        state, metrics = train_step(state, images, labels, paired)
        pending.append(metrics)
        step += 1
        host_waits = step % MAX_STEPS_IN_FLIGHT == 0
        if host_waits:
          jax.block_until_ready(metrics)
        window_steps += 1
        report(step)
        log_step = step % config.log_every_steps == 0 or step == last_step
        if log_step:
          summary = {k: float(np.mean(v)) for k, v in
                     jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *pending)).items()}
          elapsed = time.monotonic() - window_start
          summary['images_per_sec'] = window_steps * config.batch_size / elapsed
          if skipped_images:
            summary['data/skipped_images'] = skipped_images
            if skipped_images > skipped_logged:
              logging.warning('%d undecodable image(s) skipped so far by this process (each '
                              'file named in a warning above).', skipped_images)
              skipped_logged = skipped_images
          writer.write_scalars(step, summary)
          logging.info('step %d/%d: loss %.4f, %.0f images/s, ~%.0f s left', step,
                       total_steps, summary['loss'], summary['images_per_sec'],
                       (total_steps - step) * elapsed / window_steps)
          if not np.isfinite(summary['loss']):
            check_finite()  # raises, naming the first step with a non-finite loss
          pending, window_start, window_steps = [], time.monotonic(), 0
        if config.eval_every_steps and step % config.eval_every_steps == 0:
          eval_start = time.monotonic()
          with report.timed('eval'):
            encode_fn = frozen_encoder(method, state)
            if monitor is not None:
              writer.write_scalars(step, {'knn_top1': monitor.score_encoder(encode_fn)})
              if image_text_eval.is_image_text(method):  # zero-shot, retrieval, the gap
                writer.write_scalars(step, image_text_eval.image_text_evaluation(
                    config, method, state, monitor.queries, prefix='image_text/'))
            if observer is not None:
              observer(step, encode_fn)
          window_start += time.monotonic() - eval_start  # images/s counts training time only
        save_step = step % config.checkpoint_every_steps == 0 or step == last_step
        # A stop request: one process stops after the step during which the signal came;
        # several agree on it at steps where the host waits for the devices anyway, so that
        # all of them checkpoint the same step.
        if jax.process_count() == 1:
          stop = signals.requested
        else:
          stop = (host_waits or log_step or save_step) and preemption.agree(signals.requested)
        if save_step or stop:
          check_finite()
          ckpt.save(step, state, iterator)
        if stop and step < last_step:
          stopped_by = signals.received or 'a signal to another process'
          logging.warning('Stopped by %s at step %d of %d; the checkpoint is written. Run the '
                          'same command again to resume.', stopped_by, step, total_steps)
          break
    finally:
      # Also on an error: the saves in flight are of finite states, let them complete.
      ckpt.wait()
      ckpt.close()
    # A signal during the last step or the final wait: skip the final evaluation, which a
    # resumed run does (each process must take the same path: the evaluation is collective).
    if stopped_by is None and preemption.agree(signals.requested):
      stopped_by = signals.received or 'a signal to another process'

  results = {'step': step}
  if step == total_steps and stopped_by is None:
    # The random-init baseline is re-created rather than kept: the step donates its input.
    initial = setup.init_state() if config.eval.baselines else None
    results.update(final_evaluation(config, method, state, initial, evaluation_plan, mesh))
    if observer is not None:
      results.update(observer(step, frozen_encoder(method, state), final=True))
    # The observer wrote its diagnostics/ scalars already.
    writer.write_scalars(step, {f'final/{k}': v for k, v in results.items()
                                if k != 'step' and not k.startswith('diagnostics/')})
    if jax.process_index() == 0:
      with open(os.path.join(workdir, 'results.json'), 'w') as f:
        json.dump(results, f, indent=2)
  writer.flush()
  # How this call ran, for callers and tests (not written to results.json): the checkpoint it
  # resumed from (None: none), the steps it trained, and the signal that stopped it early.
  results.update(restored_step=restored_step, steps_run=step - start_step,
                 stopped_by=stopped_by, skipped_images=skipped_images)
  return state, results

