"""Stochastic depth in the methods' training steps (`model.drop_path_rate`, ViT encoders): an
example's masks follow its index in the global batch (`models.vit.drop_path_mask`), so a step
on 8 devices equals one on 1 device; every method's online forward gets a dropout rng and
says how its views are concatenated; targets and teachers run without drop path. Each test
says which bug it catches."""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import method_harness as mh
from ssl_jax import parallel
from ssl_jax.methods import METHODS, RunLength, build_method
from ssl_jax.models.vit import ViT, drop_path_mask

BATCH = 32


@pytest.fixture(scope='module', autouse=True)
def tiny_vit_registered():
  with mh.tiny_vit_registered():
    yield


def _config(name: str, drop_path_rate: float):
  return mh.tiny_vit_config(name, drop_path_rate, BATCH)


# ------------------------------------------------------------------------------ the mask

def test_mask_follows_the_global_batch_not_the_device():
  """Catches masks drawn per device (every device dropping the same rows of its shard, or the
  device index folded into the key: 8 devices then differ from 1), a concatenation of views
  read as one block of rows (its rows' global indices wrong on 8 devices), views sharing
  their masks, and a keep rate other than keep_prob."""
  key = jax.random.PRNGKey(7)
  views, per_view, devices, keep = 3, 64, 8, 0.5
  # One device: the views concatenated, [view 0 | view 1 | view 2], 64 rows each.
  one = np.asarray(drop_path_mask(key, views * per_view, keep, None, per_view))
  local = per_view // devices
  axis = parallel.DATA_AXIS
  sharded = jax.shard_map(
      lambda _: drop_path_mask(key, views * local, keep, axis, local)[None],
      mesh=parallel.make_mesh(devices), in_specs=P(axis), out_specs=P(axis))
  # Each device: [its rows of view 0 | of view 1 | of view 2]; reordered view-major.
  many = np.asarray(jax.jit(sharded)(jnp.arange(devices)))
  many = many.reshape(devices, views, local).transpose(1, 0, 2).reshape(-1)
  np.testing.assert_array_equal(many, one)
  by_view = one.reshape(views, per_view)
  assert not np.array_equal(by_view[0], by_view[1])
  assert not np.array_equal(by_view[1], by_view[2])
  assert 0.35 < one.mean() < 0.65
  # rows_per_view 0: the whole batch is one view.
  np.testing.assert_array_equal(drop_path_mask(key, per_view, keep),
                                drop_path_mask(key, per_view, keep, None, per_view))


def test_mask_is_the_same_in_float64_mode():
  """Catches a uniform drawn in the default float dtype, or in jnp.float32: in the harness's
  float64 reference (x64 on, jnp.float32 mapped to float64) it would come from 64 bits and
  drop other rows than the float32 run, so a reference with drop path could not match."""
  key = jax.random.PRNGKey(3)
  plain = np.asarray(drop_path_mask(key, 256, 0.5, None, 64))
  with mh.float64_computation():
    wide = np.asarray(drop_path_mask(key, 256, 0.5, None, 64))
  np.testing.assert_array_equal(wide, plain)
  assert 0.35 < plain.mean() < 0.65


# ------------------------------------------------------- every method's online forward

def _vit_calls(config):
  """(rows, rows_per_view, has a dropout rng) of each ViT call that the method's loss makes,
  traced on one device with abstract values (nothing is compiled)."""
  method = build_method(config, RunLength(total_steps=10, steps_per_epoch=1,
                                          num_examples=mh.NUM_EXAMPLES))
  views = mh.make_views(config, method, BATCH)
  params, batch_stats, state = jax.eval_shape(
      lambda r: method.init(r, jnp.zeros((2, 16, 16, 1))), jax.random.PRNGKey(0))
  target = jax.eval_shape(method.init_target, params)
  calls = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, ViT) and context.method_name == '__call__':
      calls.append((args[0].shape[0], context.module.rows_per_view,
                    context.module.has_rng('dropout')))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(
        lambda p, b, t, s, v: method.loss(p, b, t, s, v, jax.random.PRNGKey(1), jnp.int32(0),
                                          None), params, batch_stats, target, state, views)
  return method, calls


# LiT's image tower is locked and runs in inference mode, without drop path.
@pytest.mark.parametrize('name', sorted(set(METHODS) - {'lit'}))
def test_every_method_gives_its_online_forward_a_dropout_rng_and_its_view_layout(name):
  """Catches a method whose online network never receives the 'dropout' rng (drop_path_rate
  then silently does nothing), a method that concatenates views without saying so
  (`concatenated_views`: its masks would depend on the device count), and a target or
  teacher network run with drop path (DINO's teacher has none)."""
  method, calls = _vit_calls(_config(name, drop_path_rate=0.5))
  online = [(rows, per_view) for rows, per_view, rng in calls if rng]
  assert online, f'{name}: no ViT call with a dropout rng'
  for rows, per_view in online:
    # Views of BATCH rows each, concatenated or not.
    assert (per_view or rows) == BATCH and rows % BATCH == 0, (name, calls)
  if method.target_networks is not None:
    assert any(not rng for _, _, rng in calls), f'{name}: its target runs with drop path'


# -------------------------------------------------------- numbers: 1 and 8 devices

def _loss_and_grads(name, drop_path_rate, num_devices):
  config = _config(name, drop_path_rate)
  method, params, batch_stats, target, state = mh.init_method(config)
  views = mh.make_views(config, method, BATCH)
  return mh.sharded_loss_and_grads(method, params, batch_stats, target, state, views,
                                   num_devices), mh.reduction_length(views)


def _assert_runs_agree(many, one, length, what):
  """Loss and gradients within twice the harness's float32 bound (each run is within it of
  the exact values): a mask that differs for even one example moves them far more."""
  for i, part in enumerate(('loss', 'grads')):
    tolerance = jax.tree.map(lambda t: 2 * t, mh.float32_tolerance(one[i], length))
    mh.assert_close_to_float64(many[i], one[i], length, what=f'{what} {part}',
                               tolerance=tolerance)


def _relative_change(tree, reference) -> float:
  """max |tree - reference| / max |reference| over the leaves."""
  diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(tree),
                                                      jax.tree.leaves(reference)))
  return diff / max(float(np.abs(b).max()) for b in jax.tree.leaves(reference))


# About 45 s each on 2 CPU cores (three compilations); BYOL's and DINO's under -m slow.
# All under -m slow: the default suite checks the masks themselves against the global batch
# (above) and drop path through micro-batches on 8 devices (tests/test_microbatch.py).
@pytest.mark.slow
@pytest.mark.parametrize('name', ['simclr', 'byol', 'dino'])
def test_drop_path_step_equals_on_8_and_1_devices(name):
  """With drop_path_rate 0.5 the loss and gradients on 8 devices equal those on 1 device for
  the same global batch: catches masks that depend on the device (SimCLR: both views in one
  call; BYOL: a call per view; DINO: global then local crops in one apply, two calls of the
  encoder). Catches a rate that does not reach the model: the gradients of the second block
  (rate 0.5; the first block's is 0) must differ from the rate-0 ones by far more than
  rounding, as a dropped row adds nothing to them and a kept one twice. (At initialisation
  the residual branches are small next to the token embeddings, so the loss itself moves
  little: these gradients are also what a wrong mask would change most, far beyond the
  tolerance.) Catches a target or teacher run with drop path: BYOL's target spread and DINO's
  new centre depend on the target's or teacher's outputs alone and must not change with the
  rate."""
  (one, length) = _loss_and_grads(name, 0.5, 1)
  (many, _) = _loss_and_grads(name, 0.5, 8)
  _assert_runs_agree(many, one, length, f'{name}, 8 vs 1 device')
  (plain, _) = _loss_and_grads(name, 0.0, 1)
  block = 'block_1'
  assert _relative_change(one[1]['encoder'][block], plain[1]['encoder'][block]) > 0.05
  if name == 'byol':
    np.testing.assert_allclose(one[2]['target_spread'], plain[2]['target_spread'], rtol=1e-6)
  if name == 'dino':
    np.testing.assert_allclose(one[4]['center'], plain[4]['center'], rtol=1e-6, atol=1e-9)
