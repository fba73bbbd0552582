"""Evaluation of a workdir: diagnostics history and plots written during training (and kept
consistent across a resume), the collapse alarm, loading the trained encoder, and the
evaluation CLI's table and JSON."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import checkpoint, config_lib, evaluate, pretrained, train
from ssl_jax.data import pipeline, sources
from ssl_jax.evaluation import batch_norm, features, knn
from ssl_jax.evaluation.history import DiagnosticsHistory
from ssl_jax.evaluation.monitor import DiagnosticsMonitor
from ssl_jax.methods import frozen_encoder

REPO = os.path.join(os.path.dirname(__file__), '..')


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory):
  """A tiny SimCLR run with periodic diagnostics, interrupted at step 2 and resumed."""
  from tiny_config import make_tiny_config
  config = make_tiny_config()
  config.eval_every_steps = 2
  config.eval.periodic_bank_size, config.eval.periodic_test_size = 300, 100
  config.eval.diagnostics = config.eval.plots = True
  config.eval.diagnostics_size = 200
  workdir = str(tmp_path_factory.mktemp('run'))
  train.train_and_evaluate(config, workdir, stop_at_step=2)
  # A measurement the interrupted run made after its last checkpoint: the resumed run
  # re-measures that step and must not keep both.
  DiagnosticsHistory(workdir, resume_step=2).append(3, {'alignment': 9.0})
  state, results = train.train_and_evaluate(config, workdir)
  return workdir, config, state, results


def test_training_writes_config_history_and_plots(trained_workdir):
  workdir, config, _, results = trained_workdir
  saved = config_lib.load_json(os.path.join(workdir, 'config.json'))
  assert saved.model.widths == config.model.widths == (4, 8)  # tuples survive JSON
  assert saved.to_dict() == config.to_dict()
  with open(os.path.join(workdir, 'diagnostics.jsonl')) as f:
    entries = [json.loads(line) for line in f]
  # Step 2 before the interruption, 4 (periodic and final, one entry) after; 3 was dropped.
  assert [e['step'] for e in entries] == [2, 4]
  feature_dim = config.model.widths[-1] * config.model.pool_grid ** 2  # the recipe's grid
  for entry in entries:
    assert 0 < entry['effective_rank'] <= feature_dim
    assert len(entry['spectrum']) == feature_dim
    assert entry['alignment'] >= 0 and entry['uniformity'] <= 0
  assert results['diagnostics/effective_rank'] == pytest.approx(entries[-1]['effective_rank'])
  for name in ('spectrum', 'alignment_uniformity', 'embedding'):
    with open(os.path.join(workdir, 'plots', f'{name}.png'), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_collapse_alarm_fires_for_a_constant_encoder_only(tiny_config):
  tiny_config.eval.diagnostics_size = 200
  monitor = DiagnosticsMonitor.from_config(tiny_config)
  # D = 64, as the default encoder: one used dimension is 1/64 of its rank.
  collapsed, _ = monitor.measure(lambda x: jnp.ones((x.shape[0], 64)))
  assert len(collapsed['collapse_warnings']) == 2
  assert collapsed['effective_rank'] == pytest.approx(1.0, abs=1e-3)
  assert collapsed['alignment'] == pytest.approx(0.0, abs=1e-6)
  # Raw pixels through a random projection: a spread-out, full-rank representation.
  projection = jax.random.normal(jax.random.PRNGKey(0), (12 * 12, 16))
  healthy, _ = monitor.measure(
      lambda x: jax.image.resize(x, (x.shape[0], 12, 12, 1), 'bilinear').reshape(
          x.shape[0], -1) @ projection)
  assert healthy['collapse_warnings'] == []
  assert healthy['effective_rank_fraction'] > 0.3


def test_pretrained_load_gives_the_trained_encoder(trained_workdir):
  workdir, config, state, _ = trained_workdir
  model = pretrained.load(workdir)
  assert model.step == 4
  images = jax.random.uniform(jax.random.PRNGKey(0), (5, 12, 12, 1))
  expected = model.method.encode(state.params, state.batch_stats, images)
  np.testing.assert_array_equal(model.encode(images), expected)
  earlier = pretrained.load(workdir, step=2)
  assert earlier.step == 2
  assert not np.allclose(earlier.encode(images), expected)
  with pytest.raises(checkpoint.CheckpointError, match=r'holds steps \[2, 4\]'):
    pretrained.load(workdir, step=3)


def test_pretrained_load_names_the_fix_for_a_wrong_workdir(tmp_path):
  with pytest.raises(FileNotFoundError, match='Pass the --workdir given to ssl-jax-train'):
    pretrained.load(str(tmp_path))


def spread(split, n):
  """What --bank_size and --test_size take: n examples spread evenly over the split."""
  source = sources.fashion_mnist(split)
  indices = pipeline.spread_indices(len(source), n)
  return source.images[indices], source.labels[indices]


def test_evaluate_workdir_table_and_json(trained_workdir):
  workdir = trained_workdir[0]
  result = evaluate.evaluate_workdir(workdir, bank_size=2000, test_size=150, seed=0)
  counts = np.bincount(spread('train', 2000)[1])
  rows = result['rows']
  assert list(rows) == ['trained encoder', 'random-init encoder', 'raw pixels']
  for row in rows.values():
    for key in ('knn_top1', 'linear_top1', 'lowlabel_1%', 'lowlabel_10%'):
      assert 0.1 < row[key] <= 1.0, (key, row[key])  # chance is 0.1 on ten classes
    # Class-balanced subsets of the 2000 bank images: two labels per class at 1%, one to
    # fit and one to validate the L2 strength.
    for fraction in (1, 10):
      assert row[f'lowlabel_{fraction}%_num_labels'] == sum(
          max(1, round(fraction / 100 * c)) for c in counts)
  assert rows['raw pixels']['effective_rank'] > rows['trained encoder']['effective_rank'] / 10
  # The random-init row is scored with its BatchNorm statistics refreshed on training batches.
  model = pretrained.load(workdir)
  e = model.config.eval
  encode = batch_norm.refreshed_frozen_encoder(model.config, model.method,
                                               model.initial_state())
  (x_bank, y_bank), (x_test, y_test) = spread('train', 2000), spread('test', 150)
  extract = lambda x: features.extract_features(encode, x, e.batch_size, e.image_size)
  assert rows['random-init encoder']['knn_top1'] == knn.knn_accuracy(
      extract(x_bank), y_bank, extract(x_test), y_test, k=e.knn_k,
      temperature=e.knn_temperature, num_classes=10)
  with open(os.path.join(workdir, 'evaluation', 'step_4.json')) as f:
    assert json.load(f)['rows']['raw pixels']['knn_top1'] == rows['raw pixels']['knn_top1']
  assert os.path.exists(os.path.join(workdir, 'evaluation', 'embedding_step_4.png'))
  table = evaluate.format_table(rows)
  assert 'kNN' in table and '10% labels' in table and 'raw pixels' in table


def test_evaluate_at_another_image_size(trained_workdir):
  """--image_size reaches every reader of eval.image_size: the features of both encoders,
  the random-init encoder's BatchNorm refresh and the diagnostics images; the result lands
  beside the run's own, named by the size. kNN on 100 queries is too coarse to notice a
  refresh at the run's 12 pixels; the diagnostics (continuous) are not."""
  workdir = trained_workdir[0]
  result = evaluate.evaluate_workdir(workdir, evals=['knn', 'diagnostics'], bank_size=500,
                                     test_size=100, embedding='none', image_size=20)
  assert result['image_size'] == 20
  with open(os.path.join(workdir, 'evaluation', 'step_4_20px.json')) as f:
    assert json.load(f)['rows'] == result['rows']
  model = pretrained.load(workdir)
  config = model.config
  config.eval.image_size = 20
  monitor = DiagnosticsMonitor.from_config(config)
  (x_bank, y_bank), (x_test, y_test) = spread('train', 500), spread('test', 100)
  for name, state, refresh in (('trained encoder', model.state, False),
                               ('random-init encoder', model.initial_state(), True)):
    encode = (batch_norm.refreshed_frozen_encoder(config, model.method, state) if refresh
              else frozen_encoder(model.method, state))
    extract = lambda x: features.extract_features(encode, x, config.eval.batch_size, 20)
    row = result['rows'][name]
    assert row['knn_top1'] == knn.knn_accuracy(
        extract(x_bank), y_bank, extract(x_test), y_test, k=config.eval.knn_k,
        temperature=config.eval.knn_temperature, num_classes=10), name
    measured = monitor.measure(encode)[0]
    for key in ('effective_rank', 'uniformity', 'alignment'):
      assert row[key] == pytest.approx(measured[key], rel=1e-6, abs=1e-7), (name, key)


def test_evaluate_cli(trained_workdir):
  workdir = trained_workdir[0]
  env = dict(os.environ, XLA_FLAGS='')
  out = subprocess.run(
      [sys.executable, '-m', 'ssl_jax.evaluate', f'--workdir={workdir}', '--evals=knn',
       '--step=2', '--bank_size=300', '--test_size=100', '--nobaselines', '--embedding=none',
       '--image_size=16'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'Step 2: 300 training / 100 test examples, 16-pixel images' in out.stdout
  assert 'trained encoder' in out.stdout
  assert 'raw pixels' not in out.stdout
  bad = subprocess.run(
      [sys.executable, '-m', 'ssl_jax.evaluate', f'--workdir={workdir}', '--evals=knn,lnear'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "Unknown --evals ['lnear']" in bad.stderr
