"""Evaluation of a trained workdir: python -m ssl_jax.evaluate --workdir=DIR.

    python -m ssl_jax.evaluate --workdir=workdirs/simclr --evals=knn,linear,lowlabel,diagnostics

Scores the frozen encoder of the latest (or --step) checkpoint, next to the same networks at
random initialisation (BatchNorm statistics refreshed on `eval.bn_refresh_batches` training
batches) and to raw pixels, prints a table and writes it as JSON (and a 2-D
embedding plot of the test features) under DIR/evaluation/. Every evaluation reads features
extracted once per encoder:

  knn          weighted kNN top-1 (k, temperature from the run's config), bank = training split
  linear       linear probe top-1 (L2 strength chosen on a validation split of the training set)
  lowlabel     linear probe trained on 1% and 10% of the training labels (fixed seeded subsets)
  diagnostics  effective rank (RankMe), spread, alignment and uniformity of the features
  finetune     (opt-in: not in the default --evals, it trains) the whole encoder and a new
               linear classifier fine-tuned on the same 1% and 10% subsets, SimCLR v2's
               protocol (evaluation/finetune.py); the trained and random-init encoders only
  image_text   image-text methods (CLIP, SigLIP, LiT) only: zero-shot top-1/top-5 from class-name
               prompts, image <-> text retrieval recall@1/5/10 on the test captions, the
               modality gap and each tower's diagnostics (evaluation/image_text_eval.py)

--transfer=<dataset> (e.g. tfds:mnist, folder:/path with train/ and test/ class folders) adds
rows '<encoder> -> <dataset>': the kNN and linear probe of each frozen encoder fitted on that
dataset's training split and scored on its test split (evaluation/transfer.py).

--image_size=N scores every encoder on N-pixel images instead of the run's eval.image_size,
the random-init encoder's BatchNorm refresh included; its JSON is step_<step>_<N>px.json.
"""

from __future__ import annotations

import json
import os

from absl import flags, logging

FLAGS = flags.FLAGS
DEFAULT_EVALS = ('knn', 'linear', 'lowlabel', 'diagnostics', 'image_text')
EVALS = DEFAULT_EVALS + ('finetune',)  # fine-tuning trains networks: opt-in
flags.DEFINE_string('workdir', None, 'Workdir of a training run (holds config.json and '
                    'checkpoints/).')
flags.DEFINE_list('evals', list(DEFAULT_EVALS), f'Evaluations to run, from {EVALS}.')
flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate; default the latest.')
flags.DEFINE_integer('bank_size', 0, 'Use N training examples spread evenly over the split '
                     '(0 = all).')
flags.DEFINE_integer('test_size', 0, 'Use N test examples spread evenly over the split '
                     '(0 = all).')
flags.DEFINE_bool('baselines', True, 'Also score the random-init encoder and raw pixels.')
flags.DEFINE_enum('embedding', 'pca', ['pca', 'tsne', 'none'],
                  'The 2-D embedding plot of the trained encoder\'s test features.')
flags.DEFINE_integer('seed', 0, 'Seed of the low-label subsets and validation splits.')
flags.DEFINE_string('transfer', None, 'Also score the frozen encoders on this labelled '
                    "dataset's train/test splits (tfds:<name>, folder:<path>).")
flags.DEFINE_integer('image_size', None, 'Evaluate on images of this side (resized as in '
                     "training's evaluation); default the run's eval.image_size.")
flags.DEFINE_bool('finetune_keep_projector_layer', False, '--evals=finetune fine-tunes from '
                  "the projection head's first layer (SimCLR v2), not from the encoder.")

# Table columns: (result key, header).
_COLUMNS = (('knn_top1', 'kNN'), ('linear_top1', 'linear'), ('lowlabel_1%', '1% labels'),
            ('lowlabel_10%', '10% labels'), ('finetune_1%', 'fine-tune 1%'),
            ('finetune_10%', 'fine-tune 10%'), ('effective_rank', 'eff. rank'),
            ('std_fraction', 'spread'), ('alignment', 'align'), ('uniformity', 'uniform'),
            ('zero_shot_top1', 'zero-shot'), ('i2t_recall@1', 'I->T R@1'),
            ('i2t_recall@5', 'I->T R@5'), ('t2i_recall@1', 'T->I R@1'),
            ('t2i_recall@5', 'T->I R@5'), ('modality_gap', 'gap'))


def evaluate_features(train, test, evals, *, knn_k=200, knn_temperature=0.07, seed=0,
                      num_classes=None, diagnostics_fn=None) -> dict:
  """The chosen evaluations of one encoder, given its features: `train` and `test` are
  (features, labels) pairs, or None without labelled images. `diagnostics_fn()` returns the
  diagnostics dict."""
  from ssl_jax.evaluation import knn, linear, lowlabel

  row = {}
  evals = [name for name in evals if name != 'image_text']  # from the towers, not features
  if train is None:  # no labelled images: the label-free evaluations only
    evals = [name for name in evals if name == 'diagnostics']
  (x_train, y_train), (x_test, y_test) = train or (None, None), test or (None, None)
  if 'knn' in evals:
    row['knn_top1'] = knn.knn_accuracy(x_train, y_train, x_test, y_test, k=knn_k,
                                       temperature=knn_temperature, num_classes=num_classes)
  if 'linear' in evals:
    result = linear.linear_probe(x_train, y_train, x_test, y_test, seed=seed,
                                 num_classes=num_classes)
    row['linear_top1'], row['linear_l2'] = result['test_accuracy'], result['l2']
  if 'lowlabel' in evals:
    for name, result in lowlabel.low_label_probe(x_train, y_train, x_test, y_test, seed=seed,
                                                 num_classes=num_classes).items():
      row[f'lowlabel_{name}'] = result['test_accuracy']
      row[f'lowlabel_{name}_num_labels'] = result['num_labels']
  if 'diagnostics' in evals and diagnostics_fn is not None:
    measured = diagnostics_fn()
    row.update({k: v for k, v in measured.items() if k not in ('spectrum', 'collapse_warnings')})
    row['collapse_warnings'] = measured.get('collapse_warnings', [])
  return row


def format_table(rows: dict) -> str:
  """rows: {encoder name: results}; columns only for results some row has."""
  columns = [(key, head, max(12, len(head) + 2)) for key, head in _COLUMNS
             if any(key in r for r in rows.values())]
  name_width = max(len(n) for n in rows) + 2
  lines = [''.ljust(name_width) + ''.join(f'{head:>{w}}' for _, head, w in columns)]
  for name, row in rows.items():
    cells = ''.join(f'{row[key]:>{w}.4f}' if key in row else f'{"-":>{w}}'
                    for key, _, w in columns)
    lines.append(name.ljust(name_width) + cells)
  return '\n'.join(lines)


def evaluate_workdir(workdir: str, evals=DEFAULT_EVALS, step: int | None = None,
                     bank_size: int = 0, test_size: int = 0, baselines: bool = True,
                     embedding: str = 'pca', seed: int = 0, transfer: str | None = None,
                     finetune_keep_projector_layer: bool = False,
                     image_size: int | None = None) -> dict:
  """Runs the evaluations; returns {'step', 'image_size', 'rows': {encoder: results}} and
  writes it to workdir/evaluation/step_<step>.json (and the embedding plot beside it), or to
  step_<step>_<image_size>px.json when `image_size` replaces the run's `eval.image_size` (so
  that scores at another resolution sit beside the run's own). `transfer`: a dataset name
  whose rows '<encoder> -> <dataset>' are added (evaluation/transfer.py)."""
  import numpy as np

  from ssl_jax import pretrained
  from ssl_jax.evaluation import (batch_norm, eval_data, features, finetune, image_text_eval,
                                  result_files)
  from ssl_jax.evaluation.monitor import DiagnosticsMonitor
  from ssl_jax.methods import frozen_encoder

  unknown = sorted(set(evals) - set(EVALS))
  if unknown:
    raise ValueError(f'Unknown --evals {unknown}; choose from {EVALS}.')
  model = pretrained.load(workdir, step)
  config = model.config
  e = config.eval
  other_size = None  # names the output files when the images are not the run's size
  if image_size is not None and image_size != e.image_size:
    # Every reader of eval.image_size (features, the BatchNorm refresh, diagnostics, transfer)
    # takes it from this config.
    e.image_size = other_size = image_size
  evaluation_plan = eval_data.plan(config)
  labelled_evals = [name for name in evals if name not in ('diagnostics', 'image_text')]
  if labelled_evals and not evaluation_plan.labelled:
    raise eval_data.EvaluationConfigError(
        f'--evals={",".join(labelled_evals)} need labelled images, but '
        f'{evaluation_plan.off_reason} Or run only --evals=diagnostics.')
  if transfer:  # a missing dataset fails before the long work
    from ssl_jax.evaluation import transfer as transfer_lib
    transfer_lib.check_request(config, transfer, evals)
  monitor = DiagnosticsMonitor.from_config(config, evaluation_plan)
  # Batches sharded over every device when the batch size allows it.
  mesh = model.setup.mesh  # the one the state is laid out on
  if e.batch_size % mesh.devices.size:
    mesh = None

  def raw_pixels(x):
    return x.reshape(x.shape[0], -1)

  encoders = {'trained encoder': frozen_encoder(model.method, model.state)}
  if baselines:
    # BatchNorm statistics refreshed on training batches: at their initial values (mean 0,
    # variance 1) the baseline's score would swing with the seed (evaluation.batch_norm).
    encoders['random-init encoder'] = batch_norm.refreshed_frozen_encoder(
        config, model.method, model.initial_state())
    encoders['raw pixels'] = raw_pixels

  bank = queries = None
  if evaluation_plan.labelled:
    bank = evaluation_plan.bank.limited(bank_size)
    queries = evaluation_plan.queries.limited(test_size)
  num_classes = (len(evaluation_plan.class_names) if evaluation_plan.class_names else None)
  rows, embedded = {}, None
  # Features are extracted only for the evaluations that read them.
  feature_evals = [name for name in evals if name in ('knn', 'linear', 'lowlabel')]
  for name, encode_fn in encoders.items():
    raw = encode_fn is raw_pixels
    dims = (bank or evaluation_plan.diagnostics).image_dims
    if raw and dims > eval_data.MAX_RAW_PIXEL_DIMS:
      logging.info('Raw pixels left out: %d values per image is too many.', dims)
      continue
    diagnostics_fn = lambda: monitor.measure(encode_fn)[0]
    if bank is None or not feature_evals:
      rows[name] = evaluate_features(None, None, evals, diagnostics_fn=diagnostics_fn)
      continue
    logging.info('Evaluating %s...', name)
    extract = lambda s: eval_data.stream_features(encode_fn, s, e.batch_size,
                                                  e.image_size or None, mesh, raw_pixels=raw)
    train, test = extract(bank), extract(queries)
    if embedded is None:
      embedded = test
    rows[name] = evaluate_features(
        train, test, evals, knn_k=e.knn_k, knn_temperature=e.knn_temperature, seed=seed,
        num_classes=num_classes or int(max(train[1].max(), test[1].max()) + 1),
        diagnostics_fn=diagnostics_fn)
  if 'finetune' in evals:
    if num_classes is None:
      num_classes = int(max(finetune.eval_set_labels(bank).max(),
                            finetune.eval_set_labels(queries).max()) + 1)
    for name in [n for n in ('trained encoder', 'random-init encoder') if n in encoders]:
      logging.info('Fine-tuning the %s on 1%% and 10%% of the labels...', name)
      params, batch_stats = features.local_copy(encoders[name].variables)
      for fraction, result in finetune.low_label_fine_tune(
          config, params, batch_stats, bank, queries, num_classes=num_classes, seed=seed,
          image_size=e.image_size or None, eval_batch_size=e.batch_size,
          keep_projector_layer=finetune_keep_projector_layer,
          mesh=model.setup.mesh).items():
        rows[name][f'finetune_{fraction}'] = result['test_accuracy']
        rows[name][f'finetune_{fraction}_num_labels'] = result['num_labels']
        rows[name][f'finetune_{fraction}_seconds'] = result['seconds']
  if transfer:
    logging.info('Transfer to %s...', transfer)
    rows.update(transfer_lib.transfer_rows(config, encoders, transfer, evals,
                                           raw_pixels=raw_pixels, bank_size=bank_size,
                                           test_size=test_size, seed=seed, mesh=mesh))
  if 'image_text' in evals and image_text_eval.is_image_text(model.method):
    states = {'trained encoder': model.state}
    if baselines:
      states['random-init encoder'] = model.initial_state()
    for name, state in states.items():
      logging.info('Zero-shot and retrieval of the %s...', name)
      rows[name].update(image_text_eval.image_text_evaluation(
          config, model.method, state,
          queries if queries is not None else evaluation_plan.diagnostics))
  if embedded is None:  # no labelled images: the diagnostics images, uncoloured
    embedded = (monitor.measure(encoders['trained encoder'])[1], monitor.labels)

  out_path = result_files.results_path(workdir, model.step, other_size)
  os.makedirs(os.path.dirname(out_path), exist_ok=True)
  result = {'step': model.step, 'image_size': e.image_size,
            'num_train': 0 if bank is None else bank.num_examples,
            'num_test': len(embedded[1]) if queries is None else queries.num_examples,
            'rows': rows}
  with open(out_path, 'w') as f:
    json.dump(result, f, indent=2, default=lambda v: np.asarray(v).tolist())
  if embedding != 'none':
    from ssl_jax.evaluation import plots
    test_features, test_labels = embedded
    shown = min(len(test_labels), 5000)  # enough to see the clusters, fast to draw
    figure = plots.embedding_figure(test_features[:shown], test_labels[:shown],
                                    evaluation_plan.class_names, method=embedding, seed=seed)
    plots.save_figure(figure, result_files.embedding_plot_path(workdir, model.step,
                                                               other_size))
  return result


def main(argv):
  del argv
  result = evaluate_workdir(FLAGS.workdir, FLAGS.evals, FLAGS.step, FLAGS.bank_size,
                            FLAGS.test_size, FLAGS.baselines, FLAGS.embedding, FLAGS.seed,
                            FLAGS.transfer, FLAGS.finetune_keep_projector_layer,
                            FLAGS.image_size)
  size = f', {result["image_size"]}-pixel images' if result['image_size'] else ''
  print(f'Step {result["step"]}: {result["num_train"]} training / {result["num_test"]} test '
        f'examples{size}')
  print(format_table(result['rows']), flush=True)
  for name, row in result['rows'].items():
    for message in row.get('collapse_warnings', []):
      print(f'WARNING ({name}): {message}')


def run():
  """Console-script entry point (`ssl-jax-evaluate`): the short log by default
  (--verbosity shows the libraries' INFO lines), one message for a config error."""
  from ssl_jax import cli
  flags.mark_flag_as_required('workdir')
  cli.run(main)


if __name__ == '__main__':
  run()
