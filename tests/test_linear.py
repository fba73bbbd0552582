"""Linear probe against scikit-learn's logistic regression on the same features."""

import jax
import numpy as np
import optax
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
  # The path runs from the strongest strength down and may stop early (PATH_PATIENCE).
  fitted = sorted(linear.DEFAULT_L2_GRID, reverse=True)[:len(probe['val_accuracy'])]
  assert set(probe['val_accuracy']) == set(fitted)
  assert probe['folds'] == linear.CV_FOLDS  # 120 held out would be < MIN_HOLDOUT
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


def _standardized(digits):
  x_train, y_train, _, _ = digits
  mean, std = linear.standardization(x_train)
  return ((x_train - mean) / std).astype(np.float32), y_train


def _gradient_norms(params, x, labels, l2, num_classes=10):
  """(gradient norm of the objective at params, at the zero model), in float64."""
  x = np.asarray(x, np.float64)
  onehot = np.eye(num_classes)[labels]

  def norm(w, b, l2):
    logits = x @ w + b
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    residual = (probs - onehot) / len(x)
    return np.sqrt(np.sum((x.T @ residual + l2 * w) ** 2) + np.sum(residual.sum(axis=0) ** 2))

  zero = norm(np.zeros_like(params['w'], np.float64), np.zeros(num_classes), 0.0)
  return norm(params['w'].astype(np.float64), params['b'].astype(np.float64), l2), zero


def test_warm_start_from_elsewhere_reaches_the_same_optimum(digits):
  x, y = _standardized(digits)
  l2 = 1e-3
  cold = linear.fit_logistic_regression(x, y, l2, 10, tol=1e-7)
  rng = np.random.default_rng(0)
  for init in (linear.fit_logistic_regression(x, y, 1.0, 10),  # another strength's optimum
               {'w': rng.normal(size=(x.shape[1], 10)).astype(np.float32),  # far off
                'b': rng.normal(size=10).astype(np.float32)}):
    warm = linear.fit_logistic_regression(x, y, l2, 10, tol=1e-7, init=init)
    np.testing.assert_allclose(warm['w'], cold['w'], atol=2e-3)
    np.testing.assert_allclose(warm['b'] - warm['b'].mean(), cold['b'] - cold['b'].mean(),
                               atol=2e-3)


@pytest.mark.parametrize('tol', [1e-2, 1e-4])
def test_stops_at_the_first_iterate_within_the_relative_tolerance(digits, tol):
  x, y = _standardized(digits)
  # Scaled features scale the reference, the zero model's gradient norm, tenfold, so that a
  # tolerance taken as absolute would stop at another iterate.
  x = 10 * x
  l2 = 1e-3
  params = linear.fit_logistic_regression(x, y, l2, 10, tol=tol)
  grad_norm, zero_grad_norm = _gradient_norms(params, x, y, l2)
  assert grad_norm <= 1.01 * tol * zero_grad_norm
  for max_iter in range(1, 1000):
    early = linear.fit_logistic_regression(x, y, l2, 10, tol=tol, max_iter=max_iter)
    if _gradient_norms(early, x, y, l2)[0] <= tol * zero_grad_norm:
      break
  np.testing.assert_allclose(params['w'], early['w'], rtol=1e-5, atol=1e-6)


def test_looser_tolerance_stops_sooner(digits):
  # Single-value grids: one fit from zero on the whole training set.
  iterations = {tol: linear.linear_probe(*digits, l2_grid=(1e-3,), tol=tol)['iterations']
                for tol in (1e-2, 1e-4, 1e-6)}
  assert iterations[1e-2] < iterations[1e-4] < iterations[1e-6]


def test_probe_fits_the_path_strong_to_weak_from_the_previous_solution(digits, monkeypatch):
  calls = []
  solve = linear._solve

  def recording_solve(features, onehot, l2, sample_weight, init, max_iter, tol,
                      previous=None):
    params, iterations, passed_on = solve(features, onehot, l2, sample_weight, init,
                                          max_iter, tol, previous)
    calls.append({'l2': l2, 'features': features, 'weighted': sample_weight is not None,
                  'init': init, 'params': params, 'previous': previous,
                  'passed_on': passed_on})
    return params, iterations, passed_on

  monkeypatch.setattr(linear, '_solve', recording_solve)
  grid = (1e-4, 1.0, 1e-2)
  result = linear.linear_probe(*digits, l2_grid=grid, folds=1)
  *path, refit = calls
  assert [c['l2'] for c in path] == [1.0, 1e-2, 1e-4] and all(c['weighted'] for c in path)
  # The strongest starts from zero, the others from the previous solution and history.
  assert path[0]['init'] is None and path[0]['previous'] is None
  for previous, call in zip(path, path[1:]):
    assert call['init'] is previous['params'] and call['previous'] is previous['passed_on']
  assert refit['previous'] is None  # other data: no history carried over
  # The refit, on all the training data, starts from the chosen strength's validation-split
  # solution, re-expressed for the new standardisation: the same logits.
  assert refit['l2'] == result['l2'] and not refit['weighted']
  chosen = next(c for c in path if c['l2'] == result['l2'])
  np.testing.assert_allclose(
      refit['features'] @ refit['init']['w'] + refit['init']['b'],
      chosen['features'] @ chosen['params']['w'] + chosen['params']['b'], rtol=1e-4, atol=1e-4)


def test_restandardize_keeps_the_logits():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(50, 6)) * 3 + 1
  params = {'w': rng.normal(size=(6, 4)), 'b': rng.normal(size=4)}
  old_mean, old_std = x[:30].mean(0), x[:30].std(0)
  new_mean, new_std = x.mean(0), x.std(0)
  moved = linear._restandardize(params, old_mean, old_std, new_mean, new_std)
  np.testing.assert_allclose(((x - new_mean) / new_std) @ moved['w'] + moved['b'],
                             ((x - old_mean) / old_std) @ params['w'] + params['b'],
                             rtol=1e-5, atol=1e-5)


def _onehot(labels):
  return np.eye(10, dtype=np.float32)[labels]


def test_carried_history_reaches_the_same_optimum_in_fewer_iterations(digits):
  x, y = _standardized(digits)
  solve = lambda l2, init=None, previous=None, tol=linear.DEFAULT_TOL: linear._solve(
      x, _onehot(y), l2, None, init, 1000, tol, previous)
  strong, _, history = solve(1e-2)
  _, zero_iterations, _ = solve(1e-3)
  _, params_iterations, _ = solve(1e-3, init=strong)
  _, carried_iterations, _ = solve(1e-3, init=strong, previous=history)
  assert carried_iterations < params_iterations <= zero_iterations
  # Solved tightly, every start gives the same optimum; a history recorded at another l2 than
  # it claims is a wrong model of the curvature, which may cost iterations but must not
  # move the optimum.
  reference, _, _ = solve(1e-3, tol=1e-7)
  for init, previous in ((strong, history), (strong, (1.0, history[1])),
                         (strong, (1e-4, history[1]))):
    params, _, _ = solve(1e-3, init=init, previous=previous, tol=1e-7)
    np.testing.assert_allclose(params['w'], reference['w'], atol=2e-4)


def test_carried_history_is_the_previous_pairs_shifted_for_the_new_l2(digits):
  x, y = _standardized(digits)
  onehot = _onehot(y)
  fit = lambda max_iter: linear._solve(x, onehot, 1e-2, None, None, max_iter,
                                       linear.DEFAULT_TOL)
  params, iterations, (old_l2, state) = fit(1000)
  as_wt = lambda p: {'wt': np.asarray(p['w']).T, 'b': np.asarray(p['b'])}
  start = as_wt(params)
  grad = jax.tree.map(np.ones_like, start)  # any gradient: the pairs do not depend on it
  carried = linear._carried_history(state, 1e-3 - float(old_l2), start, grad)
  # Every stored pair: the same step, its gradient change shifted by the l2 change on W.
  np.testing.assert_array_equal(carried.diff_params_memory['wt'], state.diff_params_memory['wt'])
  np.testing.assert_allclose(carried.diff_updates_memory['wt'],
                             state.diff_updates_memory['wt'] +
                             (1e-3 - 1e-2) * state.diff_params_memory['wt'], atol=1e-7)
  np.testing.assert_array_equal(carried.diff_updates_memory['b'], state.diff_updates_memory['b'])
  # The pair optax re-enters first is the latest stored: the step between the fit's last two
  # iterates before its final one (the final step stores no pair).
  before_last, second_last = as_wt(fit(iterations - 1)[0]), as_wt(fit(iterations - 2)[0])
  re_entered = jax.tree.map(lambda a, b: a - b, start, carried.params)
  for k in ('wt', 'b'):
    np.testing.assert_allclose(re_entered[k], before_last[k] - second_last[k], atol=1e-5)
  # ...into its own slot: optax's update leaves the history as carried, pairs and weights.
  _, updated = optax.scale_by_lbfgs(memory_size=state.weights_memory.shape[0]).update(
      grad, carried, start)
  for name in ('diff_params_memory', 'diff_updates_memory'):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 getattr(updated, name), getattr(carried, name))
  # (The re-entered step is recomputed as a difference of nearby iterates: float32 rounding.)
  np.testing.assert_allclose(updated.weights_memory, carried.weights_memory, rtol=1e-2)
  assert np.all(carried.weights_memory >= 0) and np.sum(carried.weights_memory > 0) >= 2


def test_warm_starts_save_iterations(digits):
  # The same validation-split fit at 1e-3, first in the path (from zero) or after 1e-2.
  cold = linear.linear_probe(*digits, l2_grid=(1e-3, 1e-4), folds=1)
  warm = linear.linear_probe(*digits, l2_grid=(1e-2, 1e-3), folds=1)
  assert warm['val_iterations'][1e-3] < 0.8 * cold['val_iterations'][1e-3]
  # The refit from the validation-split solution, against one from zero (single-value grid).
  from_zero = linear.linear_probe(*digits, l2_grid=(warm['l2'],))
  assert warm['iterations'] < 0.8 * from_zero['iterations']


def test_iterations_reported_and_capped(digits):
  result = linear.linear_probe(*digits, l2_grid=(1e-1, 1e-3), max_iter=3, folds=1)
  assert set(result['val_iterations']) == {1e-1, 1e-3}
  assert all(1 <= n <= 3 for n in result['val_iterations'].values())
  assert 1 <= result['iterations'] <= 3


def test_features_without_class_signal_stop_early():
  # Constant features and balanced classes: the zero model is optimal and its gradient, the
  # tolerance's reference, is rounding noise; the fit must not run to max_iter.
  labels = np.arange(1000) % 5
  result = linear.linear_probe(np.ones((1000, 8), np.float32), labels,
                               np.ones((100, 8), np.float32), labels[:100], l2_grid=(1e-2, 1e-4),
                               folds=1)
  assert max(result['val_iterations'].values()) < 50 and result['iterations'] < 50
  assert result['test_accuracy'] == pytest.approx(0.2)


WIDE_GRID = tuple(float(f'1e{k}') for k in range(-6, 3))


def test_path_stops_after_patience_strengths_without_a_better_validation_accuracy(digits):
  whole = linear.linear_probe(*digits, l2_grid=WIDE_GRID, folds=1, path_patience=None)
  assert set(whole['val_accuracy']) == set(WIDE_GRID)
  # Where the path must stop, from the whole path's validation accuracies (the path up to
  # the stop is the same computation, so the same numbers).
  best, since_best, expected = -1.0, 0, []
  for l2 in sorted(WIDE_GRID, reverse=True):
    expected.append(l2)
    since_best = 0 if whole['val_accuracy'][l2] > best else since_best + 1
    best = max(best, whole['val_accuracy'][l2])
    if since_best >= 2:
      break
  assert len(expected) < len(WIDE_GRID)  # not vacuous: the path does stop early here
  short = linear.linear_probe(*digits, l2_grid=WIDE_GRID, folds=1, path_patience=2)
  assert list(short['val_accuracy']) == expected
  assert short['val_accuracy'] == {l2: whole['val_accuracy'][l2] for l2 in expected}
  assert short['l2'] == whole['l2'] and short['test_accuracy'] == whole['test_accuracy']


def test_validation_folds_stratified_disjoint_covering_and_seeded():
  labels = np.repeat(np.arange(3), [10, 7, 3])
  folds = linear.validation_folds(labels, 4, seed=0)
  vals = [val for _, val in folds]
  np.testing.assert_array_equal(np.sort(np.concatenate(vals)), np.arange(len(labels)))
  for fit, val in folds:
    assert not set(fit) & set(val) and len(fit) + len(val) == len(labels)
  assert max(map(len, vals)) - min(map(len, vals)) <= 1
  # Each class spread as evenly as it can be: 10 -> 2-3 per fold, 7 -> 1-2, 3 -> 0-1.
  for c, (low, high) in enumerate(((2, 3), (1, 2), (0, 1))):
    assert all(low <= np.sum(labels[val] == c) <= high for val in vals)
  again = linear.validation_folds(labels, 4, seed=0)
  assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
  other = linear.validation_folds(labels, 4, seed=1)
  assert not all(np.array_equal(a[1], b[1]) for a, b in zip(folds, other))


def test_choose_folds_cross_validates_small_training_sets():
  assert linear.choose_folds(60_000, 0.1) == 1       # 6,000 held out
  assert linear.choose_folds(10_000, 0.1) == 1       # 1,000 held out
  assert linear.choose_folds(6_000, 0.1) == linear.CV_FOLDS
  assert linear.choose_folds(600, 0.1) == linear.CV_FOLDS


def test_cross_validated_accuracy_is_the_mean_over_the_folds(digits):
  x_train, y_train, x_test, y_test = digits
  l2 = 1.0  # the strongest: every fold's fit starts from zero, like the independent fits here
  result = linear.linear_probe(x_train, y_train, x_test, y_test, l2_grid=(l2, 1e-3),
                               folds=3, seed=5)
  assert result['folds'] == 3
  correct = 0
  for fit, val in linear.validation_folds(y_train, 3, seed=5):
    mean, std = linear.standardization(x_train[fit])
    params = linear.fit_logistic_regression((x_train[fit] - mean) / std, y_train[fit], l2, 10)
    correct += np.sum(linear.predict(params, (x_train[val] - mean) / std) == y_train[val])
  # The same objective solved to the same tolerance from zero: at most a tie-level
  # difference of an example or two.
  assert abs(result['val_accuracy'][l2] - correct / len(y_train)) <= 2 / len(y_train)


def test_history_size():
  assert linear.history_size(784, 10) == linear.MAX_HISTORY
  assert linear.history_size(2048, 1000) == 16  # 2**26 floats / (2 * 2049 * 1000)
  assert linear.history_size(100_000, 1000) == 10  # never below optax's default


def test_standardization_in_blocks_equals_the_whole_array_in_float64(monkeypatch):
  """Catches a block of rows left unwritten (np.empty's garbage) or computed in float32: 20
  rows in blocks of 7 leave a partial last block."""
  monkeypatch.setattr(linear, 'STANDARDIZE_ROWS', 7)
  x = (np.random.default_rng(0).normal(size=(20, 5)) * [1, 10, 1e3, 1e-3, 0]
       + [0, 3, -1e4, 1, 2]).astype(np.float32)
  mean, std = linear.standardization(x)
  x64 = x.astype(np.float64)
  np.testing.assert_array_equal(mean, x64.mean(axis=0))
  np.testing.assert_array_equal(std[:4], x64.std(axis=0)[:4])
  assert std[4] == 1.0  # a constant column
  np.testing.assert_array_equal(linear.standardize(x, mean, std),
                                ((x64 - mean) / std).astype(np.float32))
