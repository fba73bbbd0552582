"""Learning-rate scaling and schedule, the weight-decay mask, and the optimizers' first
updates checked against their closed forms."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util

from ssl_jax import optim
from ssl_jax.models import ConvNet
from ssl_jax.models.heads import ProjectionMLP


def _opt_cfg(**overrides):
  cfg = ml_collections.ConfigDict(dict(
      name='lars', base_lr=0.3, lr_scaling='linear', weight_decay=1e-2,
      trust_coefficient=0.001, momentum=0.9, nesterov=False, b1=0.9, b2=0.999))
  cfg.update(overrides)
  return cfg


# ----------------------------------------------------------------------- learning rate

@pytest.mark.parametrize('scaling, batch, expected', [
    ('linear', 256, 0.3), ('linear', 4096, 0.3 * 16), ('linear', 64, 0.3 / 4),
    ('sqrt', 16, 0.3 * 4), ('sqrt', 4096, 0.3 * 64), ('sqrt', 2, 0.3 * math.sqrt(2)),
    ('none', 4096, 0.3), ('none', 1, 0.3),
])
def test_scaled_learning_rate(scaling, batch, expected):
  lr = optim.scaled_learning_rate(_opt_cfg(lr_scaling=scaling), batch)
  assert lr == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize('scaling', ['Linear', 'square_root', '', None])
def test_scaled_learning_rate_rejects_unknown_scaling(scaling):
  with pytest.raises(ValueError, match='lr_scaling'):
    optim.scaled_learning_rate(_opt_cfg(lr_scaling=scaling), 256)


def test_learning_rate_schedule_warmup_then_cosine():
  cfg = _opt_cfg(base_lr=0.2, lr_scaling='linear')
  peak = 0.2 * 512 / 256
  total, warmup = 110, 10
  schedule = optim.learning_rate_schedule(cfg, 512, total_steps=total, warmup_steps=warmup)
  lr = lambda step: float(schedule(step))  # noqa: E731
  assert lr(0) == 0.0
  # Linear warm-up.
  assert lr(5) == pytest.approx(peak / 2, rel=1e-6)
  assert lr(1) == pytest.approx(peak / 10, rel=1e-6)
  assert lr(9) == pytest.approx(peak * 9 / 10, rel=1e-6)
  assert lr(warmup) == pytest.approx(peak, rel=1e-6)
  # Cosine over the remaining steps: half the peak at the midpoint, zero at the end.
  assert lr(warmup + 50) == pytest.approx(peak / 2, rel=1e-6)
  assert lr(warmup + 25) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-5)
  assert lr(total) == pytest.approx(0.0, abs=1e-7)
  values = np.array([lr(s) for s in range(total + 1)])
  assert np.all(np.diff(values[:warmup + 1]) > 0)
  assert np.all(np.diff(values[warmup:]) <= 1e-7)
  assert values.max() == pytest.approx(peak, rel=1e-6)


def test_learning_rate_schedule_jits_with_traced_step():
  schedule = optim.learning_rate_schedule(_opt_cfg(base_lr=1.0, lr_scaling='none'), 7,
                                          total_steps=20, warmup_steps=4)
  values = jax.jit(jax.vmap(schedule))(jnp.arange(21))
  np.testing.assert_allclose(values[:5], [0, 0.25, 0.5, 0.75, 1.0], rtol=1e-6)
  np.testing.assert_allclose(values[12], 0.5, rtol=1e-6)
  np.testing.assert_allclose(values[20], 0.0, atol=1e-7)


# ----------------------------------------------------------------------- weight-decay mask

def test_decay_mask_on_real_model_params():
  x = jnp.zeros((2, 8, 8, 1))
  key = jax.random.key(0, impl='unsafe_rbg')
  params = {
      'encoder': jax.eval_shape(ConvNet(widths=(4, 8), convs_per_stage=1).init, key,
                                x)['params'],
      'head': jax.eval_shape(ProjectionMLP(hidden_dim=16, output_dim=8, num_layers=2).init,
                             key, jnp.zeros((2, 8)))['params'],
  }
  mask = traverse_util.flatten_dict(optim.decay_mask(params))
  flat = traverse_util.flatten_dict(params)
  assert mask.keys() == flat.keys()
  kinds = {}
  for path, decayed in mask.items():
    leaf = path[-1]
    kinds.setdefault(leaf, set()).add(bool(decayed))
    assert bool(decayed) == (leaf == 'kernel'), path
  # Conv kernels (4-D), dense kernels (2-D), a dense bias, BN scales and biases were all seen.
  assert kinds == {'kernel': {True}, 'bias': {False}, 'scale': {False}}
  assert any(flat[p].ndim == 4 for p in mask if p[-1] == 'kernel')
  assert any(flat[p].ndim == 2 for p in mask if p[-1] == 'kernel')
  assert ('head', 'Dense_1', 'bias') in mask and ('head', 'BatchNorm_0', 'scale') in mask


# ------------------------------------------------------------------------------ optimizers

def _toy_params():
  rng = np.random.default_rng(0)
  return {
      'Conv_0': {'kernel': jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)},
      'Dense_0': {'kernel': jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
                  'bias': jnp.asarray(rng.normal(size=(3,)), jnp.float32)},
      'BatchNorm_0': {'scale': jnp.asarray(rng.uniform(0.5, 1.5, size=(4,)), jnp.float32),
                      'bias': jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
  }


def _grads(seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 0.1, jnp.float32),
                      _toy_params())


def _is_matrix(path):
  return path[-1] == 'kernel'


def _schedule(step):
  """A learning rate that changes every step, so that each step's value is checked."""
  return 0.1 * (step + 1)


def _two_steps(cfg):
  tx = optim.make_optimizer(cfg, _schedule)
  params0 = _toy_params()
  g1, g2 = _grads(1), _grads(2)
  state = tx.init(params0)
  u1, state = tx.update(g1, state, params0)
  params1 = optax.apply_updates(params0, u1)
  u2, state = tx.update(g2, state, params1)
  as_flat = lambda t: {k: np.asarray(v, np.float64)  # noqa: E731
                       for k, v in traverse_util.flatten_dict(t).items()}
  return [as_flat(t) for t in (params0, params1, g1, g2, u1, u2)]


def _norm(x):
  return float(np.sqrt(np.sum(x**2)))


def test_lars_closed_form():
  wd, tc, mu = 1e-2, 0.02, 0.8
  cfg = _opt_cfg(name='lars', weight_decay=wd, trust_coefficient=tc, momentum=mu)
  p0, p1, g1, g2, u1, u2 = _two_steps(cfg)
  lr0, lr1 = _schedule(0), _schedule(1)
  for path in p0:
    if _is_matrix(path):
      def step(w, g):
        d = g + wd * w
        return tc * _norm(w) / _norm(d) * d
      first = -lr0 * step(p0[path], g1[path])
      second = -lr1 * step(p1[path], g2[path]) + mu * first
    else:
      # 1-D parameters: no weight decay and no trust ratio, plain momentum SGD.
      first = -lr0 * g1[path]
      second = -lr1 * g2[path] + mu * first
    np.testing.assert_allclose(u1[path], first, rtol=1e-5, atol=1e-9, err_msg=str(path))
    np.testing.assert_allclose(u2[path], second, rtol=1e-5, atol=1e-9, err_msg=str(path))
  # Sensitivity: the trust ratio shrinks kernel steps far below the plain SGD step.
  kernel = ('Dense_0', 'kernel')
  assert _norm(u1[kernel]) < 0.5 * lr0 * _norm(g1[kernel])


def test_lars_with_zero_gradient_and_no_decay_does_not_move():
  cfg = _opt_cfg(name='lars', weight_decay=0.0)
  tx = optim.make_optimizer(cfg, _schedule)
  params = _toy_params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  for leaf in jax.tree.leaves(updates):
    assert np.all(np.isfinite(leaf)) and np.all(np.asarray(leaf) == 0)


@pytest.mark.parametrize('nesterov', [False, True])
def test_sgd_closed_form(nesterov):
  wd, mu = 1e-2, 0.8
  cfg = _opt_cfg(name='sgd', weight_decay=wd, momentum=mu, nesterov=nesterov)
  p0, p1, g1, g2, u1, u2 = _two_steps(cfg)
  lr0, lr1 = _schedule(0), _schedule(1)
  for path in p0:
    # Coupled weight decay: wd * w is added to the gradient, for kernels only.
    d1 = g1[path] + (wd * p0[path] if _is_matrix(path) else 0)
    d2 = g2[path] + (wd * p1[path] if _is_matrix(path) else 0)
    m1 = d1
    m2 = d2 + mu * m1
    if nesterov:
      first, second = -lr0 * (d1 + mu * m1), -lr1 * (d2 + mu * m2)
    else:
      first, second = -lr0 * m1, -lr1 * m2
    np.testing.assert_allclose(u1[path], first, rtol=1e-5, atol=1e-9, err_msg=str(path))
    np.testing.assert_allclose(u2[path], second, rtol=1e-5, atol=1e-9, err_msg=str(path))


def test_adamw_closed_form():
  wd, b1, b2, eps = 0.1, 0.8, 0.95, 1e-8
  cfg = _opt_cfg(name='adamw', weight_decay=wd, b1=b1, b2=b2)
  p0, p1, g1, g2, u1, u2 = _two_steps(cfg)
  lr0, lr1 = _schedule(0), _schedule(1)
  for path in p0:
    decay = wd if _is_matrix(path) else 0.0
    m1, v1 = (1 - b1) * g1[path], (1 - b2) * g1[path]**2
    m2, v2 = b1 * m1 + (1 - b1) * g2[path], b2 * v1 + (1 - b2) * g2[path]**2
    adam1 = (m1 / (1 - b1)) / (np.sqrt(v1 / (1 - b2)) + eps)
    adam2 = (m2 / (1 - b1**2)) / (np.sqrt(v2 / (1 - b2**2)) + eps)
    # Decoupled weight decay, for kernels only.
    first = -lr0 * (adam1 + decay * p0[path])
    second = -lr1 * (adam2 + decay * p1[path])
    np.testing.assert_allclose(u1[path], first, rtol=1e-5, atol=1e-8, err_msg=str(path))
    np.testing.assert_allclose(u2[path], second, rtol=1e-5, atol=1e-8, err_msg=str(path))


def test_adamw_zero_gradient_shrinks_kernels_only():
  wd, lr = 0.1, 0.5
  cfg = _opt_cfg(name='adamw', weight_decay=wd)
  tx = optim.make_optimizer(cfg, optax.constant_schedule(lr))
  params = _toy_params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  new_params = optax.apply_updates(params, updates)
  flat_old = traverse_util.flatten_dict(params)
  flat_new = traverse_util.flatten_dict(new_params)
  for path, old in flat_old.items():
    if _is_matrix(path):
      np.testing.assert_allclose(flat_new[path], old * (1 - lr * wd), rtol=1e-6)
    else:
      np.testing.assert_array_equal(flat_new[path], old, err_msg=str(path))


@pytest.mark.parametrize('name', ['adam', 'LARS', 'momentum', ''])
def test_unknown_optimizer_raises_naming_known_ones(name):
  with pytest.raises(ValueError) as info:
    optim.make_optimizer(_opt_cfg(name=name), _schedule)
  message = str(info.value)
  for known in ('lars', 'sgd', 'adamw'):
    assert repr(known) in message
  assert repr(name) in message
  assert set(optim.OPTIMIZERS) == {'lars', 'sgd', 'adamw'}


# ------------------------------------------------------------------- frozen parameters

def _run(tx, grads_seq, params=None):
  """Applies `tx` to a sequence of gradients; the params and optimizer states after each
  step (index 0: the initial ones)."""
  params = _toy_params() if params is None else params
  state = tx.init(params)
  update = jax.jit(tx.update)
  params_seq, states = [params], [state]
  for g in grads_seq:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    params_seq.append(params)
    states.append(state)
  return params_seq, states


def _flat(tree):
  return {k: np.asarray(v, np.float64) for k, v in traverse_util.flatten_dict(tree).items()}


def test_frozen_subtree_skips_then_starts_as_fresh_adamw_at_the_global_lr():
  """As PyTorch AdamW for a parameter whose .grad is None for the first N steps (DINO's
  frozen last layer): no update and no weight decay, an untouched state, then Adam from
  count 0 (bias correction restarting) at the global lr(N), lr(N + 1), ..."""
  wd, b1, b2, eps, n, steps = 0.1, 0.8, 0.95, 1e-8, 3, 6
  cfg = _opt_cfg(name='adamw', weight_decay=wd, b1=b1, b2=b2)
  tx = optim.make_optimizer(cfg, _schedule, {('Dense_0',): n})
  grads_seq = [_grads(10 + k) for k in range(steps)]
  params_seq, states = _run(tx, grads_seq)
  plain_params, _ = _run(optim.make_optimizer(cfg, _schedule), grads_seq)
  branch = lambda s: s.inner_states[f'frozen_{n}'].inner_state  # noqa: E731
  for k in range(n + 1):
    # Frozen for steps 0 .. n-1: bit-identical params and inner optimizer state.
    for path in (('Dense_0', 'kernel'), ('Dense_0', 'bias')):
      np.testing.assert_array_equal(_flat(params_seq[k])[path], _flat(params_seq[0])[path])
    jax.tree.map(np.testing.assert_array_equal, branch(states[k]).inner_state,
                 branch(states[0]).inner_state)
    assert int(branch(states[k]).count) == k
  # The other leaves follow the plain optimizer exactly, frozen phase or not.
  for k in range(steps + 1):
    flat, plain = _flat(params_seq[k]), _flat(plain_params[k])
    for path in flat:
      if path[0] != 'Dense_0':
        np.testing.assert_array_equal(flat[path], plain[path], err_msg=f'{path} step {k}')
  # From step n: a fresh AdamW in numpy, bias correction from t = 1, lr from the global
  # schedule at the global step, decoupled weight decay for the kernel only.
  for path in (('Dense_0', 'kernel'), ('Dense_0', 'bias')):
    decay = wd if path[-1] == 'kernel' else 0.0
    p = _flat(params_seq[0])[path]
    m = v = np.zeros_like(p)
    for k in range(n, steps):
      t = k - n + 1
      g = _flat(grads_seq[k])[path]
      m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g**2
      adam = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
      p = p - _schedule(k) * (adam + decay * p)
      np.testing.assert_allclose(_flat(params_seq[k + 1])[path], p, rtol=1e-5, atol=1e-7,
                                 err_msg=f'{path} step {k}')
  # Not vacuous: a plain AdamW fed zero gradients while frozen (the stop_gradient way)
  # decays the kernel meanwhile, and its first unfrozen step, bias correction advanced,
  # differs.
  zeroed = [dict(g, Dense_0=jax.tree.map(jnp.zeros_like, g['Dense_0'])) if k < n else g
            for k, g in enumerate(grads_seq)]
  stale, _ = _run(optim.make_optimizer(cfg, _schedule), zeroed)
  kernel = ('Dense_0', 'kernel')
  assert np.abs(_flat(stale[n])[kernel] - _flat(stale[0])[kernel]).max() > 1e-3
  fresh_step = _flat(params_seq[n + 1])[kernel] - _flat(params_seq[n])[kernel]
  stale_step = _flat(stale[n + 1])[kernel] - _flat(stale[n])[kernel]
  assert np.abs(fresh_step - stale_step).max() > 0.1 * np.abs(fresh_step).max()


@pytest.mark.parametrize('name', ['lars', 'sgd', 'adamw'])
def test_frozen_subtree_leaves_other_leaves_as_plain_optimizer(name):
  cfg = _opt_cfg(name=name)
  grads_seq = [_grads(20 + k) for k in range(4)]
  params_seq, _ = _run(optim.make_optimizer(cfg, _schedule, {('Conv_0', 'kernel'): 2}),
                       grads_seq)
  plain_seq, _ = _run(optim.make_optimizer(cfg, _schedule), grads_seq)
  for k in range(5):
    flat, plain = _flat(params_seq[k]), _flat(plain_seq[k])
    for path in flat:
      if path == ('Conv_0', 'kernel'):
        if k <= 2:
          np.testing.assert_array_equal(flat[path], _flat(params_seq[0])[path])
        else:
          assert np.abs(flat[path] - _flat(params_seq[2])[path]).max() > 1e-6
      else:
        np.testing.assert_array_equal(flat[path], plain[path], err_msg=f'{path} step {k}')


def test_a_constant_learning_rate_is_the_constant_schedule_frozen_subtree_included():
  """Fine-tuning passes a number, not a schedule: catches the frozen branch calling it."""
  cfg = _opt_cfg(name='adamw')
  grads_seq = [_grads(40 + k) for k in range(4)]
  frozen = {('Conv_0', 'kernel'): 2}
  constant, _ = _run(optim.make_optimizer(cfg, 0.05, frozen), grads_seq)
  scheduled, _ = _run(optim.make_optimizer(cfg, lambda step: 0.05, frozen), grads_seq)
  for k in range(5):
    for path, value in _flat(scheduled[k]).items():
      np.testing.assert_array_equal(_flat(constant[k])[path], value, err_msg=f'{path} {k}')


def test_frozen_steps_zero_or_absent_is_the_plain_optimizer():
  cfg = _opt_cfg(name='adamw')
  params = _toy_params()
  plain = jax.tree.structure(optim.make_optimizer(cfg, _schedule).init(params))
  for frozen in (None, {}, {('Dense_0',): 0}):
    tx = optim.make_optimizer(cfg, _schedule, frozen)
    assert jax.tree.structure(tx.init(params)) == plain


def test_frozen_steps_naming_missing_parameters_raises():
  tx = optim.make_optimizer(_opt_cfg(name='adamw'), _schedule, {('head', 'last_layer'): 2})
  with pytest.raises(ValueError, match='head.*last_layer'):
    tx.init(_toy_params())


@pytest.mark.parametrize('name', ['lars', 'sgd', 'adamw'])
def test_subtree_frozen_forever_keeps_its_init_and_no_state(name):
  """`optim.FOREVER` (MoCo v3's frozen patch projection): catches weight decay still
  shrinking the subtree (stop_gradient alone gives zero gradients, not zero updates), any
  optimizer state kept for it, or the other leaves not following the plain optimizer. Large
  weight decay and non-zero gradients for the frozen kernel: only the optimizer can keep it."""
  cfg = _opt_cfg(name=name, weight_decay=0.5)
  grads_seq = [_grads(30 + k) for k in range(4)]
  frozen = {('Conv_0',): optim.FOREVER, ('Dense_0', 'bias'): 2}  # with a temporary freeze
  params_seq, states = _run(optim.make_optimizer(cfg, _schedule, frozen), grads_seq)
  plain_seq, _ = _run(optim.make_optimizer(cfg, _schedule), grads_seq)
  kernel = _flat(params_seq[0])[('Conv_0', 'kernel')]
  assert not any(np.shape(leaf) == kernel.shape for leaf in jax.tree.leaves(states[-1]))
  for k in range(1, 5):
    flat, plain = _flat(params_seq[k]), _flat(plain_seq[k])
    np.testing.assert_array_equal(flat[('Conv_0', 'kernel')], kernel)
    for path in (('Dense_0', 'kernel'), ('BatchNorm_0', 'scale'), ('BatchNorm_0', 'bias')):
      np.testing.assert_array_equal(flat[path], plain[path], err_msg=f'{path} step {k}')
  # Not vacuous: the plain optimizer moves the kernel (weight decay alone would).
  assert np.abs(_flat(plain_seq[4])[('Conv_0', 'kernel')] - kernel).max() > 1e-3


# ------------------------------------------------------------------ weight-decay schedule

def _dino_cosine_scheduler(base_value, final_value, epochs, niter_per_ep):
  """DINO's utils.cosine_scheduler without warm-up (numpy), the reference for the rise."""
  iters = np.arange(epochs * niter_per_ep)
  return final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))


@pytest.mark.parametrize('start', [0.04, 0.0])
def test_weight_decay_schedule_is_dinos_cosine_rise(start):
  cfg = _opt_cfg(name='adamw', weight_decay=start, weight_decay_end=0.4)
  schedule = optim.weight_decay_schedule(cfg, total_steps=12)
  expected = _dino_cosine_scheduler(start, 0.4, epochs=3, niter_per_ep=4)
  np.testing.assert_allclose([float(schedule(k)) for k in range(12)], expected, rtol=1e-6,
                             atol=1e-8)
  # Unset, or equal to the start: the constant rate, as before the option existed.
  assert optim.weight_decay_schedule(_opt_cfg(weight_decay=0.05), 12) == 0.05
  assert optim.weight_decay_schedule(_opt_cfg(weight_decay=0.05, weight_decay_end=0.05),
                                     12) == 0.05


@pytest.mark.parametrize('frozen', [0, 2])
def test_adamw_decays_by_the_schedule_at_the_global_step(frozen):
  """Zero gradients: AdamW's update is -lr * wd(step) * kernel; a subtree frozen for 2 steps
  starts at wd(2), not wd(0) (its own count restarts at 0)."""
  lr, steps = 0.5, 5
  cfg = _opt_cfg(name='adamw', weight_decay=0.04, weight_decay_end=0.4)
  decay = optim.weight_decay_schedule(cfg, total_steps=steps)
  tx = optim.make_optimizer(cfg, optax.constant_schedule(lr),
                            {('Dense_0',): frozen} if frozen else None, decay)
  params = _toy_params()
  params_seq, _ = _run(tx, [jax.tree.map(jnp.zeros_like, params)] * steps, params)
  wd = _dino_cosine_scheduler(0.04, 0.4, epochs=1, niter_per_ep=steps)
  for path, p0 in _flat(params).items():
    if not _is_matrix(path):
      continue
    first = frozen if path[0] == 'Dense_0' else 0
    expected = p0 * np.prod([1 - lr * wd[k] for k in range(first, steps)])
    np.testing.assert_allclose(_flat(params_seq[-1])[path], expected, rtol=1e-5,
                               err_msg=str(path))


# ------------------------------------------------------------------ gradient clipping

def _clipped_sgd_step(grads, **clip):
  """One plain SGD step at lr 1 without weight decay: the update is -(clipped gradient)."""
  cfg = _opt_cfg(name='sgd', momentum=0.0, weight_decay=0.0, **clip)
  tx = optim.make_optimizer(cfg, optax.constant_schedule(1.0))
  params = _toy_params()
  updates, _ = tx.update(grads, tx.init(params), params)
  return {k: -v for k, v in _flat(updates).items()}


def test_global_norm_clipping_is_torchs_clip_grad_norm():
  grads = jax.tree.map(lambda g: g * 30.0, _grads(3))
  flat = _flat(grads)
  total = np.sqrt(sum(np.sum(g**2) for g in flat.values()))
  assert total > 3.0  # not vacuous: the clip applies
  coef = min(1.0, 3.0 / (total + 1e-6))  # torch.nn.utils.clip_grad_norm_
  clipped = _clipped_sgd_step(grads, clip_grad_norm=3.0)
  for path, g in flat.items():
    np.testing.assert_allclose(clipped[path], g * coef, rtol=1e-5, err_msg=str(path))
  # Below the threshold the gradients pass unchanged.
  small = _clipped_sgd_step(grads, clip_grad_norm=10 * total)
  for path, g in flat.items():
    np.testing.assert_allclose(small[path], g, rtol=1e-6, err_msg=str(path))


def test_per_parameter_clipping_is_dinos_clip_gradients():
  grads = jax.tree.map(lambda g: g * 30.0, _grads(3))
  grads['BatchNorm_0']['scale'] = grads['BatchNorm_0']['scale'] * 1e-3  # below the clip
  clipped = _clipped_sgd_step(grads, clip_grad_norm=3.0, clip_per_parameter=True)
  unclipped = 0
  for path, g in _flat(grads).items():
    norm = np.linalg.norm(g)
    coef = 3.0 / (norm + 1e-6)  # DINO's utils.clip_gradients
    expected = g * coef if coef < 1 else g
    unclipped += coef >= 1
    np.testing.assert_allclose(clipped[path], expected, rtol=1e-5, err_msg=str(path))
  assert 0 < unclipped < len(_flat(grads))  # not vacuous: some clipped, some not


def test_no_clipping_keeps_the_plain_optimizer_state():
  """Unset, the optimizer state keeps its structure: checkpoints from before the option
  restore."""
  params = _toy_params()
  plain = optim.make_optimizer(_opt_cfg(name='adamw'), _schedule).init(params)
  unset = optim.make_optimizer(_opt_cfg(name='adamw', clip_grad_norm=None), _schedule)
  assert jax.tree.structure(unset.init(params)) == jax.tree.structure(plain)
