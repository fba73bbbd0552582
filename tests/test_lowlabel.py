"""Label-efficiency protocol: class-balanced label subsets and the linear probe on them."""

import numpy as np
import pytest

from ssl_jax.evaluation import lowlabel

COUNTS = [50, 120, 7, 1000]
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(4), COUNTS))


@pytest.mark.parametrize('fraction, expected', [
    (0.1, [5, 12, 1, 100]),   # round(0.7) = 1
    (0.01, [1, 1, 1, 10]),    # round(0.5) = 0 and round(0.07) = 0 are raised to 1
    (1.0, COUNTS),
])
def test_subset_sizes_per_class(fraction, expected):
  subset = lowlabel.label_subset(LABELS, fraction, seed=0)
  np.testing.assert_array_equal(np.bincount(LABELS[subset], minlength=4), expected)


def test_subset_unique_sorted_and_seeded():
  subset = lowlabel.label_subset(LABELS, 0.1, seed=3)
  assert np.all(np.diff(subset) > 0)  # sorted and unique
  assert subset.min() >= 0 and subset.max() < len(LABELS)
  np.testing.assert_array_equal(subset, lowlabel.label_subset(LABELS, 0.1, seed=3))
  np.testing.assert_array_equal(subset, lowlabel.label_subset(list(LABELS), 0.1, seed=3))
  assert not np.array_equal(subset, lowlabel.label_subset(LABELS, 0.1, seed=4))


def test_subset_rejects_bad_fraction():
  for fraction in (0.0, -0.1, 1.5):
    with pytest.raises(ValueError, match='fraction'):
      lowlabel.label_subset(LABELS, fraction)


def test_fraction_names():
  assert [lowlabel.fraction_name(f) for f in (0.01, 0.1, 0.07, 0.005, 1.0)] == [
      '1%', '10%', '7%', '0.5%', '100%']


def _gaussian_classes(num_per_class, seed, num_classes=10, dim=16):
  """Overlapping Gaussian classes (shared means, fresh noise per split): a linear model on
  all 600 labels per class reaches ~91%, on 60 about 90%, on 6 about 82%."""
  means = np.random.default_rng(100).normal(size=(num_classes, dim)) * 0.9
  labels = np.repeat(np.arange(num_classes), num_per_class)
  noise = np.random.default_rng(seed).normal(size=(len(labels), dim))
  return (means[labels] + noise).astype(np.float32), labels


def test_low_label_probe():
  x_train, y_train = _gaussian_classes(600, seed=1)
  x_test, y_test = _gaussian_classes(100, seed=2)
  results = lowlabel.low_label_probe(x_train, y_train, x_test, y_test, fractions=(0.01, 0.1),
                                     seed=0, l2_grid=(1e-3, 1e-1, 1.0))
  assert list(results) == ['1%', '10%']
  assert results['1%']['num_labels'] == 10 * 6
  assert results['10%']['num_labels'] == 10 * 60
  assert results['10%']['num_train'] == 600
  assert results['1%']['num_test'] == results['10%']['num_test'] == 1000
  for result in results.values():
    assert result['l2'] in (1e-3, 1e-1, 1.0)
    assert result['test_accuracy'] > 0.7  # chance is 0.1
  assert results['10%']['test_accuracy'] >= results['1%']['test_accuracy'] - 0.02
