"""BYOL: the normalised regression loss by hand, the loss's wiring (which view regresses which,
per-view BatchNorm, stop-gradient on the target), the target network's EMA under the real
trainer against the paper's tau schedule, the asymmetric augmentation, config errors, exact
resume, and a short Fashion-MNIST run that learns without collapsing."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import method_harness as mh
from ssl_jax import config_lib, parallel, train
from ssl_jax.data import augment
from ssl_jax.losses import regression
from ssl_jax.methods import RunLength, build_method


def _config(batch_size=32):
  c = mh.shrink(mh.load_config('byol'), batch_size=batch_size)
  # Heads as small as the shrunk encoder: the tests check wiring, not capacity.
  c.method.projector_hidden_dim = 32
  c.method.projector_output_dim = 16
  c.method.predictor_hidden_dim = 32
  return c


def _light_augment(config):
  """Random crops and flips only: the colour ops (skipped at trace time with probability 0)
  would only add compile time to tests about the target network and checkpoints."""
  a = config.augment
  a.jitter_prob = a.grayscale_prob = a.blur_prob = a.solarize_prob = 0.0
  a.per_view.blur_prob = a.per_view.solarize_prob = (0.0, 0.0)
  return config


def _tau(k, total, base):
  """Grill et al. 2020, Sec. 3.2: tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2."""
  return 1.0 - (1.0 - base) * (math.cos(math.pi * k / total) + 1.0) / 2.0


# ------------------------------------------------------------------------------------------
# The loss


def test_normalized_regression_by_hand():
  # Row 0: p = (3, 4), z = (4, 3): cos = 24/25 = 0.96. Row 1: p = (1, 0), z = (0, 2): cos = 0.
  # Mean cos 0.48, loss = 2 - 2 * 0.48 = 1.04 (= mean of ||p/|p| - z/|z| ||^2 = 0.08 and 2).
  p = jnp.array([[3.0, 4.0], [1.0, 0.0]])
  z = jnp.array([[4.0, 3.0], [0.0, 2.0]])
  loss, metrics = regression.normalized_regression(p, z)
  np.testing.assert_allclose(loss, 1.04, rtol=1e-6)
  np.testing.assert_allclose(metrics['cosine'], 0.48, rtol=1e-6)
  grad_p, grad_z = jax.grad(lambda p, z: regression.normalized_regression(p, z)[0],
                            argnums=(0, 1))(p, z)
  # d cos / dp = (z/|z| - cos p/|p|) / |p|; row 0: ((0.8, 0.6) - 0.96 (0.6, 0.8)) / 5
  # = (0.0448, -0.0336); the loss has -2 / (2 rows) in front. Row 1: ((0, 1) - 0) / 1.
  np.testing.assert_allclose(grad_p, [[-0.0448, 0.0336], [0.0, -1.0]], rtol=1e-5, atol=1e-7)
  # The target side is a constant.
  np.testing.assert_array_equal(grad_z, np.zeros((2, 2)))


def test_normalized_regression_is_scale_invariant_and_zero_when_aligned():
  z = jax.random.normal(jax.random.PRNGKey(0), (6, 5))
  loss, _ = regression.normalized_regression(3.0 * z, 0.5 * z)
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)
  loss, _ = regression.normalized_regression(z, -z)
  np.testing.assert_allclose(loss, 4.0, rtol=1e-6)


def _reference_loss(method, params, batch_stats, target_params, views):
  """Eq. 2 symmetrised, written out: each view's online prediction against the target's
  projection of the OTHER view, every forward pass on one view (its own BN statistics)."""
  online, target = method.network(), method.target_network()

  # Training-mode BatchNorm normalises with the batch's statistics: the running ones passed
  # in are irrelevant, so zeros will do (and the target needs none of its own).
  stats = jax.tree.map(jnp.zeros_like, batch_stats)

  def run(net, p, s, view):
    return net.apply({'params': p, 'batch_stats': s}, view, train=True,
                     mutable=['batch_stats'])[0][1]

  target_tree = {k: target_params[k] for k in ('encoder', 'projector')}
  target_stats = {k: stats[k] for k in ('encoder', 'projector') if k in stats}
  p1, p2 = (run(online, params, stats, v) for v in views)
  z1, z2 = (jax.lax.stop_gradient(run(target, target_tree, target_stats, v)) for v in views)

  def two_minus_two_cos(a, b):
    a = a / jnp.linalg.norm(a, axis=1, keepdims=True)
    b = b / jnp.linalg.norm(b, axis=1, keepdims=True)
    return jnp.mean(jnp.sum((a - b) ** 2, axis=1))

  return two_minus_two_cos(p1, z2) + two_minus_two_cos(p2, z1)


def test_loss_and_gradients_match_written_out_reference_and_skip_the_target():
  config = _config()
  method, params, batch_stats, _, state = mh.init_method(config)
  # A target that differs from the online network (as after training), so that using the
  # online network for the targets, or pairing a view with itself, would be caught.
  rng = np.random.default_rng(1)
  target = jax.tree.map(lambda x: x + 0.5 * rng.normal(size=x.shape).astype(np.float32), params)
  views = mh.make_views(config, method, 16)

  @jax.jit
  def loss_and_grads(p, t):
    def loss_fn(p, t):
      return method.loss(p, batch_stats, t, state, views, None, jnp.int32(0), None)
    return jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(p, t)

  (loss, (metrics, _, _)), (grads, target_grads) = loss_and_grads(params, target)
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(
      lambda p: _reference_loss(method, p, batch_stats, target, views)))(params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  mh.assert_trees_close(grads, ref_grads, rtol=1e-4, atol=1e-6, what='grads')
  np.testing.assert_allclose(metrics['cosine'], 1.0 - loss / 4.0, rtol=1e-5)
  # The online path to the loss is encoder -> projector -> predictor: all three learn.
  for part in ('encoder', 'projector', 'predictor'):
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads[part])) > 0, part
  # Stop-gradient: nothing flows into the target network...
  for g in jax.tree.leaves(target_grads):
    np.testing.assert_array_equal(g, 0.0)
  # ...although the loss does depend on it.
  (bumped_loss, _), _ = loss_and_grads(params, jax.tree.map(lambda t: t * 1.1, target))
  assert abs(float(bumped_loss) - float(loss)) > 1e-6


def test_eight_devices_agree_with_one():
  # BYOL's loss does not read the step (tau lives in the trainer), so one step suffices here;
  # the trainer-level test below covers the schedule on 8 devices.
  mh.check_devices_agree(_config(), steps=(0,))


# ------------------------------------------------------------------------------------------
# The target network under the real trainer


def test_target_momentum_schedule_values():
  config = _config()
  config.method.target_momentum = 0.996
  method = build_method(config, RunLength(total_steps=1000, steps_per_epoch=10))
  ks = np.array([0, 1, 250, 500, 999, 1000])
  got = np.asarray(jax.vmap(method.target_momentum)(jnp.asarray(ks)))
  np.testing.assert_allclose(got, [_tau(k, 1000, 0.996) for k in ks], rtol=0, atol=1e-7)
  assert got[0] == pytest.approx(0.996) and got[-1] == pytest.approx(1.0)


def _train_steps(config, num_devices, total_steps, images):
  """Real trainer steps (no warm-up); returns the state before and after each step (on the
  host) and the metrics of each step."""
  config.total_steps, config.optimizer.warmup_epochs = total_steps, 0.0
  built, state, step = mh.build_experiment(config, num_devices)
  states, history = [jax.device_get(state)], []
  for batch in images:
    state, metrics = step(state, parallel.global_batch_from_host(batch, built.mesh))
    states.append(jax.device_get(state))  # copied before the next step donates it
    history.append(jax.device_get(metrics))
  return states, history


def test_target_is_ema_of_online_params_with_cosine_tau():
  config = _light_augment(_config(batch_size=16))
  # tau_base 0.9 and K = 4 steps: tau goes 0.9 -> 1 within the run, so each step's (1 - tau)
  # is different and large enough that a wrong schedule or a wrong k shows.
  base, total = 0.9, 4
  config.method.target_momentum = base
  config.optimizer.base_lr = 2.0  # big steps, so online and target move apart visibly
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (16, 16, 16, 1), np.uint8) for _ in range(total)]
  states, history = _train_steps(config, 8, total, images)

  def tracked(params):  # the target averages the encoder and projector, not the predictor
    return {k: params[k] for k in ('encoder', 'projector')}

  assert set(states[0].target_params) == {'encoder', 'projector'}
  # At init the target is a copy of the online network.
  jax.tree.map(np.testing.assert_array_equal, states[0].target_params,
               tracked(states[0].params))
  for k in range(total):
    tau = _tau(k, total, base)
    np.testing.assert_allclose(history[k]['target_momentum'], tau, rtol=1e-6)
    # target_{k+1} = tau_k target_k + (1 - tau_k) online_{k+1}, online after step k's update.
    expected = jax.tree.map(lambda t, o, tau=tau: tau * np.asarray(t, np.float64)
                            + (1 - tau) * np.asarray(o, np.float64),
                            states[k].target_params, tracked(states[k + 1].params))
    mh.assert_trees_close(states[k + 1].target_params, expected, rtol=1e-6, atol=1e-7,
                          what=f'target after step {k}')
  # Not vacuous: the target lags the online network, and both moved.
  gap = max(float(np.abs(t - o).max()) for t, o in zip(
      jax.tree.leaves(states[-1].target_params), jax.tree.leaves(tracked(states[-1].params))))
  moved = max(float(np.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(states[-1].target_params), jax.tree.leaves(states[0].target_params)))
  assert gap > 1e-3 and moved > 1e-3, (gap, moved)


# ------------------------------------------------------------------------------------------
# Augmentation, config


def test_asymmetric_augmentation_per_view():
  config = mh.load_config('byol')
  views = augment.view_configs(config.augment, 2)
  # Table 6 of the paper: blur always on view 1 and 10 % of view 2; solarisation 20 % of view 2.
  assert (views[0].blur_prob, views[1].blur_prob) == (1.0, 0.1)
  assert (views[0].solarize_prob, views[1].solarize_prob) == (0.0, 0.2)
  assert views[0].jitter_prob == views[1].jitter_prob == 0.8

  # The per-view values reach the views the trainer builds: with every other transform off
  # and the crop the whole image, view 1 is view 0, solarised in about 20 % of the examples.
  a = config.augment
  a.crop_size, a.crop_scale, a.crop_ratio = 16, (1.0, 1.0), (1.0, 1.0)
  a.flip_prob = a.jitter_prob = a.grayscale_prob = a.blur_prob = 0.0
  a.per_view.blur_prob = (0.0, 0.0)
  images = np.random.default_rng(0).integers(0, 256, (400, 16, 16, 1), np.uint8)
  v0, v1 = (np.asarray(v) for v in augment.augment_views(
      jax.random.PRNGKey(0), jnp.asarray(images), augment.view_configs(a, 2)))
  np.testing.assert_allclose(v0, images / 255.0, atol=1e-6)  # view 0 never solarised
  solarised = np.where(v0 >= 0.5, 1.0 - v0, v0)
  is_plain = np.all(np.abs(v1 - v0) < 1e-6, axis=(1, 2, 3))
  is_solarised = np.all(np.abs(v1 - solarised) < 1e-6, axis=(1, 2, 3))
  assert np.all(is_plain | is_solarised)
  assert 0.13 < is_solarised.mean() < 0.27, is_solarised.mean()


def test_config_is_valid_and_bad_values_name_the_fix():
  config = mh.load_config('byol')
  config_lib.validate(config, num_devices=8)
  config.method.target_momentum = 1.5
  with pytest.raises(config_lib.ConfigError, match=r'target_momentum=1.5 must be in \[0, 1\]'):
    config_lib.validate(config, num_devices=8)
  config = mh.load_config('byol')
  config.augment.num_local_crops = 2
  with pytest.raises(config_lib.ConfigError, match='set augment.num_local_crops = 0'):
    config_lib.validate(config, num_devices=8)


# ------------------------------------------------------------------------------------------
# Training


@pytest.mark.slow  # `pytest -m slow`: the default suite resumes MoCo v2's and AdCo's target
# networks and the generic tests/test_resume.py through the same whole-TrainState checkpoint
def test_resumed_run_ends_with_identical_state(tmp_path):
  config = _light_augment(_config(batch_size=16))
  config.total_steps = 4
  # A fast-moving target (tau 0.9 rather than 0.996), so that a target not restored from the
  # checkpoint, or restored with the wrong step's tau, changes the result visibly.
  config.method.target_momentum = 0.9
  config.optimizer.warmup_epochs = 0.0  # the online network moves from the first step
  # Both runs stop at step 3 of the 4-step schedule: a resume mid-run, without paying for the
  # final evaluations.
  straight, _ = train.train_and_evaluate(config, str(tmp_path / 'straight'), stop_at_step=3)
  first, _ = train.train_and_evaluate(config, str(tmp_path / 'resumed'), stop_at_step=1)
  first = jax.device_get(first)
  resumed, results = train.train_and_evaluate(config, str(tmp_path / 'resumed'), stop_at_step=3)
  # It restored the checkpoint of step 1 and trained only the 2 steps left (a
  # restore skipped silently would train from scratch and end in the same state).
  assert results['restored_step'] == 1 and results['steps_run'] == 2
  assert int(first.step) == 1 and int(resumed.step) == int(straight.step) == 3
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed), jax.device_get(straight))
  # The target moved after the checkpoint, so the resumed run really continued it.
  moved = max(float(np.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(first.target_params), jax.tree.leaves(jax.device_get(resumed.target_params))))
  assert moved > 1e-4, moved


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  config = mh.shrink(mh.load_config('byol'), batch_size=64)
  # 2000 test images rather than 500: the margins here are a few points, the noise of 500
  # about two.
  config.eval.final_bank_size, config.eval.final_test_size = 2000, 2000
  config.eval.diagnostics = config.eval.plots = False  # encoder_spread measures collapse
  # The recipe warms up for one epoch (937 steps at batch 64), longer than this whole run, so
  # the lr would never get past a tenth of its peak; and LARS (trust coefficient 1e-3) at the
  # recipe's peak, 0.2 x 64/256, moved the encoder too little in 100 steps to beat random init
  # (kNN 0.562 vs 0.564 on 500 test images, measured). A ~9-step warm-up and 15x the lr gave
  # 0.598 (0.5705 vs 0.5425 on 2000).
  config.optimizer.warmup_epochs = 0.01
  config.optimizer.base_lr = 3.0
  state, results = mh.train_briefly(config, str(tmp_path_factory.mktemp('byol')), 100)
  return config, state, results


@pytest.mark.slow  # a real training run: `pytest -m slow` (README, Tests)
def test_short_run_learns_without_collapse(trained):
  config, state, results = trained
  spread = mh.encoder_spread(config, build_method(config), state)
  assert spread > 0.1, spread
  assert results['knn_top1'] > results['knn_top1_random_init'], results
