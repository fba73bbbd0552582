"""Weighted kNN against scikit-learn's brute-force cosine neighbours with the same vote."""

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from ssl_jax.evaluation import features, knn


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
