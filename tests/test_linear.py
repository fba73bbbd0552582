"""Linear probe against scikit-learn's logistic regression on the same features."""

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from ssl_jax.evaluation import linear


@pytest.fixture(scope='module')
def digits():
  """8x8 digits (1797 rows, 10 classes): linear models reach ~96%, not 100%, so the
  regularisation and the optimiser's convergence both show in the accuracy."""
  x, y = load_digits(return_X_y=True)
  order = np.random.default_rng(0).permutation(len(y))
  x, y = x[order].astype(np.float32), y[order]
  return x[:1200], y[:1200], x[1200:], y[1200:]


@pytest.fixture(scope='module')
def probe(digits):
  return linear.linear_probe(*digits)


def _sklearn_accuracy(digits, l2):
  """scikit-learn's multinomial L-BFGS fit of the same objective: its loss is ours times
  C * n, so C = 1 / (l2 * n); features standardised the same way."""
  x_train, y_train, x_test, y_test = digits
  mean, std = linear.standardization(x_train)
  clf = LogisticRegression(C=1.0 / (l2 * len(y_train)), max_iter=10_000, tol=1e-8)
  clf.fit((x_train - mean) / std, y_train)
  return clf, clf.score((x_test - mean) / std, y_test)


def test_probe_matches_sklearn_accuracy(digits, probe):
  _, sklearn_accuracy = _sklearn_accuracy(digits, probe['l2'])
  assert probe['test_accuracy'] == pytest.approx(sklearn_accuracy, abs=0.01)
  assert probe['test_accuracy'] > 0.9
  assert probe['num_train'] == 1200 and probe['num_test'] == len(digits[3])


def test_fit_matches_sklearn_weights(digits):
  x_train, y_train, _, _ = digits
  l2 = 1e-2
  clf, _ = _sklearn_accuracy(digits, l2)
  mean, std = linear.standardization(x_train)
  params = linear.fit_logistic_regression((x_train - mean) / std, y_train, l2, 10)
  # The weights are unique (strictly convex in W); the bias only up to a shared shift.
  np.testing.assert_allclose(params['w'], clf.coef_.T, atol=2e-3)
  np.testing.assert_allclose(params['b'] - params['b'].mean(),
                             clf.intercept_ - clf.intercept_.mean(), atol=2e-3)


def test_chosen_l2_is_best_on_validation_from_grid(probe):
  assert set(probe['val_accuracy']) == set(linear.DEFAULT_L2_GRID)
  assert probe['l2'] in linear.DEFAULT_L2_GRID
  best = max(probe['val_accuracy'].values())
  assert probe['val_accuracy'][probe['l2']] == best
  # Ties go to the strongest regularisation.
  assert probe['l2'] == max(l2 for l2, acc in probe['val_accuracy'].items() if acc == best)


def test_custom_grid_and_single_value(digits):
  grid = (1.0, 1e-3)
  result = linear.linear_probe(*digits, l2_grid=grid)
  assert result['l2'] in grid and set(result['val_accuracy']) == set(grid)
  # Very strong L2 pins the weights near 0: validation must prefer the weak one here.
  assert result['val_accuracy'][1e-3] > result['val_accuracy'][1.0]
  single = linear.linear_probe(*digits, l2_grid=(1e-2,))
  assert single['l2'] == 1e-2 and single['val_accuracy'] == {}


def test_validation_split_stratified_seeded_disjoint():
  labels = np.repeat(np.arange(4), [10, 20, 40, 3])
  fit, val = linear.validation_split(labels, 0.25, seed=0)
  assert len(np.intersect1d(fit, val)) == 0
  np.testing.assert_array_equal(np.sort(np.concatenate([fit, val])), np.arange(len(labels)))
  # round(0.25 * count) per class (Python rounds 2.5 to 2), and at most count - 1.
  np.testing.assert_array_equal(np.bincount(labels[val], minlength=4), [2, 5, 10, 1])
  again_fit, again_val = linear.validation_split(labels, 0.25, seed=0)
  np.testing.assert_array_equal(val, again_val)
  np.testing.assert_array_equal(fit, again_fit)
  _, other_val = linear.validation_split(labels, 0.25, seed=1)
  assert not np.array_equal(val, other_val)
  # A class of one example keeps it for fitting.
  _, val = linear.validation_split(np.array([0, 1, 1, 1, 1]), 0.5, seed=0)
  assert 0 not in val and len(val) == 2


def test_validation_split_too_small_raises():
  with pytest.raises(ValueError, match='no validation examples'):
    linear.validation_split(np.array([0, 1, 2]), 0.1, seed=0)
