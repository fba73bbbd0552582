"""Label efficiency: linear-probe accuracy when only a fraction of the training labels is kept.

The semi-supervised protocol of SimCLR (Chen et al. 2020, sec. 6 and app. B.5, after Zhai
et al. 2019, "S4L") trains on fixed, class-balanced 1% and 10% subsets of the labels. Here the
classifier is a linear probe on frozen features (`linear.linear_probe`); fine-tuning the
whole encoder on the same subsets is `evaluation/finetune.py`. The L2 strength is chosen on the subset
itself, since a label-scarce user has no other labels to validate on: cross-validated over its
folds when a held-out part would be small (`linear.choose_folds`).
"""

from __future__ import annotations

import numpy as np

from ssl_jax.evaluation import linear


def label_subset(labels, fraction: float, seed: int = 0) -> np.ndarray:
  """Sorted indices of a seeded, class-balanced subset: each class keeps round(fraction x its
  count) of its examples, at least one, so that every class stays represented. The same
  labels, fraction and seed give the same subset."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f'fraction must be in (0, 1], got {fraction}.')
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  chosen = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    keep = max(1, int(round(fraction * len(members))))
    chosen.append(rng.choice(members, size=keep, replace=False))
  return np.sort(np.concatenate(chosen))


def fraction_name(fraction: float) -> str:
  """'1%' for 0.01, '10%' for 0.1, '0.5%' for 0.005."""
  return f'{100 * fraction:g}%'


def low_label_probe(train_features, train_labels, test_features, test_labels,
                    fractions=(0.01, 0.1), seed: int = 0, **linear_kwargs) -> dict:
  """For each fraction, `linear.linear_probe` trained on `label_subset(train_labels, fraction,
  seed)` and tested on the whole test set.

  Returns {fraction_name(f): linear_probe result + 'num_labels' (the subset size)}, e.g.
  {'1%': {...}, '10%': {...}}. `linear_kwargs` go to `linear_probe` (l2_grid, val_fraction,
  max_iter, tol, num_classes); its validation split uses the same seed.
  """
  train_features = np.asarray(train_features)
  train_labels = np.asarray(train_labels)
  test_labels = np.asarray(test_labels)
  # From the full label sets, so that every subset's classifier has the same output width.
  linear_kwargs.setdefault('num_classes',
                           int(max(train_labels.max(), test_labels.max()) + 1))
  results = {}
  for fraction in fractions:
    subset = label_subset(train_labels, fraction, seed)
    result = linear.linear_probe(train_features[subset], train_labels[subset], test_features,
                                 test_labels, seed=seed, **linear_kwargs)
    result['num_labels'] = len(subset)
    results[fraction_name(fraction)] = result
  return results
