"""Training on encoded, variable-size images end to end: an unlabelled image folder with a
corrupt file, evaluated on a labelled folder; exact resume with worker processes; label-free
runs; and the ImageNet config on TFDS mock data."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ssl_jax import config_lib, evaluate, train
from ssl_jax.configs import simclr
from ssl_jax.evaluation import eval_data

from test_host_pipeline import write_images


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp('folders')
  write_images(root / 'photos', 30, corrupt=(7,), seed=1)
  write_images(root / 'labelled' / 'train', 24, classes=3, seed=2)
  write_images(root / 'labelled' / 'val', 12, classes=3, seed=3)  # ImageNet: no test/
  return root


def folder_config(tiny_config, folders, **data):
  c = tiny_config
  c.batch_size = 8
  c.data.name = f'folder:{folders / "photos"}'
  c.data.eval_name = f'folder:{folders / "labelled"}'
  c.data.worker_count = 0
  c.eval.batch_size = 8
  c.eval.resize_size = 14
  c.eval.final_bank_size = c.eval.final_test_size = 0
  c.eval.diagnostics, c.eval.diagnostics_size = True, 8
  for key, value in data.items():
    c.data[key] = value
  return c


def _assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_unlabelled_folder_trains_resumes_exactly_with_workers(tiny_config, folders,
                                                               tmp_path):
  # Catches: the host-cropped views not reaching the step, a corrupt file ending the run or
  # going uncounted, the kNN not reading the labelled folder (val/ for test), and a resume
  # with worker processes (another count) that does not continue the stream where it
  # stopped.
  # The straight run reads in this process, the interrupted one with 2 workers, the resumed
  # one with 1: the views do not depend on the workers (tests/test_host_pipeline.py).
  config = folder_config(tiny_config, folders, worker_count=0)
  straight, results = train.train_and_evaluate(config, str(tmp_path / 'straight'))
  assert results['steps_run'] == 4 and results['skipped_images'] >= 1
  assert 0 <= results['knn_top1'] <= 1 and 'diagnostics/effective_rank' in results
  config.data.worker_count = 2
  first, _ = train.train_and_evaluate(config, str(tmp_path / 'resumed'), stop_at_step=2)
  first = jax.device_get(first)
  config.data.worker_count = 1  # resumed on a machine with other cores
  resumed, results = train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert results['restored_step'] == 2 and results['steps_run'] == 2
  _assert_trees_equal(resumed, straight)
  with pytest.raises(AssertionError):  # the state moved between step 2 and step 4
    _assert_trees_equal(first.params, resumed.params)
  # The evaluation CLI streams the same labelled folders: same kNN as the trainer's.
  evaluated = evaluate.evaluate_workdir(str(tmp_path / 'straight'), ('knn', 'linear'),
                                        baselines=False, embedding='none')
  assert evaluated['num_train'] == 24 and evaluated['num_test'] == 12
  assert evaluated['rows']['trained encoder']['knn_top1'] == results['knn_top1']


def test_without_labelled_images_diagnostics_run_and_knn_is_off(tiny_config, folders,
                                                                 tmp_path, caplog):
  # Catches: a run on unlabelled images that fails for want of labels, or evaluates the
  # kNN with the training images as both bank and queries; and the reason not logged.
  config = folder_config(tiny_config, folders, eval_name='')
  config.total_steps = 2
  _, results = train.train_and_evaluate(config, str(tmp_path))
  assert 'knn_top1' not in results and 'diagnostics/effective_rank' in results
  assert 'Label-based evaluation (kNN, probes) is off' in caplog.text
  # The evaluation CLI: the diagnostics run, a label-based evaluation names the fix.
  evaluated = evaluate.evaluate_workdir(str(tmp_path), ('diagnostics',), baselines=False,
                                        embedding='pca')
  assert 'effective_rank' in evaluated['rows']['trained encoder']
  assert (tmp_path / 'evaluation' / 'embedding_step_2.png').exists()
  with pytest.raises(config_lib.ConfigError, match='eval_name'):
    evaluate.evaluate_workdir(str(tmp_path), ('knn',), baselines=False, embedding='none')


def test_label_based_evaluation_asked_of_unlabelled_images_fails_first(tiny_config, folders,
                                                                       tmp_path):
  # Catches: an explicit request for label-based evaluation on images without labels
  # silently turned off, or failing only after training (no workdir may be written).
  config = folder_config(tiny_config, folders, eval_name=f'folder:{folders / "photos"}')
  with pytest.raises(config_lib.ConfigError, match='eval_name'):
    train.train_and_evaluate(config, str(tmp_path / 'explicit'))
  assert not (tmp_path / 'explicit' / 'checkpoints').exists()
  config = folder_config(tiny_config, folders, eval_name='')
  config.eval.online_probe = True
  with pytest.raises(config_lib.ConfigError, match='online_probe'):
    train.train_and_evaluate(config, str(tmp_path / 'probe'))


@pytest.mark.parametrize('backbone', [
    'convnet', pytest.param('resnet50', marks=pytest.mark.slow)])  # ResNet-50: 1.5 min
def test_imagenet_config_runs_on_tfds_mock_data_of_variable_size(tmp_path, backbone):
  # Catches: variable-size TFDS images failing to batch (the original bug), the ImageNet
  # recipe not building for host-cropped views, and the evaluation transform of encoded
  # images. With ResNet-50, crops of 64 instead of 224 keep the CPU cost down; the path is
  # the same.
  import tensorflow_datasets as tfds
  config = simclr.get_config(f'backbone={backbone},dataset=tfds:imagenet2012,batch=8,crop=64')
  assert config.model.name == backbone
  if backbone == 'resnet50':
    assert not config.model.small_images and config.optimizer.name == 'lars'
  config.total_steps = 2
  config.data.worker_count = 0
  config.eval.batch_size = 8
  config.eval.image_size = 0  # the training crop
  config.eval.baselines = config.eval.diagnostics = False
  with tfds.testing.mock_data(num_examples=16):
    plan = eval_data.plan(config)
    assert plan.bank.transform.crop_size == 64 and plan.bank.transform.resize_size == 73
    assert config.data.eval_split == 'validation'  # the test split has no labels
    _, results = train.train_and_evaluate(config, str(tmp_path))
  assert results['steps_run'] == 2 and np.isfinite(results['knn_top1'])


def test_bank_and_queries_with_other_classes_fail_first(tiny_config, folders, tmp_path):
  # Catches: queries whose class folders differ from the bank's (class indices are positions
  # among the folders, so every later label would shift) scored silently.
  write_images(tmp_path / 'train', 6, classes=3)
  write_images(tmp_path / 'test', 4, classes=2)
  config = folder_config(tiny_config, folders, eval_name=f'folder:{tmp_path}')
  with pytest.raises(config_lib.ConfigError, match='different classes'):
    eval_data.plan(config)
