"""Low-label fine-tuning (evaluation/finetune.py): the encoder is trained through the new
classifier, runs are seeded, the subsets are the low-label probe's, the projector-layer option
starts from the projector's first layer, and `evaluate --evals=finetune` fills its rows."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import method_harness as mh

from ssl_jax import evaluate, parallel, train
from ssl_jax.evaluation import eval_data, features, finetune, linear, lowlabel
from ssl_jax.methods.common import encoder_with_projector
from ssl_jax.models import build_encoder


def _brightness_toy(n, seed):
  """Two classes of 12 x 12 noise images: dark (0-99) and bright (150-249)."""
  labels = np.arange(n) % 2
  noise = np.random.default_rng(seed).integers(0, 100, (n, 12, 12, 1))
  return (noise + 150 * labels[:, None, None, None]).astype(np.uint8), labels


def _blind_encoder(config):
  """The tiny ConvNet with its first convolution zeroed: every image gives the same features
  (a frozen probe is at chance), but gradients still reach the kernel through BatchNorm in
  training mode (its first BatchNorm's bias is positive, so the ReLU passes them)."""
  variables = build_encoder(config.model).init(jax.random.PRNGKey(0),
                                               jnp.zeros((1, 12, 12, 1)), train=False)
  params = jax.tree.map(jnp.asarray, variables['params'])
  params['Conv_0']['kernel'] = jnp.zeros_like(params['Conv_0']['kernel'])
  params['BatchNorm_0']['bias'] = jnp.full_like(params['BatchNorm_0']['bias'], 0.1)
  return {'encoder': params}, {'encoder': variables['batch_stats']}


def test_fine_tuning_trains_the_encoder_beyond_its_frozen_features(tiny_config):
  # Catches: an encoder left out of the gradient or the update (frozen features), a
  # classifier that is not trained.
  params, stats = _blind_encoder(tiny_config)
  x_train, y_train = _brightness_toy(64, seed=0)
  x_test, y_test = _brightness_toy(200, seed=1)
  tuned = finetune.fine_tune(tiny_config, params, stats, x_train, y_train, num_classes=2,
                             epochs=2, batch_size=8, seed=0)
  assert tuned.steps == 16 and tuned.batch_size == 8
  tuned_accuracy = np.mean(tuned.logits(x_test).argmax(-1) == y_test)
  frozen = features.FrozenEncoder(
      lambda v, x: build_encoder(tiny_config.model).apply(
          {'params': v[0]['encoder'], 'batch_stats': v[1]['encoder']}, x, train=False),
      (params, stats))
  probe = linear.linear_probe(features.extract_features(frozen, x_train), y_train,
                              features.extract_features(frozen, x_test), y_test, num_classes=2)
  assert probe['test_accuracy'] == pytest.approx(0.5)  # constant features: chance
  assert tuned_accuracy > 0.95
  new = tuned.variables['params']
  assert float(jnp.abs(new['encoder']['Conv_0']['kernel']).max()) > 0
  assert float(jnp.abs(new['classifier']['kernel']).max()) > 0
  # The running statistics that score the test set were updated in training mode.
  assert not np.allclose(tuned.variables['batch_stats']['encoder']['BatchNorm_1']['mean'],
                         stats['encoder']['BatchNorm_1']['mean'])


def test_fine_tuning_is_deterministic_for_a_seed(tiny_config):
  # Catches: unseeded batch order or augmentation keys.
  params, stats = _blind_encoder(tiny_config)
  images, labels = _brightness_toy(24, seed=0)
  run = lambda seed: finetune.fine_tune(tiny_config, params, stats, images, labels,
                                        num_classes=2, epochs=2, batch_size=8, seed=seed)
  first, again, other = run(0), run(0), run(1)
  jax.tree.map(np.testing.assert_array_equal, first.variables, again.variables)
  np.testing.assert_array_equal(first.losses, again.losses)
  assert not np.allclose(first.losses, other.losses)


def test_fine_tuning_on_8_devices_equals_one_device(tiny_config):
  """Each device takes 2 rows of the batch of 16: the crops (keyed by the global row), the
  BatchNorm statistics (over the global batch), the loss and its gradient are the one-device
  run's, so the fine-tuned variables and every step's loss are too. Catches BatchNorm
  statistics of the device's own rows (2 of 16), a loss averaged per device and then
  summed, crops keyed by the local row, a gradient not summed over devices."""
  params, stats = _blind_encoder(tiny_config)
  images, labels = _brightness_toy(32, seed=0)
  run = lambda mesh: finetune.fine_tune(  # noqa: E731
      tiny_config, params, stats, images, labels, num_classes=2, epochs=2, batch_size=16,
      seed=0, keep_projector_layer=False, mesh=mesh)
  one, eight = run(None), run(parallel.make_mesh(8))
  np.testing.assert_allclose(eight.losses, one.losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               eight.variables, one.variables)
  # Not vacuous: the run moved the encoder and its statistics.
  assert not np.allclose(one.variables['batch_stats']['encoder']['BatchNorm_1']['mean'],
                         stats['encoder']['BatchNorm_1']['mean'])
  assert one.losses[-1] < one.losses[0]


def test_fine_tuning_a_vit_without_batch_norm(tiny_config):
  """MAE's and iBOT's encoder, a ViT, has no BatchNorm: its pretrained weights load (no
  running statistics expected) and fine-tuning moves it. Catches the fit check demanding a
  'batch_stats' collection the network never creates (MAE's workdir failed so)."""
  config = tiny_config.copy_and_resolve_references()
  config.model.update(name='vit_test', patch_size=4, vit_pool='gap', drop_path_rate=0.0)
  with mh.tiny_vit_registered():
    encoder = build_encoder(config.model)
    variables = encoder.init(jax.random.PRNGKey(0), jnp.zeros((1, 12, 12, 1)), train=False)
    assert 'batch_stats' not in variables
    params = {'encoder': variables['params']}
    images, labels = _brightness_toy(32, seed=0)
    tuned = finetune.fine_tune(config, params, {}, images, labels, num_classes=2, epochs=1,
                               batch_size=8, seed=0)
  # Trained through the encoder (whether training learns is the ConvNet tests' business).
  assert np.isfinite(tuned.losses).all()
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                       tuned.variables['params']['encoder'], params['encoder'])
  assert max(jax.tree.leaves(moved)) > 0


def test_batches_cover_every_example_once_per_epoch():
  # Catches: sampling with replacement, or one permutation reused for every epoch.
  rows = finetune.batch_indices(10, 4, 5, seed=0).ravel()  # 2 epochs of 10
  assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:20]) == list(range(10))
  assert not np.array_equal(rows[:10], rows[10:20])


def test_learning_rate_is_simclr_v2s():
  # 0.005 x sqrt(B): 0.16 at B = 1024; cosine decay, no warm-up.
  assert finetune.cosine_learning_rate(0, 100, 1024) == pytest.approx(0.16)
  assert finetune.cosine_learning_rate(50, 100, 256) == pytest.approx(0.04)
  assert finetune.cosine_learning_rate(100, 100, 256) == pytest.approx(0.0)
  assert [finetune.epochs_for(f) for f in (0.01, 0.1)] == [60, 30]


def test_keep_projector_layer_starts_from_the_projectors_first_layer(tiny_config):
  # Catches: a projector layer initialised afresh instead of copied, or its statistics lost.
  network = encoder_with_projector(tiny_config, None)
  variables = network.init(jax.random.PRNGKey(3), jnp.zeros((2, 12, 12, 1)), train=False)
  params, stats = variables['params'], variables['batch_stats']
  # Statistics that differ from BatchNorm's initial ones, to see them copied.
  stats = jax.tree.map(lambda x: x + 0.5, stats)
  images = np.random.default_rng(0).integers(0, 256, (8, 12, 12, 1), dtype=np.uint8)
  head = finetune.FineTuneNetwork(build_encoder(tiny_config.model), 2, 16, 'batch')
  start = finetune.initial_variables(head, params, stats, jnp.zeros((1, 12, 12, 1)),
                                     keep_projector_layer=True)
  np.testing.assert_array_equal(start['params']['projector_dense']['kernel'],
                                params['projector']['Dense_0']['kernel'])
  np.testing.assert_array_equal(start['batch_stats']['projector_norm']['mean'],
                                stats['projector']['BatchNorm_0']['mean'])
  # Its hidden layer is the pretrained projector's first layer: Dense_0 -> BatchNorm_0 -> ReLU
  # of the features, in inference mode.
  x = images.astype(np.float32) / 255
  h = network.apply({'params': params, 'batch_stats': stats}, x, method='encode')
  bn = stats['projector']['BatchNorm_0']
  dense = h @ params['projector']['Dense_0']['kernel']
  expected = np.maximum(
      (dense - bn['mean']) / np.sqrt(bn['var'] + 1e-5) * params['projector']['BatchNorm_0'][
          'scale'] + params['projector']['BatchNorm_0']['bias'], 0)
  np.testing.assert_allclose(_classifier_input(head, start, x), expected, rtol=1e-5,
                             atol=1e-5)
  # Fine-tuning from it trains that layer too; without the option there is none.
  labels = np.arange(8) % 2
  tuned = finetune.fine_tune(tiny_config, params, stats, images, labels, num_classes=2,
                             epochs=3, batch_size=8, keep_projector_layer=True)
  assert tuned.network.projector_width == 16
  assert not np.allclose(tuned.variables['params']['projector_dense']['kernel'],
                         params['projector']['Dense_0']['kernel'])
  plain = finetune.fine_tune(tiny_config, params, stats, images, labels, num_classes=2,
                             epochs=1, batch_size=8)
  assert set(plain.variables['params']) == {'encoder', 'classifier'}
  feature_dim = tiny_config.model.widths[-1] * tiny_config.model.pool_grid ** 2
  assert plain.variables['params']['classifier']['kernel'].shape == (feature_dim, 2)


def _classifier_input(network, variables, x):
  """What the classifier of `network` reads (intercepted)."""
  seen = []

  def interceptor(next_fun, args, kwargs, context):
    if context.module.name == 'classifier':
      seen.append(args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    network.apply(variables, x, train=False)
  return np.asarray(seen[0])


def test_keep_projector_layer_needs_a_projection_mlp(tiny_config):
  params = {'encoder': {}, 'head': {'Dense_0': {'kernel': np.zeros((4, 4))}}}
  with pytest.raises(ValueError, match='keep_projector_layer=False'):
    finetune.projector_first_layer(params, {})


@pytest.fixture(scope='module')
def one_step_workdir(tmp_path_factory):
  from tiny_config import make_tiny_config
  config = make_tiny_config()
  config.total_steps = 1
  workdir = str(tmp_path_factory.mktemp('finetune_run'))
  train.train_and_evaluate(config, workdir)
  return workdir


@pytest.mark.slow  # `evaluate --evals=finetune` end to end, ~30 s: `pytest -m slow`
def test_evaluate_finetune_rows_use_the_probes_subsets(one_step_workdir, monkeypatch):
  # Catches: subsets other than the low-label probe's (another seed, fraction or label
  # order), rows missing from the table, raw pixels fine-tuned.
  seen = []
  fine_tune = finetune.fine_tune

  def recording(config, params, batch_stats, images, labels, **kwargs):
    seen.append((np.asarray(images), np.asarray(labels), kwargs['epochs']))
    return fine_tune(config, params, batch_stats, images, labels, **kwargs)

  monkeypatch.setattr(finetune, 'fine_tune', recording)
  result = evaluate.evaluate_workdir(one_step_workdir, evals=['finetune'], bank_size=300,
                                     test_size=100, embedding='none', seed=3)
  from ssl_jax import pretrained
  config = pretrained.load(one_step_workdir).config
  bank_images, bank_labels = eval_data.plan(config).bank.limited(300).arrays()
  rows = result['rows']
  assert list(rows) == ['trained encoder', 'random-init encoder', 'raw pixels']
  for name in ('trained encoder', 'random-init encoder'):
    for fraction in (0.01, 0.1):
      key = f'finetune_{lowlabel.fraction_name(fraction)}'
      assert 0.0 <= rows[name][key] <= 1.0
      assert rows[name][f'{key}_num_labels'] == len(
          lowlabel.label_subset(bank_labels, fraction, seed=3))
  assert not any(key.startswith('finetune') for key in rows['raw pixels'])
  table = evaluate.format_table(rows)
  assert 'fine-tune 1%' in table and 'fine-tune 10%' in table
  assert table.splitlines()[-1].split()[-2:] == ['-', '-']  # raw pixels: not applicable
  # The images and labels fine-tuned on are the bank's label_subset(labels, fraction, seed).
  assert [epochs for _, _, epochs in seen] == [60, 30, 60, 30]
  for (images, labels, _), fraction in zip(seen, (0.01, 0.1, 0.01, 0.1)):
    subset = lowlabel.label_subset(bank_labels, fraction, seed=3)
    np.testing.assert_array_equal(images, bank_images[subset])
    np.testing.assert_array_equal(labels, bank_labels[subset])


def test_finetune_is_not_a_default_evaluation():
  assert 'finetune' in evaluate.EVALS and 'finetune' not in evaluate.DEFAULT_EVALS


def test_eval_set_labels_follow_the_records():
  from ssl_jax.data import sources
  source = sources.ArraySource(np.zeros((6, 4, 4, 1), np.uint8), np.array([5, 4, 3, 2, 1, 0]))
  eval_set = eval_data.EvalSet(source, np.array([4, 1, 2]), None)
  np.testing.assert_array_equal(finetune.eval_set_labels(eval_set), [1, 4, 3])
  without = dataclasses.replace(eval_set, source=_NoLabelArray(source))
  np.testing.assert_array_equal(finetune.eval_set_labels(without), [1, 4, 3])


class _NoLabelArray:
  """A source without a `labels` array (as TFDS sources): read record by record."""

  def __init__(self, source):
    self._source = source
    self.image_shape, self.channels, self.encoded = source.image_shape, source.channels, False

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    return self._source[index]
