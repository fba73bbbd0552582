"""Linear probe: multinomial logistic regression on frozen features, the standard protocol.

Features are extracted once from the frozen encoder (the representation before the
projection head, `method.encode`), standardised with training statistics, and a softmax
classifier is fitted full-batch with L-BFGS (optax.lbfgs with its zoom line search) to

    mean_i CE(W x_i + b, y_i) + l2 / 2 * ||W||^2           (bias not regularised)

The L2 strength is chosen on a validation split carved from the training set, then the
classifier is refitted on the whole training set with that strength (Kornblith et al. 2019,
"Do Better ImageNet Models Transfer Better?", sec. 3; SimCLR, Chen et al. 2020, app. B.5).
The objective is scikit-learn's LogisticRegression divided by C * n, so l2 = 1 / (C * n).

Full-batch: for datasets whose features fit in one device's memory (Fashion-MNIST, CIFAR,
ImageNet subsets), which is what the fixed-feature protocol is for.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssl_jax.evaluation import features as features_lib

# Log-spaced, from "barely regularised" to "weights pinned near the class means"; the
# objective is a mean over examples, so these do not depend on the dataset size. Parsed from
# text, because 10.0 ** -5 is 9.999999999999999e-06, which then shows in results and logs.
DEFAULT_L2_GRID = tuple(float(f'1e{k}') for k in range(-6, 1))


def standardization(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-dimension mean and std of `features`; constant dimensions get std 1 so that they
  map to 0 instead of dividing by zero."""
  features = np.asarray(features, np.float64)
  mean = features.mean(axis=0)
  std = features.std(axis=0)
  return mean, np.where(std > 1e-8 * (1.0 + np.abs(mean)), std, 1.0)


def validation_split(labels: np.ndarray, fraction: float, seed: int):
  """Seeded, stratified split of example indices into (fit, validation).

  Each class gives round(fraction * its count) examples to validation, but at least one and
  never its last one, so that small (low-label) training sets still cover every class in
  both.
  """
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  val = []
  for c in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == c))
    # At least one per class (when it has two), so that 1%-label subsets can still be
    # validated; at least one kept for fitting.
    val.append(members[:min(max(1, int(round(fraction * len(members)))), len(members) - 1)])
  val = np.sort(np.concatenate(val))
  if len(val) == 0:
    raise ValueError(f'A validation fraction of {fraction} of {len(labels)} examples leaves no '
                     'validation examples; raise val_fraction or pass a single l2 in l2_grid.')
  fit = np.setdiff1d(np.arange(len(labels)), val)
  return fit, val


@jax.jit
def _fit(x, onehot, sample_weight, l2, max_iter, tol):
  """L-BFGS on the weighted mean cross-entropy plus l2 / 2 ||W||^2, from zero weights.

  Rows with weight 0 do not count, which lets the validation-split fits and the final fit
  share one compiled shape. Stops when the gradient norm falls below `tol`.
  """
  params = {'w': jnp.zeros((x.shape[1], onehot.shape[1]), x.dtype),
            'b': jnp.zeros((onehot.shape[1],), x.dtype)}
  total_weight = jnp.sum(sample_weight)

  def objective(p):
    log_probs = jax.nn.log_softmax(x @ p['w'] + p['b'])
    ce = -jnp.sum(onehot * log_probs, axis=1)
    return jnp.sum(sample_weight * ce) / total_weight + 0.5 * l2 * jnp.sum(p['w'] ** 2)

  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def step(carry):
    p, state = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = solver.update(grad, state, p, value=value, grad=grad, value_fn=objective)
    return optax.apply_updates(p, updates), state

  def keep_going(carry):
    _, state = carry
    count = optax.tree.get(state, 'count')
    grad_norm = optax.tree.norm(optax.tree.get(state, 'grad'))
    return (count == 0) | ((count < max_iter) & (grad_norm >= tol))

  params, state = jax.lax.while_loop(keep_going, step, (params, solver.init(params)))
  return params, optax.tree.get(state, 'count')


def fit_logistic_regression(features, labels, l2: float, num_classes: int,
                            sample_weight=None, max_iter: int = 1000, tol: float = 1e-5):
  """Softmax-regression parameters {'w': [D, C], 'b': [C]} (numpy) on the given features
  (used as they are: standardise first)."""
  features = np.asarray(features, np.float32)
  onehot = np.eye(num_classes, dtype=np.float32)[np.asarray(labels)]
  if sample_weight is None:
    sample_weight = np.ones(len(features), np.float32)
  params, _ = _fit(jnp.asarray(features), jnp.asarray(onehot),
                   jnp.asarray(sample_weight, jnp.float32), jnp.float32(l2),
                   jnp.int32(max_iter), jnp.float32(tol))
  return jax.device_get(params)


def predict(params, features) -> np.ndarray:
  return np.argmax(np.asarray(features, np.float32) @ params['w'] + params['b'], axis=1)


def linear_probe(train_features, train_labels, test_features, test_labels, *,
                 l2_grid=DEFAULT_L2_GRID, val_fraction: float = 0.1, seed: int = 0,
                 num_classes: int | None = None, max_iter: int = 1000,
                 tol: float = 1e-5) -> dict:
  """Linear-probe accuracy by the protocol of the module docstring.

  Returns a dict: 'test_accuracy', 'train_accuracy', 'l2' (the chosen strength),
  'val_accuracy' ({l2: validation accuracy}, empty when the grid has one value, which is
  then used without validation), 'num_train', 'num_test'. Ties in validation accuracy go to
  the stronger regularisation.
  """
  train_features = np.asarray(train_features, np.float32)
  test_features = np.asarray(test_features, np.float32)
  train_labels = np.asarray(train_labels)
  test_labels = np.asarray(test_labels)
  num_classes = int(num_classes or max(train_labels.max(), test_labels.max()) + 1)
  l2_grid = sorted(float(v) for v in l2_grid)
  fit = lambda x, weights, l2: fit_logistic_regression(
      x, train_labels, l2, num_classes, weights, max_iter, tol)

  val_accuracy = {}
  if len(l2_grid) > 1:
    fit_idx, val_idx = validation_split(train_labels, val_fraction, seed)
    mean, std = standardization(train_features[fit_idx])
    x = ((train_features - mean) / std).astype(np.float32)
    in_fit = np.zeros(len(x), np.float32)
    in_fit[fit_idx] = 1.0
    for l2 in l2_grid:
      params = fit(x, in_fit, l2)
      val_accuracy[l2] = float(np.mean(predict(params, x[val_idx]) == train_labels[val_idx]))
  # max() returns the first maximum; iterating from strong to weak prefers the former.
  chosen = max(reversed(l2_grid), key=lambda l2: val_accuracy.get(l2, 0.0))

  mean, std = standardization(train_features)
  x = ((train_features - mean) / std).astype(np.float32)
  params = fit(x, None, chosen)
  x_test = ((test_features - mean) / std).astype(np.float32)
  return {
      'test_accuracy': float(np.mean(predict(params, x_test) == test_labels)),
      'train_accuracy': float(np.mean(predict(params, x) == train_labels)),
      'l2': chosen,
      'val_accuracy': val_accuracy,
      'num_train': len(train_labels),
      'num_test': len(test_labels),
  }


def probe_encoder(encode_fn, train_images, train_labels, test_images, test_labels, *,
                  batch_size: int = 1024, image_size: int | None = None,
                  **probe_kwargs) -> dict:
  """`linear_probe` on features extracted once from `encode_fn` (float images in [0, 1] to
  frozen features, e.g. `method.encode` without the projection head) over uint8 images."""
  extract = lambda images: features_lib.extract_features(encode_fn, images, batch_size,
                                                         image_size)
  return linear_probe(extract(train_images), train_labels, extract(test_images), test_labels,
                      **probe_kwargs)
