"""Shared checks for every method: the sharded loss and gradients against one device, and a
short training run on Fashion-MNIST. Each method's test file calls these."""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ssl_jax import optim, parallel
from ssl_jax.data import augment
from ssl_jax.methods import RunLength, build_method
from ssl_jax.state import create_train_state
from ssl_jax.train_step import make_train_step

CONFIG_DIR = os.path.join(os.path.dirname(__file__), '..', 'configs')


def load_config(name: str, arg: str | None = None):
  """configs/<name>.py's get_config(arg)."""
  spec = importlib.util.spec_from_file_location(f'{name}_config',
                                                os.path.join(CONFIG_DIR, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def shrink(config, batch_size: int = 32, crop: int = 12):
  """The method's config on a tiny ConvNet: trains a few steps in seconds on CPU."""
  config.batch_size = batch_size
  config.model.name = 'convnet'
  config.model.widths = (4, 8)
  config.model.convs_per_stage = 1
  config.augment.crop_size = crop
  config.eval.image_size = crop
  config.total_steps = 4
  config.log_every_steps = 2
  config.checkpoint_every_steps = 2
  config.eval_every_steps = 0
  config.eval.final_bank_size = 500
  config.eval.final_test_size = 100
  config.eval.baselines = False
  config.eval.diagnostics = config.eval.plots = False  # tests that check them turn them on
  return config


def init_method(config, run_length: RunLength | None = None, seed: int = 0):
  """(method, params, batch_stats, target_params, method_state) at initialisation."""
  method = build_method(config, run_length)
  size = config.augment.crop_size
  params, batch_stats, method_state = jax.jit(
      lambda r: method.init(r, jnp.zeros((2, size, size, 1))))(jax.random.PRNGKey(seed))
  target = method.init_target(params) if hasattr(method, 'init_target') else {}
  return method, params, batch_stats, target, method_state


def make_views(config, method, batch_size: int, seed: int = 0) -> list[jnp.ndarray]:
  """The trainer's views (global, then local crops) of random uint8 images."""
  images = np.random.default_rng(seed).integers(0, 256, (batch_size, 16, 16, 1), np.uint8)
  cfgs = augment.view_configs(config.augment, method.num_views)
  return augment.augment_views(jax.random.PRNGKey(seed), jnp.asarray(images), cfgs)


def sharded_loss_and_grads(method, params, batch_stats, target_params, method_state, views,
                           num_devices: int, step: int = 0, rng=None):
  """method.loss under shard_map over `num_devices` devices (views split by rows), and the
  gradient with respect to params, exactly as the train step computes them.

  Returns (loss, grads, metrics, new_batch_stats, new_method_state), all on the host.
  num_devices=0 runs the loss without shard_map (axis_name=None): the plain reference.
  """
  rng = jax.random.PRNGKey(1) if rng is None else rng
  step = jnp.asarray(step, jnp.int32)
  if num_devices == 0:
    def loss_fn(p):
      return method.loss(p, batch_stats, target_params, method_state, views, rng, step, None)
  else:
    mesh = parallel.make_mesh(num_devices)
    axis = parallel.DATA_AXIS
    sharded = jax.shard_map(
        lambda p, b, t, s, v, r, k: method.loss(p, b, t, s, v, r, k, axis), mesh=mesh,
        in_specs=(P(), P(), P(), P(), P(axis), P(), P()), out_specs=(P(), (P(), P(), P())))

    def loss_fn(p):
      return sharded(p, batch_stats, target_params, method_state, views, rng, step)
  (loss, (metrics, new_stats, new_state)), grads = jax.jit(
      jax.value_and_grad(loss_fn, has_aux=True))(params)
  return jax.device_get((loss, grads, metrics, new_stats, new_state))


def assert_trees_close(actual, expected, rtol=1e-5, atol=1e-6, what=''):
  flat_a = jax.tree_util.tree_leaves_with_path(actual)
  flat_e = jax.tree.leaves(expected)
  assert len(flat_a) == len(flat_e), f'{what}: trees differ in size'
  for (path, a), e in zip(flat_a, flat_e):
    e = np.asarray(e)
    # float32 sums taken in a different order (per device, then across devices) differ by a
    # few ulps of the *largest* terms, so the absolute slack scales with the leaf's size.
    scale = float(np.abs(e).max()) if e.size and np.issubdtype(e.dtype, np.floating) else 0.0
    np.testing.assert_allclose(np.asarray(a), e, rtol=rtol, atol=atol + rtol * scale,
                               err_msg=f'{what}{jax.tree_util.keystr(path)}')


def check_devices_agree(config, num_devices=8, batch_size=32, steps=(0,), rtol=2e-5,
                        atol=1e-6):
  """Loss, gradients, metrics, BN statistics and method state on `num_devices` devices equal
  one device and the shard_map-free reference, on the same global batch."""
  method, params, batch_stats, target, state = init_method(config)
  views = make_views(config, method, batch_size)
  for step in steps:
    ref = sharded_loss_and_grads(method, params, batch_stats, target, state, views, 0, step)
    one = sharded_loss_and_grads(method, params, batch_stats, target, state, views, 1, step)
    many = sharded_loss_and_grads(method, params, batch_stats, target, state, views,
                                  num_devices, step)
    for name, other in (('1 device', one), (f'{num_devices} devices', many)):
      np.testing.assert_allclose(other[0], ref[0], rtol=rtol, err_msg=f'loss, {name}')
      assert_trees_close(other[1], ref[1], rtol, atol, f'grads, {name}')
      assert_trees_close(other[2], ref[2], rtol, atol, f'metrics, {name}')
      assert_trees_close(other[3], ref[3], rtol, atol, f'batch_stats, {name}')
      assert_trees_close(other[4], ref[4], rtol, atol, f'method_state, {name}')
    # Not vacuous: the gradient is not zero.
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(ref[1])) > 0
  return ref


def trainer_steps(config, num_steps, num_devices=2):
  """The real train step on `num_devices` devices; the states before and after each step."""
  mesh = parallel.make_mesh(num_devices)
  schedule = optim.learning_rate_schedule(config.optimizer, config.batch_size,
                                          config.total_steps, 1)
  tx = optim.make_optimizer(config.optimizer, schedule)
  method = build_method(config, RunLength(config.total_steps, 1))
  size = config.augment.crop_size
  state = jax.jit(lambda r: create_train_state(method, tx, r, jnp.zeros((2, size, size, 1))),
                  out_shardings=parallel.replicated(mesh))(jax.random.PRNGKey(0))
  step = make_train_step(method, tx, mesh, config.augment, schedule)
  states, metrics = [jax.device_get(state)], []
  for i in range(num_steps):
    images = np.random.default_rng(i).integers(0, 256, (config.batch_size, 16, 16, 1),
                                               np.uint8)
    state, m = step(state, parallel.global_batch_from_host(images, mesh))
    states.append(jax.device_get(state))  # the step donates its input: keep host copies
    metrics.append(jax.device_get(m))
  return states, metrics


def train_briefly(config, workdir: str, steps: int):
  """Trains `config` for `steps` steps on Fashion-MNIST with the random-init baseline; returns
  (final state, results) of `train_and_evaluate`."""
  from ssl_jax.train import train_and_evaluate
  config.total_steps = steps
  config.checkpoint_every_steps = steps
  config.log_every_steps = max(1, steps // 4)
  config.eval.baselines = True
  return train_and_evaluate(config, workdir)


def check_short_lars_run_learns(name: str, workdir: str, **method_fields):
  """200 steps at batch 64 (a fifth of an epoch) of configs/<name>.py's LARS recipe, with what
  such a short run needs; the encoder must keep its spread and beat its random init in kNN."""
  config = shrink(load_config(name), batch_size=64)
  # The recipe's warm-up (1 epoch, 937 steps here) would outlast the run.
  config.optimizer.warmup_epochs = 0.03
  # LARS scales each layer's step to lr x 0.001 of its norm: at the recipe's lr (0.3 x 64 /
  # 256) 200 steps leave the encoder close to its initialisation. lr 1.2, as at batch 1024.
  config.optimizer.base_lr = 4.8
  config.method.update(method_fields)
  # Random-resized crops zoom in, so evaluate at 1.25 x the crop side, as the recipe does.
  config.eval.image_size = 15
  # The trained and random-init scores differ by a few points: 2,000 queries keep the
  # evaluation's own noise (about 1 point) below that.
  config.eval.final_bank_size, config.eval.final_test_size = 10000, 2000
  state, results = train_briefly(config, workdir, 200)
  spread = encoder_spread(config, build_method(config), state)
  print(f'{name}: kNN {results["knn_top1"]:.4f} vs random init '
        f'{results["knn_top1_random_init"]:.4f}, spread {spread:.3f}')
  assert spread > 0.1
  assert results['knn_top1'] > results['knn_top1_random_init']


def encoder_spread(config, method, state, num_images: int = 1000) -> float:
  """Per-dimension std of the l2-normalised features of test images, times sqrt(D): about 1
  for features spread over the sphere, 0 for a collapsed encoder."""
  from ssl_jax.data import pipeline, sources
  from ssl_jax.evaluation import diagnostics, features
  test = sources.get_source(config.data.name, config.data.eval_split)
  images, _ = pipeline.make_eval_arrays(test, max_examples=num_images)
  feats = features.extract_features(
      lambda x: method.encode(state.params, state.batch_stats, x), images,
      config.eval.batch_size, config.eval.image_size or None)
  return float(diagnostics.normalized_std(feats)) * np.sqrt(feats.shape[1])
