"""bfloat16 compute (`--config.model.dtype=bfloat16`) end to end.

What stays float32 is listed in one place, ssl_jax/precision.py; the first tests check those
islands one by one (stored state, BatchNorm, the heads, every loss function), the others that
bfloat16 training computes what float32 training does: every method's loss and gradients from
the same parameters and views, 8 devices against 1, and a short run on Fashion-MNIST.

Tolerances. bfloat16 keeps 8 significant bits (unit roundoff 2^-9 = 2e-3) and every layer
rounds its activations, and their cotangents in the backward pass, to them; a gradient through
BatchNorm is a difference of nearly equal terms (the batch mean of the cotangents and their
correlation with the normalised activations are subtracted), so what is left carries a sizeable
part of that rounding. Measured on the tiny ConvNet of `method_harness.shrink` at batch 32,
seeds 0-2 (parameters and views), as the norm-wise relative error of the whole gradient,
||g_bf16 - g_f32|| / ||g_f32||: 0.7-5% for SimCLR, MoCo v2, BYOL, SwAV, DINO, VICReg and AdCo;
9-17% for MoCo v3, SimSiam and Barlow Twins (deeper heads: more BatchNorm layers between the
loss and the encoder); 20-36% for NNCLR and the triplet loss, whose nearest neighbour and
semi-hard negative are argmins that bfloat16 rounding flips for a few rows. The loss is within
1.3e-3 of float32's (relative to max(|loss|, 1)), 9e-3 for NNCLR.

Each tolerance is about 3x the largest error measured for its method. That catches a
bfloat16 run that computes something else (a cast that blocks a gradient: 100%; a NaN, a
sign, a constant factor), but not a loss that merely runs its softmax in bfloat16: measured
with every `precision.to_float32` removed, that adds 0.1-0.5% to the loss of SimCLR and
Barlow Twins and nothing visible to the gradients next to the network's own rounding (the
method tests still fail it, on the loss's bfloat16 dtype). The float32 islands are therefore
checked exactly, loss by loss, by `test_loss_computes_in_float32_from_bfloat16_inputs`, which
fails for every loss without its cast.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import method_harness as harness
from ssl_jax import experiment, parallel
from ssl_jax.data import sources
from ssl_jax.losses import barlow_twins, dino, info_nce, moco, negatives, queue, regression
from ssl_jax.losses import sinkhorn, triplet, vicreg
from ssl_jax.methods import METHODS
from ssl_jax.models.dino_head import DINOHead, WeightNormDense
from ssl_jax.models.heads import ProjectionMLP

BATCH = 32

# method: (loss tolerance, gradient tolerance); see the module docstring. The comment is the
# largest error measured over seeds 0-2 (loss relative to max(|loss|, 1); gradient norm-wise).
TOLERANCES = {
    'simclr': (2e-3, 0.1),         # 4.6e-4, 2.7e-2
    'moco_v2': (2e-3, 0.05),       # 2.0e-4, 1.6e-2
    'pcl': (2e-3, 0.05),           # 2.7e-4, 2.0e-2 (seed 0; at step 0, warm-up, MoCo v2's loss)
    'hyperbolic': (3e-3, 0.25),    # 6.7e-4, 5.5e-2 (seed 0)
    'moco_v3': (2e-3, 0.5),        # 3.7e-4, 1.7e-1
    'byol': (2e-3, 0.2),           # 3.2e-5, 5.3e-2
    'simsiam': (2e-3, 0.5),        # 3.6e-4, 1.6e-1
    'swav': (2e-3, 0.05),          # 5.5e-5, 1.6e-2
    'dino': (2e-3, 0.05),          # 2.3e-4, 1.1e-2
    'deepcluster_v2': (1e-3, 0.12),  # 6.3e-5, 2.9e-2 (seed 0; random clusters)
    'ibot': (8e-3, 0.03),          # 1.8e-3, 5.3e-3 (seed 0; the tiny ViT)
    'mae': (1e-3, 0.03),           # 7.2e-5, 5.9e-3 (seed 0; the tiny ViT)
    'barlow_twins': (4e-3, 0.4),   # 1.3e-3, 1.2e-1
    'vicreg': (4e-3, 0.1),         # 1.1e-3, 3.2e-2
    # Argmin flips (module docstring): 0.8 still fails a zero, NaN or sign-flipped gradient.
    'nnclr': (3e-2, 0.8),          # 8.8e-3, 3.6e-1
    'adco': (2e-3, 0.15),          # 3.1e-4, 4.3e-2
    'triplet': (4e-3, 0.8),        # 1.1e-3, 3.6e-1
    'clip': (2e-3, 0.15),          # 1.9e-4, 3.9e-2
    'siglip': (2e-3, 0.4),         # 4.4e-4, 1.2e-1
    'lit': (2e-3, 0.25),           # 3.0e-4, 7.0e-2
}


# Methods that mask patch tokens: shrunk to the tiny ViT, the others to the ConvNet.
VIT_ONLY_METHODS = ('mae', 'ibot')


def _shrunk_config(name: str, batch_size: int):
  if name in VIT_ONLY_METHODS:
    return harness.tiny_vit_config(name, batch_size=batch_size)
  return harness.shrink(harness.load_config(name), batch_size=batch_size)


def bfloat16_config(config):
  config = config.copy_and_resolve_references()
  config.model.dtype = 'bfloat16'
  return config


def flat(tree) -> np.ndarray:
  """The floating leaves of `tree`, concatenated as one float64 vector."""
  leaves = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)
            if np.issubdtype(np.asarray(x).dtype, np.floating)]
  return np.concatenate(leaves) if leaves else np.zeros(0)


def relative_error(actual, expected) -> float:
  """||actual - expected|| / ||expected|| over all floating leaves of two trees."""
  a, e = flat(actual), flat(expected)
  assert a.shape == e.shape
  return float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30))


def loss_error(actual, expected) -> float:
  """|actual - expected| / max(|expected|, 1): relative for losses of order 1 or more,
  absolute for those near 0 (SimSiam's -cos starts near 0)."""
  return abs(float(actual) - float(expected)) / max(abs(float(expected)), 1.0)


def floating_dtypes(tree) -> set:
  return {np.dtype(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


# ------------------------------------------------------------------ what stays float32


@pytest.mark.parametrize('name', sorted(METHODS))
def test_bfloat16_training_state_is_float32(name):
  """Parameters, optimizer state, target network, BatchNorm statistics and method state of a
  bfloat16 run are all float32 (shapes only: nothing is compiled).

  Catches a parameter created in the compute dtype (`self.param(..., self.dtype)`), an
  optimizer keeping its moments in bfloat16, or a queue, bank or centre stored in bfloat16:
  LARS's updates are ~1e-3 of a weight, below bfloat16's resolution of 2^-8, so bfloat16
  weights would not train."""
  with harness.tiny_vit_registered():
    config = bfloat16_config(_shrunk_config(name, batch_size=8))
    # Enough examples for DeepCluster-v2's clusters (its memory bank has one row each).
    built = experiment.build(config, num_train_examples=1024, image_channels=1,
                             mesh=parallel.make_mesh(1))
    state = jax.eval_shape(built.init_fn, jax.random.PRNGKey(0))
  for field in ('params', 'opt_state', 'target_params', 'batch_stats', 'method_state',
                'probe_params', 'probe_opt_state'):
    dtypes = floating_dtypes(getattr(state, field))
    assert dtypes <= {np.dtype(np.float32)}, (field, dtypes)
  assert floating_dtypes(state.params) == {np.dtype(np.float32)}


def test_batch_norm_takes_statistics_and_normalises_in_float32():
  """flax's BatchNorm as the encoders and heads build it, in bfloat16, reads its bfloat16
  input in float32: its batch mean and variance equal the float64 ones of the same values to
  float32 accuracy, and its output is the float64 normalisation rounded once to bfloat16.

  Catches statistics or normalisation computed in bfloat16 (a flax change of default, or
  `force_float32_reductions=False` at a call site): statistics rounded to bfloat16 are off by
  up to 2^-9 relative, 20-200x the tolerances, and a bfloat16 `x - mean` of inputs around 3 with a
  spread of 0.5 loses ~1% of the output, several bfloat16 ulps."""
  x = np.random.default_rng(0).normal(3.0, 0.5, (64, 4, 4, 8))
  x16 = jnp.asarray(x, jnp.bfloat16)
  exact = np.asarray(x16, np.float64)
  # momentum 0: the running statistics become this batch's, which is what is read here.
  bn = nn.BatchNorm(use_running_average=False, momentum=0.0, epsilon=1e-5, dtype=jnp.bfloat16)
  variables = bn.init(jax.random.PRNGKey(0), x16)
  y, updates = jax.jit(lambda v: bn.apply(v, x16, mutable=['batch_stats']))(variables)
  stats = updates['batch_stats']
  mean, var = exact.mean(axis=(0, 1, 2)), exact.var(axis=(0, 1, 2))
  assert stats['mean'].dtype == stats['var'].dtype == jnp.float32
  np.testing.assert_allclose(stats['mean'], mean, rtol=1e-5)
  # E[x^2] - E[x]^2 (flax's fast variance) cancels by (mean / std)^2 = 36: 1e-4 covers it.
  np.testing.assert_allclose(stats['var'], var, rtol=1e-4)
  assert y.dtype == jnp.bfloat16
  normalised = (exact - mean) / np.sqrt(var + 1e-5)
  # Rounding to nearest moves a value by at most half an ulp, 2^-9 of itself: 2^-8 allows
  # the float32 result to sit on the other side of a rounding boundary.
  np.testing.assert_allclose(np.asarray(y, np.float64), normalised, rtol=2.0 ** -8, atol=1e-6)


def test_heads_return_float32_and_dino_logits_are_accumulated_in_float32():
  """The projection MLP and DINO's head return float32 from bfloat16 compute, and DINO's
  weight-normalised last layer returns its float32 accumulation of the bfloat16 products,
  not a bfloat16 rounding of it.

  Catches a head returning bfloat16 embeddings, or DINO's last layer rounding its cosines to
  bfloat16 (2^-9 of |y|, 500x the float32 tolerance here): the teacher divides them by 0.04,
  where that rounding is logit noise of up to 0.05."""
  x = jnp.zeros((16, 24))
  for head in (ProjectionMLP(hidden_dim=32, output_dim=8, dtype=jnp.bfloat16),
               DINOHead(output_dim=64, hidden_dim=32, bottleneck_dim=16, dtype=jnp.bfloat16)):
    out, _ = jax.eval_shape(head.init_with_output, jax.random.PRNGKey(0), x)
    assert out.dtype == jnp.float32, type(head).__name__

  # Columns of +-1/4 in 16 dimensions have norm 1 exactly, so the layer's directions are the
  # kernel itself, exact in bfloat16; unit rows near a column give outputs near 1, as a
  # trained head's cosines.
  signs = np.sign(np.random.default_rng(0).normal(size=(16, 64)))
  kernel = 0.25 * signs
  rows = kernel[:, :16].T + 0.1 * np.random.default_rng(1).normal(size=(16, 16))
  rows /= np.linalg.norm(rows, axis=1, keepdims=True)
  layer = WeightNormDense(64, dtype=jnp.bfloat16)
  y = jax.jit(layer.apply)({'params': {'kernel': jnp.asarray(kernel, jnp.float32)}},
                           jnp.asarray(rows, jnp.float32))
  assert y.dtype == jnp.float32
  rows16 = np.asarray(jnp.asarray(rows, jnp.float32).astype(jnp.bfloat16), np.float64)
  expected = rows16 @ kernel
  assert np.abs(expected).max() > 0.9
  # A float32 sum of 16 products of at most 1/4: within 16 x 2^-24 of the exact one.
  np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=0, atol=1e-6)


@functools.cache
def _loss_inputs() -> dict[str, jnp.ndarray]:
  """float32 inputs of the loss functions, by name: embeddings, unit vectors, a bank or queue,
  head outputs on three crops (DINO's, SwAV's), a centre, codes, prototype scores (cosines).
  Whatever a case computes from them before the loss would run in the inputs' dtype, so it
  only selects inputs."""
  k = jax.random.split(jax.random.PRNGKey(0), 8)
  unit = lambda key, shape: info_nce.l2_normalize(jax.random.normal(key, shape))
  crops = [jax.random.normal(k[5 + i], (8, 10)) * 3 for i in range(3)]
  return {
      'z1': jax.random.normal(k[0], (8, 16)), 'z2': jax.random.normal(k[1], (8, 16)) + 0.5,
      'bank': jax.random.normal(k[2], (12, 16)),
      'q': unit(k[3], (8, 16)), 'k': unit(k[4], (8, 16)),
      'crop1': crops[0], 'crop2': crops[1], 'crop3': crops[2],
      'teacher1': crops[0] + 0.3, 'teacher2': crops[1] - 0.2,
      'center': jnp.linspace(-0.5, 0.5, 10),
      'codes1': jax.nn.softmax(crops[1]), 'codes2': jax.nn.softmax(crops[0]),
      'scores': crops[0] / 3, 'extra_scores': crops[2] / 3,
  }


# name: (loss function of float arrays, the names of its inputs in `_loss_inputs`, whether it
# has a gradient).
LOSS_CASES = {
    'nt_xent': (lambda a, b: info_nce.nt_xent(a, b, 0.1), ('z1', 'z2'), True),
    'hard_negatives': (lambda a, b: negatives.debiased_nt_xent(a, b, 0.1, 0.1, 1.0),
                       ('z1', 'z2'), True),
    'info_nce_with_negatives': (
        lambda a, b, c: info_nce.info_nce_with_negatives(a, b, c, 0.1), ('q', 'k', 'bank'),
        True),
    'queue_info_nce': (lambda a, b, c: moco.queue_info_nce(a, b, c, 0.2),
                       ('z1', 'z2', 'bank'), True),
    'batch_info_nce': (lambda a, b: moco.batch_info_nce(a, b, 0.2), ('z1', 'z2'), True),
    'normalized_regression': (regression.normalized_regression, ('z1', 'z2'), True),
    'negative_cosine': (regression.negative_cosine, ('z1', 'z2'), True),
    'embedding_spread': (regression.embedding_spread, ('z1',), False),
    'barlow_twins': (lambda a, b: barlow_twins.barlow_twins_loss(a, b, 0.005), ('z1', 'z2'),
                     True),
    'vicreg': (vicreg.vicreg_loss, ('z1', 'z2'), True),
    'semihard_triplet': (triplet.semihard_triplet, ('z1', 'z2'), True),
    'dino_self_distillation': (
        lambda a, b, c, t1, t2, m: dino.self_distillation([a, b, c], [t1, t2], m, 0.1, 0.04),
        ('crop1', 'crop2', 'crop3', 'teacher1', 'teacher2', 'center'), True),
    'dino_update_center': (lambda t1, t2, m: dino.update_center(m, [t1, t2], 0.9),
                           ('teacher1', 'teacher2', 'center'), False),
    'sinkhorn_knopp': (lambda s, e: sinkhorn.sinkhorn_knopp(s, 0.05, 3, extra_scores=e),
                       ('scores', 'extra_scores'), False),
    'swapped_prediction': (
        lambda a, b, c, q1, q2: sinkhorn.swapped_prediction([a, b, c], [q1, q2], 0.1),
        ('crop1', 'crop2', 'crop3', 'codes1', 'codes2'), True),
    'nearest_neighbours': (queue.nearest_neighbours, ('q', 'bank'), False),
}


@pytest.mark.parametrize('name', sorted(LOSS_CASES))
def test_loss_computes_in_float32_from_bfloat16_inputs(name):
  """Every loss function given bfloat16 embeddings (scores, queues, centres) computes in
  float32: its outputs are float32 and equal, to float32 rounding, the float32 computation on
  the same values, and so does its gradient (rounded back to the input's bfloat16).

  Catches a loss that computes in its inputs' dtype (a missing `precision.to_float32` on
  entry: bfloat16 normalisation, similarities, softmax, Sinkhorn or correlation sums), whose
  outputs are then bfloat16 and off by ~1e-3 relative; and a cast that stops the gradient."""
  loss_fn, input_names, differentiable = LOSS_CASES[name]
  inputs16 = tuple(_loss_inputs()[n].astype(jnp.bfloat16) for n in input_names)
  inputs32 = tuple(x.astype(jnp.float32) for x in inputs16)  # the same values

  @jax.jit
  def outputs_and_gradients(*xs):
    if not differentiable:
      return loss_fn(*xs), ()
    first_output = lambda *ys: jax.tree.leaves(loss_fn(*ys))[0]
    return loss_fn(*xs), jax.grad(first_output, tuple(range(len(xs))))(*xs)

  (out16, grads16), (out32, grads32) = (outputs_and_gradients(*inputs16),
                                        outputs_and_gradients(*inputs32))
  assert floating_dtypes(out16) == {np.dtype(np.float32)}, floating_dtypes(out16)
  harness.assert_trees_close(out16, out32, rtol=1e-6, atol=1e-7, what=f'{name} ')
  if not differentiable:
    return
  assert all(g.dtype == jnp.bfloat16 for g in grads16)
  scale = max(float(jnp.abs(g).max()) for g in grads32)
  assert scale > 0
  for g16, g32 in zip(grads16, grads32):
    # The float32 gradient rounded to bfloat16, give or take one ulp (2^-8) where the two
    # programs' last float32 bits straddle a rounding boundary.
    np.testing.assert_allclose(np.asarray(g16, np.float32), np.asarray(g32, np.float32),
                               rtol=2.0 ** -8, atol=1e-6 * scale, err_msg=f'{name} gradient')


# ------------------------------------------------------------- bfloat16 against float32


def _method_setup(name: str):
  """(float32 method, bfloat16 method, params, batch_stats, target, method_state, views):
  the float32 initialisation and views of the method's shrunk config, shared by both. Call
  it inside `harness.tiny_vit_registered()`."""
  config = _shrunk_config(name, batch_size=BATCH)
  method, params, batch_stats, target, state = harness.init_method(config)
  views = harness.make_views(config, method, BATCH)
  if name == 'deepcluster_v2':
    state = _clustered(state)  # at initialisation it has no clusters: its loss is 0
  method16 = harness.build_method(bfloat16_config(config))
  return method, method16, params, batch_stats, target, state, views


def _clustered(state: dict) -> dict:
  """DeepCluster-v2's state after a k-means: every example in a cluster, unit centroids."""
  rng = np.random.default_rng(0)
  assignments = np.asarray(state['assignments'])
  centroids = {}
  for head, c in state['centroids'].items():
    c = rng.normal(size=c.shape)
    centroids[head] = jnp.asarray(c / np.linalg.norm(c, axis=1, keepdims=True), jnp.float32)
  k = min(c.shape[0] for c in centroids.values())
  return {**state, 'centroids': centroids,
          'assignments': jnp.asarray(rng.integers(0, k, assignments.shape), jnp.int32)}


def _check_close(actual, expected, tolerances, what: str):
  """Loss and gradients of `actual` within `tolerances` (loss, gradient) of `expected`, both
  results of `sharded_loss_and_grads`; the loss and gradients finite."""
  loss_tol, grad_tol = tolerances
  assert np.isfinite(flat(actual[:2])).all(), f'{what}: not finite'
  assert loss_error(actual[0], expected[0]) <= loss_tol, (
      f'{what}: loss {float(actual[0])} vs {float(expected[0])}')
  grad_error = relative_error(actual[1], expected[1])
  assert grad_error <= grad_tol, f'{what}: gradient error {grad_error:.3g}'


def _check_bfloat16_against_float32(bf16, f32, name: str, what: str):
  """`bf16`'s loss and gradients float32, not float32's to the last bit (the switch is not
  ignored), and within `TOLERANCES[name]` of `f32`'s."""
  assert bf16[0].dtype == np.float32
  assert floating_dtypes(bf16[1]) == {np.dtype(np.float32)}
  assert not np.array_equal(flat(bf16[1]), flat(f32[1])), f'{what}: bfloat16 gave float32\'s'
  _check_close(bf16, f32, TOLERANCES[name], what)


def _slow_unless(names, default):
  """pytest params for `names`, marked slow except those in `default`: every method is
  checked by `pytest -m slow`, a representative few by the default suite (each method
  compiles its step twice or three times: 10-15 s of CPU)."""
  return [pytest.param(n, marks=() if n in default else pytest.mark.slow) for n in names]


# Methods whose loss has cross-device terms: gathered negatives (SimCLR), Sinkhorn's sums over
# the global batch (SwAV), the cross-correlation's psum (Barlow Twins), and BatchNorm
# synchronised in every network (all of them; BYOL's target network too).
COLLECTIVE_METHODS = ('simclr', 'swav', 'barlow_twins', 'byol')
OTHER_METHODS = tuple(sorted(set(METHODS) - set(COLLECTIVE_METHODS)))


@pytest.mark.parametrize('name', _slow_unless(OTHER_METHODS, default=('vicreg',)))
def test_method_loss_and_gradients_in_bfloat16_match_float32(name):
  """From the same float32 parameters and views, the bfloat16 method's loss and gradients
  are within `TOLERANCES[name]` of float32's, finite and float32. (The methods of
  COLLECTIVE_METHODS are checked so by `test_bfloat16_on_8_devices_matches_1_device`.)

  Catches a bfloat16-only error in a method's wiring: a cast that blocks the gradient of part
  of the network, a NaN from a bfloat16 overflow, a loss reading a bfloat16 output, a
  bfloat16 loss; and the dtype switch ignored (the results would be float32's)."""
  with harness.tiny_vit_registered():
    method, method16, *args = _method_setup(name)
    f32 = harness.sharded_loss_and_grads(method, *args, 1)
    bf16 = harness.sharded_loss_and_grads(method16, *args, 1)
  _check_bfloat16_against_float32(bf16, f32, name, f'{name} bfloat16 vs float32')


# 8 devices against 1, both bfloat16: (loss, gradient) tolerances, 4-5x the largest
# differences measured over seeds 0-2 (losses: 1.3e-4 at most; gradients in the comments).
DEVICE_TOLERANCES = {
    'simclr': (1e-3, 0.03),        # 8.2e-3
    'swav': (1e-3, 0.01),          # 1.9e-3
    'barlow_twins': (1e-3, 0.2),   # 4.3e-2
    'byol': (1e-3, 0.1),           # 2.0e-2
}


@pytest.mark.parametrize('name', _slow_unless(COLLECTIVE_METHODS, default=('simclr',)))
def test_bfloat16_on_8_devices_matches_1_device(name):
  """bfloat16 on 8 devices and on 1, from the same float32 parameters and global batch:
  each within the method's bfloat16 tolerance of float32 on 1 device (as
  `check_devices_agree` holds float32 runs to float64 within float32's rounding), and the two
  within `DEVICE_TOLERANCES[name]` of each other, metrics, BatchNorm statistics and method
  state included.

  The two bfloat16 runs are not equal: the float32 sums over devices (BatchNorm statistics,
  psums) are taken in another order, and their last-bit differences flip roundings to
  bfloat16 downstream. Measured over seeds 0-2: gradients 0.2-0.8% apart for SimCLR, 0.2% for
  SwAV, 0.4-2% for BYOL and 0.3-4% for Barlow Twins (whose views go through the network one
  by one, each view's BatchNorm statistics flipping roundings of its own), losses within
  1.3e-4, metrics 2.7e-4, BatchNorm statistics 4e-5.
  Catches a cross-device error that shows only in bfloat16 (a psum or gather of bfloat16
  values), and any collective dropped: with SimCLR's negatives not gathered the loss is 9x
  and the gradients 140% off."""
  method, method16, *args = _method_setup(name)
  f32 = harness.sharded_loss_and_grads(method, *args, 1)
  one = harness.sharded_loss_and_grads(method16, *args, 1)
  many = harness.sharded_loss_and_grads(method16, *args, 8)
  _check_bfloat16_against_float32(one, f32, name, f'{name} 1 device vs float32')
  _check_bfloat16_against_float32(many, f32, name, f'{name} 8 devices vs float32')
  loss_tol, grad_tol = DEVICE_TOLERANCES[name]
  _check_close(many, one, (loss_tol, grad_tol), f'{name} 8 devices vs 1 device')
  for i, part in ((2, 'metrics'), (3, 'batch_stats'), (4, 'method_state')):
    if flat(one[i]).size:
      error = relative_error(many[i], one[i])
      assert error <= grad_tol, f'{name} {part}: 8 devices vs 1 device {error:.3g}'


# ------------------------------------------------------------------- a short training run

STEPS = 40
TRAIN_BATCH = 64


def _training_losses(config) -> np.ndarray:
  """The loss of each of STEPS trainer steps on the first Fashion-MNIST training images, one
  device."""
  built, state, step = harness.build_experiment(config, num_devices=1)
  source = sources.get_source(config.data.name, config.data.train_split, config.data.data_dir)
  images = source.images[:STEPS * TRAIN_BATCH]
  losses = []
  for i in range(STEPS):
    batch = parallel.global_batch_from_host(images[i * TRAIN_BATCH:(i + 1) * TRAIN_BATCH],
                                            built.mesh)
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  return np.array(losses)


@pytest.mark.slow  # 2 trainer compilations and 80 steps, ~50 s: `pytest -m slow`
def test_short_bfloat16_run_learns_like_float32():
  """SimCLR (the tiny ConvNet, LARS) trained for 40 steps on Fashion-MNIST in bfloat16 and in
  float32, on the same batches and augmentations: the loss falls from ~6.4 by over 1.5 in both,
  and the mean loss of the last 10 steps is within 0.1 of float32's.

  Measured: both fall from 6.39 to 4.25 (last 10 steps), 0.013 apart; the steps' losses are at
  most 0.04 apart. Catches a bfloat16 run that does not learn or learns worse: weights or
  optimizer state in bfloat16 swallow LARS's updates (1e-3 of a weight, below bfloat16's
  2^-8), a gradient blocked by a cast, a diverging bfloat16 overflow."""
  config = harness.shrink(harness.load_config('simclr'), batch_size=TRAIN_BATCH)
  config.total_steps = STEPS
  # LARS scales each layer's step to lr x 0.001 of its norm: at the recipe's lr 40 steps
  # barely move the encoder (as `check_short_lars_run_learns`).
  config.optimizer.base_lr = 4.8
  f32 = _training_losses(config)
  bf16 = _training_losses(bfloat16_config(config))
  print(f'last 10 steps: float32 {f32[-10:].mean():.4f}, bfloat16 {bf16[-10:].mean():.4f}; '
        f'largest step difference {np.abs(bf16 - f32).max():.4f}')
  for losses in (f32, bf16):
    assert losses[0] - losses[-10:].mean() > 1.5, losses
  assert abs(bf16[-10:].mean() - f32[-10:].mean()) < 0.1
