"""Transfer evaluation (`evaluate --transfer`, evaluation/transfer.py): a generated labelled
folder as the target of a tiny Fashion-MNIST (1-channel) run: rows per encoder, the RGB
images read through their luma, and errors that name the fix."""

import io

import jax
import numpy as np
import pytest
from PIL import Image

from ssl_jax import evaluate, pretrained, train
from ssl_jax.data import augment
from ssl_jax.evaluation import eval_data, features, knn, transfer
from ssl_jax.methods import frozen_encoder

# Each class a dominant colour: separable from raw pixels, and from luma alone
# (0.299, 0.587, 0.114 of full red, green, blue).
COLOURS = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]])


def write_colour_classes(root, split, per_class, seed):
  rng = np.random.default_rng(seed)
  for c, colour in enumerate(COLOURS):
    folder = root / split / f'class{c}'
    folder.mkdir(parents=True)
    for i in range(per_class):
      h, w = (int(v) for v in rng.integers(14, 30, 2))
      pixels = np.clip(colour + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
      buf = io.BytesIO()
      Image.fromarray(pixels).save(buf, format='PNG')
      (folder / f'img{i:02d}.png').write_bytes(buf.getvalue())


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  from tiny_config import make_tiny_config
  config = make_tiny_config()
  config.total_steps = 1
  workdir = str(tmp_path_factory.mktemp('transfer_run'))
  train.train_and_evaluate(config, workdir)
  root = tmp_path_factory.mktemp('colours')
  write_colour_classes(root, 'train', 10, seed=0)
  write_colour_classes(root, 'test', 5, seed=1)
  return workdir, root


@pytest.mark.slow  # a full --transfer evaluation, ~40 s: `pytest -m slow`; the checks below stay
def test_transfer_rows_per_encoder_on_the_targets_splits(setup):
  # Catches: RGB fed to a 1-channel encoder other than through its luma, rows missing or
  # scored on the run's own dataset.
  workdir, root = setup
  name = f'folder:{root}'
  result = evaluate.evaluate_workdir(workdir, evals=['knn', 'linear'], bank_size=300,
                                     test_size=100, embedding='none', transfer=name)
  rows = result['rows']
  label = root.name
  assert list(rows) == ['trained encoder', 'random-init encoder', 'raw pixels',
                        f'trained encoder -> {label}', f'random-init encoder -> {label}',
                        f'raw pixels -> {label}']
  for row_name in list(rows)[3:]:
    assert set(rows[row_name]) >= {'knn_top1', 'linear_top1', 'linear_l2'}
    assert 0.0 <= rows[row_name]['knn_top1'] <= 1.0
    assert 0.0 <= rows[row_name]['linear_top1'] <= 1.0
  assert rows[f'raw pixels -> {label}']['linear_top1'] == 1.0  # the colours separate
  assert f'raw pixels -> {label}' in evaluate.format_table(rows)
  # The trained encoder's row: its features of the images' luma, 15 queries, 30 in the bank.
  model = pretrained.load(workdir)
  config = model.config
  bank, queries = transfer.open_target(config, name)
  assert (bank.num_examples, queries.num_examples) == (30, 15)

  def expected_features(eval_set):
    images, labels = eval_set.arrays()
    assert images.shape[-1] == 3
    x = features.preprocess(images, config.eval.image_size)
    return np.asarray(model.encode(augment.to_grayscale(x))), labels

  (x_bank, y_bank), (x_test, y_test) = expected_features(bank), expected_features(queries)
  assert x_bank.shape == (30, config.model.widths[-1] * config.model.pool_grid ** 2)
  expected = knn.knn_accuracy(x_bank, y_bank, x_test, y_test, k=30,
                              temperature=config.eval.knn_temperature, num_classes=3)
  assert rows[f'trained encoder -> {label}']['knn_top1'] == pytest.approx(expected)
  streamed, _ = eval_data.stream_features(
      transfer.adapted_encoder(frozen_encoder(model.method, model.state), config, 3), queries,
      config.eval.batch_size, config.eval.image_size)
  np.testing.assert_allclose(streamed, x_test, rtol=1e-5, atol=1e-6)


def test_encoder_channels_and_conversions(setup):
  workdir, _ = setup
  model = pretrained.load(workdir)
  assert transfer.encoder_channels(model.config, model.state.params) == 1
  rgb = jax.random.uniform(jax.random.PRNGKey(0), (2, 4, 4, 3))
  np.testing.assert_allclose(transfer.convert_channels(rgb, 1)[..., 0],
                             rgb @ np.array([0.299, 0.587, 0.114]), rtol=1e-6)
  gray = rgb[..., :1]
  np.testing.assert_array_equal(transfer.convert_channels(gray, 3), np.repeat(gray, 3, -1))
  with pytest.raises(transfer.TransferError, match='4 channels'):
    transfer.convert_channels(np.zeros((1, 2, 2, 4)), 3)


def test_dataset_labels():
  assert transfer.dataset_label('tfds:mnist') == 'mnist'
  assert transfer.dataset_label('folder:/data/pets/') == 'pets'
  assert transfer.dataset_label('fashion_mnist') == 'fashion_mnist'


def test_a_missing_or_unsplit_dataset_fails_first_naming_the_fix(setup, tmp_path):
  # Catches: a missing dataset reported as a bare file error (or only after the in-domain
  # evaluation), a folder without split sub-folders read as both splits.
  workdir, root = setup
  with pytest.raises(transfer.TransferError,
                     match=r"--transfer='folder:/no/such/folder'.*'train' split.*"
                           r"folder:<path>' holding <path>/train/<class>/<images>"):
    evaluate.evaluate_workdir(workdir, evals=['knn'], transfer='folder:/no/such/folder',
                              embedding='none')
  write_colour_classes(tmp_path, 'flat', 2, seed=0)  # flat/<class>/: no train/ or test/
  with pytest.raises(transfer.TransferError, match="no 'train' sub-folder.*--transfer needs"):
    evaluate.evaluate_workdir(workdir, evals=['knn'], transfer=f'folder:{tmp_path / "flat"}',
                              embedding='none')
  with pytest.raises(transfer.TransferError, match='include knn or linear in --evals'):
    evaluate.evaluate_workdir(workdir, evals=['diagnostics'], transfer=f'folder:{root}',
                              embedding='none')
  with pytest.raises(transfer.TransferError, match='not a dataset name'):
    evaluate.evaluate_workdir(workdir, evals=['knn'], transfer='mnist', embedding='none')
