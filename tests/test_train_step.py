"""The compiled train step: on 8 simulated devices and on 1, each step equals the float64
computation of the step without shard_map at all, within the float32 rounding bound of
`method_harness.float32_tolerance` (hence the two equal each other).

Planted bugs these checks caught (then reverted): NT-Xent's positive/self columns at device
offset 0 on every device (losses/info_nce.py pair_logits, `global_row_offset(n, None)`):
tests/test_negatives.py::test_devices_agree, loss off by 13% against a tolerance of 0.055%;
one device's NT-Xent terms scaled by 1.01 (device 1 of 8): the convnet test here, loss off by
0.125% against 0.057%; the projector's BatchNorm without axis_name (models/heads.py): shard_map
itself rejects the device-varying statistics (tests/test_simsiam.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import optim, parallel
from ssl_jax.data import augment

import method_harness as mh


def _images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, size=(n, 16, 16, 1), dtype=np.uint8)


def _run(config, num_devices, steps=2):
  """The states before and after each of `steps` train steps, the metrics of each."""
  config.total_steps, config.optimizer.warmup_epochs = 10, 0.0
  built, state, step = mh.build_experiment(config, num_devices)
  mesh = built.mesh
  states, history = [jax.device_get(state)], []
  for i in range(steps):
    images = parallel.global_batch_from_host(_images(config.batch_size, seed=i), mesh)
    state, metrics = step(state, images)
    states.append(jax.device_get(state))  # the step donates its input: keep host copies
    history.append(jax.device_get(metrics))
  return states, history


def _float64_step(config):
  """`step(state, i) -> (params, batch_stats, metrics, grads, lr, R)`: train step i from `state`
  computed without shard_map in float64 (`method_harness.float64_computation`): the step's
  views (made in float32, as the step makes them: the augmentation is per example), plain
  autodiff of the method's loss on the whole batch, plain SGD."""
  method = mh.float64_method(config)
  cfgs = augment.view_configs(config.augment, method.num_views)
  schedule = optim.learning_rate_schedule(config.optimizer, config.batch_size, 10, 0)
  with mh.float64_computation():
    @jax.jit
    def loss_and_grads(params, stats, target, method_state, views, rng, step):
      return jax.value_and_grad(lambda p: method.loss(
          p, stats, target, method_state, views, rng, step, None), has_aux=True)(params)

  def step(state, i):
    aug_rng, loss_rng = jax.random.split(jax.random.fold_in(state.rng, i))
    views = augment.augment_views(aug_rng, jnp.asarray(_images(config.batch_size, seed=i)),
                                  cfgs)
    lr = np.float64(schedule(i))  # the float32 value the step uses
    with mh.float64_computation():
      (loss, (metrics, stats, _)), grads = jax.device_get(loss_and_grads(
          *mh.to_float64((state.params, state.batch_stats, state.target_params,
                          state.method_state, list(views))), loss_rng,
          jnp.asarray(i, jnp.int32)))
    assert np.asarray(loss).dtype == np.float64
    params = jax.tree.map(lambda p, g: np.asarray(p, np.float64) - lr * g, state.params, grads)
    metrics = dict(metrics, loss=loss, learning_rate=lr,
                   grad_norm=np.sqrt(sum(np.sum(g ** 2) for g in jax.tree.leaves(grads))))
    return params, stats, metrics, grads, lr, mh.reduction_length(views)

  return step


def _sgd(config):
  # Plain SGD from the first step: each step moves every parameter by lr x its gradient,
  # about 1% of its size (a larger lr makes the first step overshoot, and the second one's
  # gradients tiny), far above the float32 tolerance; and params - lr x grads tests the
  # gradient itself. (LARS would scale a layer's step to 1e-3 of its norm, below the old
  # tolerance, and a warm-up would make the first step's learning rate 0.)
  config.optimizer.name = 'sgd'
  config.optimizer.momentum = 0.0
  config.optimizer.weight_decay = 0.0
  config.optimizer.lr_scaling = 'none'
  config.optimizer.base_lr = 0.02
  return config


# ResNet-18 (BatchNorm statistics synchronised across devices, a CIFAR stem): 40 s, under
# `pytest -m slow`; the default suite checks the ConvNet here and ResNet BN sync elsewhere.
@pytest.mark.parametrize('backbone', [
    'convnet', pytest.param('resnet18', marks=pytest.mark.slow)])
def test_devices_and_no_shard_map_agree_over_two_steps(tiny_config, backbone):
  """Each of two train steps, on 8 devices and on 1 device, equals the float64 computation of
  that step without shard_map from the same state: every metric, the parameters and the BN
  statistics, within the float32 rounding bound (`method_harness.float32_tolerance`); and
  every parameter leaf moves by far more than that bound, so no leaf's update goes unchecked.

  The reference restarts from each run's own state at each step: two float32 runs drift apart
  by their rounding, and ResNet's zero-initialised last BN scale of each residual branch makes
  the second step's branch gradients proportional to first-step values that are themselves
  float32 sums, so compounding the steps would compound the rounding."""
  config = _sgd(tiny_config)
  config.model.name = backbone
  config.model.width = 4
  reference_step = _float64_step(config)
  unmoved = set()
  for n in (1, 8):
    states, history = _run(config, n)
    unmoved |= {(n, jax.tree_util.keystr(path)) for path, _ in
                jax.tree_util.tree_leaves_with_path(states[0].params)}
    for i, (before, after) in enumerate(zip(states, states[1:])):
      what = f'{n} device(s), step {i}'
      params, stats, metrics, grads, lr, length = reference_step(before, i)
      assert set(history[i]) == set(metrics), what
      mh.assert_close_to_float64(history[i], metrics, length, f'metrics, {what}')
      # lr x the gradient's float32 tolerance, and one rounding of the updated parameter.
      params_tol = jax.tree.map(lambda t, p: lr * t + mh.F32_ROUNDOFF * float(np.abs(p).max()),
                                mh.float32_tolerance(grads, length), params)
      mh.assert_close_to_float64(after.params, params, length, f'params, {what}',
                                 tolerance=params_tol)
      mh.assert_close_to_float64(after.batch_stats, stats, length, f'batch_stats, {what}')
      assert int(after.step) == i + 1
      # Sensitive: every leaf this step moves (ResNet's residual branches have 0 gradients in
      # the first step, their last BN scale being 0) moves by far more than its tolerance.
      for (path, new), old, tol, g in zip(jax.tree_util.tree_leaves_with_path(params),
                                          jax.tree.leaves(before.params),
                                          jax.tree.leaves(params_tol), jax.tree.leaves(grads)):
        if np.any(g != 0):
          moved = float(np.abs(new - np.asarray(old, np.float64)).max())
          assert moved > 100 * tol, (what, jax.tree_util.keystr(path), moved, tol)
          unmoved.discard((n, jax.tree_util.keystr(path)))
  assert not unmoved, unmoved


def test_views_do_not_depend_on_device_count(tiny_config):
  images = jnp.asarray(_images(16))
  key = jax.random.PRNGKey(3)
  whole = augment.augment_batch(key, images, tiny_config.augment, 2)
  halves = [augment.augment_batch(key, images[i:i + 8], tiny_config.augment, 2, start_index=i)
            for i in (0, 8)]
  for v in range(2):
    np.testing.assert_array_equal(whole[v], jnp.concatenate([h[v] for h in halves]))
