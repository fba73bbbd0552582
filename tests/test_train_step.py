"""The compiled train step: 8 simulated devices give the single-device result, and both
match a reference computed without shard_map at all."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ssl_jax import optim, parallel
from ssl_jax.data import augment
from ssl_jax.methods import build_method
from ssl_jax.state import create_train_state
from ssl_jax.train_step import make_train_step


def _setup(config, num_devices, warmup_steps=2):
  mesh = parallel.make_mesh(num_devices)
  schedule = optim.learning_rate_schedule(config.optimizer, config.batch_size, 10,
                                          warmup_steps)
  tx = optim.make_optimizer(config.optimizer, schedule)
  method = build_method(config)
  size = config.augment.crop_size
  state = jax.jit(lambda r: create_train_state(method, tx, r, jnp.zeros((2, size, size, 1))),
                  out_shardings=parallel.replicated(mesh))(jax.random.PRNGKey(0))
  step = make_train_step(method, tx, mesh, config.augment, schedule)
  return mesh, method, tx, state, step


def _images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, size=(n, 16, 16, 1), dtype=np.uint8)


def _run(config, num_devices, steps=2):
  mesh, _, _, state, step = _setup(config, num_devices)
  history = []
  for i in range(steps):
    images = parallel.global_batch_from_host(_images(config.batch_size, seed=i), mesh)
    state, metrics = step(state, images)
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history


@pytest.mark.parametrize('backbone', ['convnet', 'resnet18'])
def test_eight_devices_equal_one_device(tiny_config, backbone):
  tiny_config.model.name = backbone
  tiny_config.model.width = 4
  state_1, hist_1 = _run(tiny_config, 1)
  state_8, hist_8 = _run(tiny_config, 8)
  for m1, m8 in zip(hist_1, hist_8):
    for key in ('loss', 'grad_norm', 'pos_cosine', 'neg_cosine', 'learning_rate'):
      np.testing.assert_allclose(m8[key], m1[key], rtol=2e-5, err_msg=key)
  # Parameters and BN statistics after two steps: gradients and synced BN agree.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               (state_8.params, state_8.batch_stats), (state_1.params, state_1.batch_stats))
  assert int(state_8.step) == 2
  # The test is sensitive: training moved the parameters.
  _, _, _, init_state, _ = _setup(tiny_config, 1)
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       state_1.params, jax.device_get(init_state.params))
  assert max(jax.tree.leaves(moved)) > 1e-4


def test_step_matches_reference_without_shard_map(tiny_config):
  """Loss and gradients of the step equal plain autodiff of the method's loss on the whole
  batch (axis_name=None: no collectives, no shard_map), with the same views."""
  tiny_config.optimizer.name = 'sgd'
  tiny_config.optimizer.momentum = 0.0
  tiny_config.optimizer.weight_decay = 0.0
  mesh, method, tx, state, step = _setup(tiny_config, 8, warmup_steps=0)
  state0 = jax.device_get(state)
  images = _images(tiny_config.batch_size)
  new_state, metrics = step(state, parallel.global_batch_from_host(images, mesh))

  aug_rng, loss_rng = jax.random.split(jax.random.fold_in(state0.rng, 0))
  views = augment.augment_batch(aug_rng, jnp.asarray(images), tiny_config.augment, 2)

  def ref_loss(params):
    return method.loss(params, state0.batch_stats, {}, {}, views, loss_rng, 0, None)

  (loss, (_, batch_stats, _)), grads = jax.value_and_grad(ref_loss, has_aux=True)(
      state0.params)
  np.testing.assert_allclose(metrics['loss'], loss, rtol=1e-5)
  np.testing.assert_allclose(metrics['grad_norm'], optax.tree.norm(grads), rtol=1e-5)
  # Plain SGD without warm-up: new params = params - peak_lr * grads.
  lr = optim.scaled_learning_rate(tiny_config.optimizer, tiny_config.batch_size)
  expected = jax.tree.map(lambda p, g: p - lr * g, state0.params, grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               jax.device_get(new_state.params), expected)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               jax.device_get(new_state.batch_stats), batch_stats)


def test_views_do_not_depend_on_device_count(tiny_config):
  images = jnp.asarray(_images(16))
  key = jax.random.PRNGKey(3)
  whole = augment.augment_batch(key, images, tiny_config.augment, 2)
  halves = [augment.augment_batch(key, images[i:i + 8], tiny_config.augment, 2, start_index=i)
            for i in (0, 8)]
  for v in range(2):
    np.testing.assert_array_equal(whole[v], jnp.concatenate([h[v] for h in halves]))
