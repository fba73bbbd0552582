"""Linear probe: multinomial logistic regression on frozen features, the standard protocol.

Features are extracted once from the frozen encoder (the representation before the
projection head, `method.encode`), standardised with training statistics, and a softmax
classifier is fitted full-batch with L-BFGS (optax.lbfgs with its zoom line search) to

    mean_i CE(W x_i + b, y_i) + l2 / 2 * ||W||^2           (bias not regularised)

The L2 strength is chosen on a validation split carved from the training set, then the
classifier is refitted on the whole training set with that strength (Kornblith et al. 2019,
"Do Better ImageNet Models Transfer Better?", sec. 3; SimCLR, Chen et al. 2020, app. B.5).
The objective is scikit-learn's LogisticRegression divided by C * n, so l2 = 1 / (C * n).

The validation split is 10 % of the training set held out when that is at least
`MIN_HOLDOUT` examples. Smaller training sets (the 1 % and 10 % label subsets) choose by
`CV_FOLDS`-fold cross-validation, the mean accuracy over the folds, as scikit-learn's
LogisticRegressionCV does: a 60-example held-out split (1 % of Fashion-MNIST's labels) has a
standard error of about 5 points, which decided the chosen strength, and so the reported
accuracy, more than the features did.

The objective is strictly convex in W, so where a fit starts and what it knows of the
curvature change only the cost, not the optimum it converges to. Weakly regularised fits
are the costly ones: close to separable classes leave the objective flat along many
directions, an ill-conditioned problem on which L-BFGS needs many iterations. So:

- Warm starts along the regularisation path (as scikit-learn's LogisticRegressionCV does):
  the grid is fitted from the strongest L2 to the weakest, each fit starting from the
  previous solution and with the previous fit's L-BFGS history (its (step, gradient change)
  pairs, shifted exactly for the change of l2), which already describes the curvature
  between the two optima. The refit on the whole training set starts from the chosen
  strength's validation-split solution, re-expressed for the whole set's standardisation
  (same logits); it carries no history, since its data differ.
- Stopping rule: the gradient norm falls to `tol` times its value at the zero model
  (W = 0, b = 0). That reference depends on neither l2 nor the starting point, so a
  warm-started fit is held to the same standard as one from zero; and it scales with the
  class signal in the features, so one `tol` suits raw pixels and low-dimensional
  embeddings alike. `DEFAULT_TOL` was set where the validation and test accuracies agree
  with those of a much stricter solve (on Fashion-MNIST pixels and embeddings): solving
  further moves the weakly regularised fits a long way along their flat directions without
  changing their predictions. Fits also stop when float32 resolves no further progress, and after
  `max_iter` iterations, which the weakest strengths on high-dimensional features (e.g. raw
  pixels) can reach; the probe reports every fit's iterations.
- The path stops at the first strength that does not improve on the best validation
  accuracy so far (`PATH_PATIENCE` = 1). The weakest strengths are the costliest fits
  (each step down the grid roughly doubles the iterations) and, past the peak of the
  validation curve, do not win; a strength after the stop could only be chosen if the
  curve rose again after falling. The README's "Evaluating a trained encoder" gives what
  the stop saved and that it changed no chosen strength there.
- A long L-BFGS history (`MAX_HISTORY` pairs rather than optax's 10): it models more of the
  ill-conditioned curvature, at little cost next to the pass over the features that every
  iteration makes.

Full-batch: for datasets whose features fit in one device's memory (Fashion-MNIST, CIFAR,
ImageNet subsets), which is what the fixed-feature protocol is for.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssl_jax.evaluation import features as features_lib

# Log-spaced, from "barely regularised" to "weights pinned near the class means"; the
# objective is a mean over examples, so these do not depend on the dataset size. Parsed from
# text, because 10.0 ** -5 is 9.999999999999999e-06, which then shows in results and logs.
DEFAULT_L2_GRID = tuple(float(f'1e{k}') for k in range(-6, 1))
# Stopping tolerance on the gradient norm, relative to the zero model's (module docstring).
DEFAULT_TOL = 2e-5
# L-BFGS history length: the (step, gradient change) pairs kept to model the curvature.
MAX_HISTORY = 200
# The history holds 2 * length * (num_features + 1) * num_classes floats; this caps it (at
# 256 MiB) for wide problems, e.g. 2048 features x 1000 classes keep 16 pairs.
HISTORY_FLOATS = 2 ** 26
# A fit also stops after this many iterations without a new lowest objective (see `_fit`).
STALL_ITERATIONS = 10
# The L2 path stops after this many strengths in a row without a new best validation
# accuracy (module docstring).
PATH_PATIENCE = 1
# A held-out split smaller than this chooses the L2 strength by CV_FOLDS-fold
# cross-validation instead (module docstring).
MIN_HOLDOUT = 1000
CV_FOLDS = 5
# Rows per block of `standardize`.
STANDARDIZE_ROWS = 4096


def standardization(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-dimension mean and std of `features`; constant dimensions get std 1 so that they
  map to 0 instead of dividing by zero."""
  features = np.asarray(features)
  # Accumulated in float64 without a float64 copy of the features (the same values: numpy
  # converts as it reduces; see `standardize` for why copies matter).
  mean = features.mean(axis=0, dtype=np.float64)
  std = features.std(axis=0, dtype=np.float64)
  return mean, np.where(std > 1e-8 * (1.0 + np.abs(mean)), std, 1.0)


def standardize(features: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """(features - mean) / std in float64, returned as float32: computed a block of rows at a
  time (elementwise, so the same values as all at once), without whole-array float64
  temporaries, whose fresh pages cost more than the arithmetic on large feature sets."""
  out = np.empty(features.shape, np.float32)
  for start in range(0, len(features), STANDARDIZE_ROWS):
    rows = slice(start, start + STANDARDIZE_ROWS)
    out[rows] = (features[rows] - mean) / std
  return out


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


def history_size(num_features: int, num_classes: int) -> int:
  """L-BFGS history length for a classifier of this size: `MAX_HISTORY` within the
  `HISTORY_FLOATS` budget, and never below optax's default of 10."""
  num_params = (num_features + 1) * num_classes
  return int(min(MAX_HISTORY, max(10, HISTORY_FLOATS // (2 * num_params))))


def _carried_history(state, l2_change, params, grad):
  """The L-BFGS state that ended a fit at some l2, made to start one at l2 + l2_change from
  `params`, where the new objective's gradient is `grad`.

  The stored pairs (s, y) = (step, gradient change) are secant pairs of the old objective;
  the new one differs by l2_change / 2 * ||W||^2, so y + l2_change * s_W is exactly its
  gradient change over the same step. optax's next update stores the pair (params -
  state.params, grad - state.updates) in slot (count - 1) and scales its initial inverse
  Hessian by that pair; so the count is set back by one and the last (params, gradient) one
  stored step back from `params`: the update re-enters the last pair in its own slot,
  rather than adding a zero-length one (which would also lose the scale).
  """
  size = state.weights_memory.shape[0]
  s_mem, y_mem = state.diff_params_memory, state.diff_updates_memory
  y_mem = {'wt': y_mem['wt'] + l2_change * s_mem['wt'], 'b': y_mem['b']}
  curvature = sum(jnp.sum(y_mem[k] * s_mem[k], axis=tuple(range(1, s_mem[k].ndim)))
                  for k in s_mem)
  # The update at count k stores its pair in slot (k - 1) % size: the last one, made at
  # count - 1, is in slot (count - 2); the first update (count 0) stores none.
  last = (state.count - 2) % size
  # A pair without positive curvature would break the inverse-Hessian model: left out; and
  # the last one must have it (else nothing is carried, see `_fit`), since optax re-enters
  # it unchecked.
  positive = (curvature > 0) & (curvature[last] > 0) & (state.count >= 2)
  weights = jnp.where(positive, 1.0 / jnp.where(positive, curvature, 1.0), 0.0)
  s_last = jax.tree.map(lambda m: m[last], s_mem)
  y_last = jax.tree.map(lambda m: m[last], y_mem)
  return state._replace(count=state.count - 1,
                        params=optax.tree.sub(params, s_last),
                        updates=optax.tree.sub(grad, y_last),
                        diff_updates_memory=y_mem,
                        weights_memory=weights.astype(state.weights_memory.dtype))


@functools.partial(jax.jit, static_argnames='history')
def _fit(x, onehot, sample_weight, l2, init, previous, max_iter, tol, *, history):
  """L-BFGS on the weighted mean cross-entropy plus l2 / 2 ||W||^2, from `init` ({'w': [D, C],
  'b': [C]}).

  `previous` is (l2, final L-BFGS state) of the fit before, on the same x and weights: its
  curvature pairs, shifted for the change of l2, seed this fit's (they are the last steps
  that fit took to its optimum, where this fit starts); a state without a usable pair (e.g.
  a fresh one) seeds nothing. Returns the parameters, the number of iterations and (l2,
  final L-BFGS state) for the next fit.

  Rows with weight 0 do not count, which lets the validation-split fits and the final fit
  share one compiled shape. Stops when the gradient norm falls to `tol` times its value at
  W = 0, b = 0 (which has no L2 part), when the objective has stopped going down, or after
  `max_iter` iterations.
  """
  total_weight = jnp.sum(sample_weight)

  # The weights are held as [C, D]: the gradient then contracts the examples as
  # (dlogits^T @ x) over x's rows as laid out, where [D, C] weights make XLA:CPU contract
  # x's leading axis (x^T @ dlogits), which on the CPU takes about twice as long.
  def objective(p):
    log_probs = jax.nn.log_softmax(x @ p['wt'].T + p['b'])
    ce = -jnp.sum(onehot * log_probs, axis=1)
    return jnp.sum(sample_weight * ce) / total_weight + 0.5 * l2 * jnp.sum(p['wt'] ** 2)

  params = {'wt': init['w'].T.astype(x.dtype), 'b': init['b'].astype(x.dtype)}
  # The zero model's gradient, written out (uniform probabilities, no L2 part): jax.grad at
  # constant zero weights came out NaN under jit on XLA:CPU for some shapes (e.g. 2991 x 300).
  residual = sample_weight[:, None] * (1.0 / onehot.shape[1] - onehot) / total_weight
  zero_grad_norm = optax.tree.norm({'wt': residual.T @ x, 'b': jnp.sum(residual, axis=0)})
  solver = optax.lbfgs(memory_size=history)
  state = solver.init(params)
  previous_l2, previous_history = previous
  carried = _carried_history(previous_history, l2 - previous_l2, params,
                             jax.grad(objective)(params))
  fresh = optax.tree.get(state, 'ScaleByLBFGSState')
  usable = jnp.any(carried.weights_memory > 0)
  state = optax.tree.set(state, ScaleByLBFGSState=jax.tree.map(
      lambda c, f: jnp.where(usable, c, f), carried, fresh))
  value_and_grad = optax.value_and_grad_from_state(objective)

  def step(carry):
    p, state, count, best, stalled = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = solver.update(grad, state, p, value=value, grad=grad, value_fn=objective)
    value = optax.tree.get(state, 'value')
    stalled = jnp.where(value < best, 0, stalled + 1)
    return optax.apply_updates(p, updates), state, count + 1, jnp.minimum(value, best), stalled

  def keep_going(carry):
    _, state, count, _, stalled = carry
    grad_norm = optax.tree.norm(optax.tree.get(state, 'grad'))
    # Also stops once the objective has not gone below its best for STALL_ITERATIONS steps
    # (single ones can tie in float32 near the optimum): there float32 resolves no further
    # progress, e.g. when the features carry no class signal and the reference, the zero
    # model's gradient, is itself rounding noise.
    return (count == 0) | ((count < max_iter) & (grad_norm > tol * zero_grad_norm)
                           & (stalled < STALL_ITERATIONS))

  params, state, count, _, _ = jax.lax.while_loop(
      keep_going, step, (params, state, 0, jnp.asarray(jnp.inf, x.dtype), 0))
  return ({'w': params['wt'].T, 'b': params['b']}, count,
          (l2, optax.tree.get(state, 'ScaleByLBFGSState')))


def _solve(features, onehot, l2, sample_weight, init, max_iter, tol, previous=None):
  """`_fit` on numpy inputs (the features may already be a device array): (params as
  numpy, iterations, `previous` for the next fit on the same features and weights)."""
  num_features, num_classes = features.shape[1], onehot.shape[1]
  history = history_size(num_features, num_classes)
  if init is None:
    init = {'w': np.zeros((num_features, num_classes), np.float32),
            'b': np.zeros((num_classes,), np.float32)}
  init = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), init)
  if previous is None:  # an empty history: the same compiled shape as a carried one
    previous = (l2, optax.tree.get(optax.lbfgs(memory_size=history).init(
        {'wt': init['w'].T, 'b': init['b']}), 'ScaleByLBFGSState'))
  if sample_weight is None:
    sample_weight = np.ones(len(features), np.float32)
  params, count, previous = _fit(jnp.asarray(features), jnp.asarray(onehot),
                                 jnp.asarray(sample_weight, jnp.float32), jnp.float32(l2),
                                 init, (jnp.float32(previous[0]), previous[1]),
                                 jnp.int32(max_iter), jnp.float32(tol), history=history)
  return jax.device_get(params), int(count), previous


def fit_logistic_regression(features, labels, l2: float, num_classes: int,
                            sample_weight=None, max_iter: int = 1000,
                            tol: float = DEFAULT_TOL, init=None):
  """Softmax-regression parameters {'w': [D, C], 'b': [C]} (numpy) on the given features
  (used as they are: standardise first), starting from `init` (same structure; default
  zeros). `tol` is relative to the zero model's gradient norm (module docstring)."""
  features = np.asarray(features, np.float32)
  onehot = np.eye(num_classes, dtype=np.float32)[np.asarray(labels)]
  params, _, _ = _solve(features, onehot, l2, sample_weight, init, max_iter, tol)
  return params


def _restandardize(params, old_mean, old_std, new_mean, new_std):
  """The same affine classifier on features standardised with (new_mean, new_std) instead
  of (old_mean, old_std): identical logits for every input."""
  scale = (new_std / old_std)[:, None]
  shift = (new_mean - old_mean) / old_std
  return {'w': (scale * params['w']).astype(np.float32),
          'b': (params['b'] + shift @ params['w']).astype(np.float32)}


def predict(params, features) -> np.ndarray:
  return np.argmax(np.asarray(features, np.float32) @ params['w'] + params['b'], axis=1)


def validation_folds(labels: np.ndarray, num_folds: int, seed: int):
  """Seeded, stratified k-fold split: a list of `num_folds` (fit, validation) index pairs
  whose validation parts are disjoint and cover every example. Each class's examples are
  shuffled and dealt to the folds in turn, so every fold gets its share of every class
  that has at least `num_folds` examples."""
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  fold_of = np.empty(len(labels), np.int64)
  offset = 0
  for c in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == c))
    # Dealing continues where the previous class stopped, so the folds' sizes differ by at
    # most one even when every class is smaller than num_folds.
    fold_of[members] = (offset + np.arange(len(members))) % num_folds
    offset += len(members)
  everything = np.arange(len(labels))
  return [(everything[fold_of != f], everything[fold_of == f]) for f in range(num_folds)]


def choose_folds(num_examples: int, val_fraction: float) -> int:
  """1 (a single held-out split) when it holds at least `MIN_HOLDOUT` examples, else
  `CV_FOLDS`-fold cross-validation (module docstring)."""
  return 1 if round(val_fraction * num_examples) >= MIN_HOLDOUT else CV_FOLDS


def linear_probe(train_features, train_labels, test_features, test_labels, *,
                 l2_grid=DEFAULT_L2_GRID, val_fraction: float = 0.1, seed: int = 0,
                 num_classes: int | None = None, max_iter: int = 1000,
                 tol: float = DEFAULT_TOL, folds: int | None = None,
                 path_patience: int | None = PATH_PATIENCE) -> dict:
  """Linear-probe accuracy by the protocol of the module docstring.

  `folds`: 1 holds out `val_fraction` of the training set to choose the L2 strength, k > 1
  cross-validates over k folds (the mean validation accuracy), None picks by
  `choose_folds`. `path_patience`: the path stops after this many strengths in a row
  without a better validation accuracy than the best so far (None: the whole grid).

  Returns a dict: 'test_accuracy', 'train_accuracy', 'l2' (the chosen strength),
  'val_accuracy' ({l2: validation accuracy} of the strengths fitted, empty when the grid
  has one value, which is then used without validation), 'folds', 'num_train',
  'num_test', and the L-BFGS iterations: 'val_iterations' ({l2: iterations, summed over
  the folds}) and 'iterations' (of the final fit); a count of `max_iter` means that fit
  stopped before reaching `tol`. Ties in validation accuracy go to the stronger
  regularisation.
  """
  train_features = np.asarray(train_features, np.float32)
  test_features = np.asarray(test_features, np.float32)
  train_labels = np.asarray(train_labels)
  test_labels = np.asarray(test_labels)
  num_classes = int(num_classes or max(train_labels.max(), test_labels.max()) + 1)
  l2_grid = sorted(float(v) for v in l2_grid)
  onehot = np.eye(num_classes, dtype=np.float32)[train_labels]
  fit = lambda x, weights, l2, init, previous=None: _solve(x, onehot, l2, weights, init,
                                                           max_iter, tol, previous)
  if folds is None:
    folds = choose_folds(len(train_labels), val_fraction)
  mean, std = standardization(train_features)

  val_accuracy, val_iterations, init = {}, {}, None
  if len(l2_grid) > 1:
    splits = (validation_folds(train_labels, folds, seed) if folds > 1 else
              [validation_split(train_labels, val_fraction, seed)])
    paths = []
    for fit_idx, val_idx in splits:
      split_mean, split_std = standardization(train_features[fit_idx])
      in_fit = np.zeros(len(train_labels), np.float32)
      in_fit[fit_idx] = 1.0
      x_fold = standardize(train_features, split_mean, split_std)
      # On the device once for all the path's fits (a copy per fit costs fresh pages).
      paths.append({'x': x_fold, 'x_device': jnp.asarray(x_fold),
                    'in_fit': in_fit, 'val_idx': val_idx, 'mean': split_mean,
                    'std': split_std, 'params': None, 'previous': None, 'solutions': {}})
    best, since_best = -1.0, 0
    # Strongest first: each fit starts from the previous, more regularised solution, which
    # is close to its own, with its curvature pairs (module docstring); the first from zero.
    for l2 in reversed(l2_grid):
      correct, iterations = 0, 0
      for path in paths:
        params, count, path['previous'] = fit(path['x_device'], path['in_fit'], l2,
                                              path['params'], path['previous'])
        path['params'] = path['solutions'][l2] = params
        val_idx = path['val_idx']
        correct += int(np.sum(predict(params, path['x'][val_idx]) == train_labels[val_idx]))
        iterations += count
      val_accuracy[l2] = correct / sum(len(path['val_idx']) for path in paths)
      val_iterations[l2] = iterations
      # Weaker strengths past the best cost the most iterations and, once validation
      # accuracy has turned down, are not chosen (module docstring).
      since_best = 0 if val_accuracy[l2] > best else since_best + 1
      best = max(best, val_accuracy[l2])
      if path_patience is not None and since_best >= path_patience:
        break
    # max() returns the first maximum; iterating from strong to weak prefers the former.
    chosen = max(sorted(val_accuracy, reverse=True), key=val_accuracy.get)
    # The chosen strength's solutions on (k-1)/k or 90 % of the data are close to the one
    # on all of it: their mean, re-expressed for the whole set's standardisation.
    starts = [_restandardize(path['solutions'][chosen], path['mean'], path['std'], mean, std)
              for path in paths]
    init = jax.tree.map(lambda *v: np.mean(v, axis=0).astype(np.float32), *starts)
  else:
    chosen = l2_grid[0]

  x = standardize(train_features, mean, std)
  params, iterations, _ = fit(x, None, chosen, init)
  x_test = standardize(test_features, mean, std)
  return {
      'test_accuracy': float(np.mean(predict(params, x_test) == test_labels)),
      'train_accuracy': float(np.mean(predict(params, x) == train_labels)),
      'l2': chosen,
      'val_accuracy': val_accuracy,
      'folds': folds if val_accuracy else 0,
      'num_train': len(train_labels),
      'num_test': len(test_labels),
      'val_iterations': val_iterations,
      'iterations': iterations,
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
