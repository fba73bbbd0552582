"""Weighted kNN against scikit-learn's brute-force cosine neighbours with the same vote, on one
device and with the memory bank sharded over eight."""

import jax
import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from ssl_jax import parallel
from ssl_jax.evaluation import features, knn

TRACE_EVENT = '/jax/core/compile/jaxpr_trace_duration'  # jax.monitoring: one per jaxpr traced


def _sklearn_weighted_knn(bank, bank_labels, test, k, temperature, num_classes):
  nn = NearestNeighbors(n_neighbors=k, metric='cosine', algorithm='brute').fit(bank)
  distances, indices = nn.kneighbors(test)
  weights = np.exp((1.0 - distances) / temperature)
  votes = np.zeros((len(test), num_classes))
  for row in range(len(test)):
    np.add.at(votes[row], bank_labels[indices[row]], weights[row])
  return votes.argmax(axis=1)


@pytest.mark.parametrize('k,chunk', [(1, 7), (10, 64), (50, 1000)])
def test_matches_sklearn(k, chunk):
  rng = np.random.default_rng(k)
  centres = rng.normal(size=(4, 16))
  bank_labels = rng.integers(0, 4, 300)
  test_labels = rng.integers(0, 4, 101)
  bank = centres[bank_labels] + rng.normal(size=(300, 16))
  test = centres[test_labels] + rng.normal(size=(101, 16))
  ours = knn.knn_predict(bank, bank_labels, test, k=k, temperature=0.1, num_classes=4,
                         chunk_size=chunk)
  reference = _sklearn_weighted_knn(bank, bank_labels, test, k, 0.1, 4)
  np.testing.assert_array_equal(ours, reference)
  # The task is neither trivial nor hopeless, so agreement is informative.
  assert 0.4 < np.mean(ours == test_labels) < 1.0


def test_weighting_decides_against_majority():
  # Two far neighbours of class 0 against one very close neighbour of class 1.
  bank = np.array([[1.0, 0.0], [0.0, 1.0], [0.05, 1.0]])
  labels = np.array([1, 0, 0])
  test = np.array([[1.0, 0.02]])
  assert knn.knn_predict(bank, labels, test, k=3, temperature=0.07)[0] == 1
  assert knn.knn_predict(bank, labels, test, k=3, temperature=100.0)[0] == 0


def test_k_larger_than_bank_and_accuracy():
  bank = np.eye(3)
  labels = np.array([0, 1, 2])
  assert knn.knn_accuracy(bank, labels, np.eye(3), labels, k=200) == 1.0


def test_extract_features_batches_and_pads():
  images = np.arange(10 * 2 * 2 * 1, dtype=np.uint8).reshape(10, 2, 2, 1)
  out = features.extract_features(lambda x: x.reshape(len(x), -1) * 2.0, images, batch_size=4)
  np.testing.assert_allclose(out, images.reshape(10, -1) / 255.0 * 2.0, rtol=1e-6)
  resized = features.extract_features(lambda x: x.reshape(len(x), -1), images, batch_size=4,
                                      image_size=4)
  assert resized.shape == (10, 16)


def _gaussian_classes(seed, bank_size, test_size, dim=16, num_classes=4):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_classes, dim))
  bank_labels = rng.integers(0, num_classes, bank_size)
  test_labels = rng.integers(0, num_classes, test_size)
  bank = centres[bank_labels] + rng.normal(size=(bank_size, dim))
  test = centres[test_labels] + rng.normal(size=(test_size, dim))
  return bank, bank_labels, test, test_labels


# 300 rows over 8 devices: padded to 304, shards of 38. k=50 exceeds a shard, so the global
# top-k must be assembled from several devices' candidates.
@pytest.mark.parametrize('k,chunk', [(1, 64), (10, 33), (50, 128)])
def test_sharded_bank_equals_one_device_and_sklearn(k, chunk):
  bank, bank_labels, test, test_labels = _gaussian_classes(100 + k, 300, 101)
  reference = _sklearn_weighted_knn(bank, bank_labels, test, k, 0.1, 4)
  predictions = {
      devices: knn.knn_predict(bank, bank_labels, test, k=k, temperature=0.1, num_classes=4,
                               chunk_size=chunk, mesh=parallel.make_mesh(devices))
      for devices in (1, 8)}
  predictions[None] = knn.knn_predict(bank, bank_labels, test, k=k, temperature=0.1,
                                      num_classes=4, chunk_size=chunk)
  for pred in predictions.values():
    np.testing.assert_array_equal(pred, reference)
  assert 0.4 < np.mean(reference == test_labels) < 1.0


def test_padding_rows_are_never_neighbours():
  # Every real bank row is anti-aligned with the query (cosine < 0), so the all-zero padding
  # rows (cosine 0, label 0) would outrank them all if they were not masked out.
  bank = -np.abs(np.random.default_rng(0).normal(size=(5, 3))) - 0.1
  labels = np.array([1, 2, 1, 1, 2])
  query = np.ones((1, 3))
  mesh = parallel.make_mesh(8)  # 5 rows over 8 devices: three shards hold only padding
  for k in (1, 3, 5, 200):
    expected = _sklearn_weighted_knn(bank, labels, query, min(k, 5), 0.07, 3)
    got = knn.knn_predict(bank, labels, query, k=k, temperature=0.07, num_classes=3, mesh=mesh)
    np.testing.assert_array_equal(got, expected)
    assert got[0] != 0


def test_small_temperature_does_not_overflow():
  # exp(1 / 0.005) = exp(200) overflows float32; the vote must still follow the closest rows.
  bank = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.9]])
  labels = np.array([0, 0, 1, 1, 1])
  test = np.array([[1.0, 0.05], [0.05, 1.0]])
  for mesh in (None, parallel.make_mesh(8)):
    np.testing.assert_array_equal(
        knn.knn_predict(bank, labels, test, k=5, temperature=0.005, mesh=mesh), [0, 1])


def test_evaluations_of_later_states_reuse_the_compiled_extraction(tiny_config):
  """The monitor scores a new FrozenEncoder of the same method at every periodic evaluation
  (the state has moved): extracting its features, sharded or on one device, must reuse the
  first evaluation's executable (a new jit per evaluation traced and compiled again, seconds
  each time), and still give the new state's features."""
  from ssl_jax import experiment
  from ssl_jax.data.sources import ArraySource
  from ssl_jax.evaluation import eval_data
  from ssl_jax.methods import frozen_encoder

  built = experiment.build(tiny_config, num_train_examples=64, image_channels=1)
  state = built.init_state()
  later = state.replace(params=jax.tree.map(lambda x: x * 1.5, state.params))
  images = np.random.default_rng(0).integers(0, 256, (40, 28, 28, 1), np.uint8)
  eval_set = eval_data.EvalSet(ArraySource(images, np.zeros(40, np.int32)), np.arange(40),
                               transform=None)
  mesh = parallel.make_mesh()

  traces = []
  listener = lambda event, duration, **kwargs: traces.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    extracted = []
    for s in (state, later):
      encoder = frozen_encoder(built.method, s)
      before = traces.count(TRACE_EVENT)
      local = features.extract_features(encoder, images, batch_size=16, image_size=12)
      sharded, _ = eval_data.stream_features(encoder, eval_set, 16, 12, mesh)
      extracted.append((traces.count(TRACE_EVENT) - before, local, sharded, encoder))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)

  (first_traces, *_), (later_traces, local, sharded, encoder) = extracted
  assert first_traces >= 2 and later_traces == 0, (first_traces, later_traces)
  expected = np.asarray(encoder(features.preprocess(images, 12)))
  np.testing.assert_allclose(local, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sharded, expected, rtol=1e-5, atol=1e-6)
  assert not np.allclose(extracted[0][1], local, atol=1e-3)  # the later state's features
