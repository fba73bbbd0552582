"""Encoders and heads: published parameter counts, output shapes, zero-init residuals,
BatchNorm synchronised across devices, and bfloat16 computation."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from ssl_jax import parallel
from ssl_jax.models import ConvNet, ResNet18, ResNet34, ResNet50, build_encoder
from ssl_jax.models.heads import ProjectionMLP
from ssl_jax.models.resnet import Bottleneck

# Initialisation keys: the RBG generator compiles far faster on CPU than threefry, and which
# random numbers the initialisers draw is irrelevant here.
RNG = jax.random.key(0, impl='unsafe_rbg')


def _images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _num_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _init(model, x):
  return jax.jit(model.init)(RNG, x)


def _apply(model, variables, x, **kwargs):
  return jax.jit(lambda v, x: model.apply(v, x, **kwargs))(variables, x)


def _abstract_init(model, shape):
  return jax.eval_shape(model.init, RNG, jax.ShapeDtypeStruct(shape, jnp.float32))


def _random_variables(model, shape, seed=0):
  """Variables of `model` drawn with numpy (no XLA compile of the initialisers): He-scaled
  kernels, BN scales around 1 (none zero, so every block contributes), small biases and
  running statistics away from their initial values."""
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    if name == 'kernel':
      fan_in = int(np.prod(s.shape[:-1]))
      value = rng.normal(size=s.shape) * np.sqrt(2.0 / fan_in)
    elif name in ('scale', 'var'):
      value = rng.uniform(0.5, 1.5, size=s.shape)
    else:  # bias, mean
      value = rng.normal(size=s.shape) * 0.1
    return jnp.asarray(value, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, _abstract_init(model, shape))


@pytest.fixture(scope='module')
def resnet18_tiny():
  """A really initialised tiny ResNet-18 (small-image stem), shared by the init tests."""
  model = ResNet18(width=4, small_images=True)
  return model, _init(model, jnp.zeros((1, 8, 8, 3)))


# ------------------------------------------------------------------------- parameter counts

# torchvision's counts include the 1000-way fc layer: D * 1000 weights + 1000 biases.
TORCHVISION_RESNET18 = 11_689_512
TORCHVISION_RESNET50 = 25_557_032


@pytest.mark.parametrize('cls, torchvision_count, feature_dim, trunk_count', [
    (ResNet18, TORCHVISION_RESNET18, 512, 11_176_512),
    (ResNet50, TORCHVISION_RESNET50, 2048, 23_508_032),
])
def test_resnet_trunk_has_published_parameter_count(cls, torchvision_count, feature_dim,
                                                      trunk_count):
  assert torchvision_count - (feature_dim * 1000 + 1000) == trunk_count
  variables = _abstract_init(cls(width=64), (1, 64, 64, 3))
  # BN scale and bias are parameters; running statistics are not (as in torchvision).
  assert _num_params(variables['params']) == trunk_count
  # Running mean + variance: one pair per BN channel, i.e. as many as the BN scales + biases.
  flat = traverse_util.flatten_dict(variables['params'])
  bn_affine = sum(int(np.prod(v.shape)) for k, v in flat.items() if k[-1] in ('scale', 'bias'))
  assert _num_params(variables['batch_stats']) == bn_affine
  # The trunk has no biases outside BN (convs are bias-free, as in torchvision).
  assert all(k[-2].startswith(('BatchNorm', 'stem_bn')) for k in flat if k[-1] == 'bias')


def test_small_images_stem_has_fewer_params_than_imagenet_stem():
  # 3x3 vs 7x7 stem conv on 3 input channels, 64 outputs: 64 * 3 * (49 - 9) fewer weights.
  big = _num_params(_abstract_init(ResNet18(width=64), (1, 32, 32, 3))['params'])
  small = _num_params(_abstract_init(ResNet18(width=64, small_images=True),
                                     (1, 32, 32, 3))['params'])
  assert big - small == 64 * 3 * (49 - 9)


# ---------------------------------------------------------------------------- output shapes

def _shapes_with_intermediates(model, shape, train=False):
  def run(x):
    variables = _init(model, x)
    return model.apply(variables, x, train=train, capture_intermediates=True,
                       mutable=['intermediates'])
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.eval_shape(run, x)


@pytest.mark.parametrize('cls, blocks, expansion', [
    (ResNet18, 8, 8), (ResNet34, 16, 8), (ResNet50, 16, 32)])
@pytest.mark.parametrize('width', [4, 8])
def test_resnet_feature_dim(cls, blocks, expansion, width):
  out, state = _shapes_with_intermediates(cls(width=width, small_images=True), (3, 16, 16, 2))
  assert out.shape == (3, expansion * width)
  assert out.dtype == jnp.float32
  block_name = 'BasicBlock' if expansion == 8 else 'Bottleneck'
  names = [k for k in state['intermediates'] if k.startswith(block_name)]
  assert len(names) == blocks


@pytest.mark.parametrize('small_images, stem_hw, last_hw', [(True, 28, 4), (False, 14, 1)])
def test_resnet_stems_spatial_sizes(small_images, stem_hw, last_hw):
  model = ResNet18(width=4, small_images=small_images)
  out, state = _shapes_with_intermediates(model, (2, 28, 28, 1))
  inter = state['intermediates']
  assert inter['stem_conv']['__call__'][0].shape == (2, stem_hw, stem_hw, 4)
  # The last block's output is what the global average pool sees.
  assert inter['BasicBlock_7']['__call__'][0].shape == (2, last_hw, last_hw, 32)
  assert out.shape == (2, 32)


@pytest.mark.parametrize('widths, convs', [((4,), 1), ((4, 8), 2), ((8, 4, 6), 1)])
def test_convnet_output_dim(widths, convs):
  model = ConvNet(widths=widths, convs_per_stage=convs)
  out, state = _shapes_with_intermediates(model, (3, 16, 16, 1))
  assert out.shape == (3, widths[-1])
  assert len([k for k in state['intermediates'] if k.startswith('Conv_')]) == len(widths) * convs


def test_convnet_outputs_are_finite_and_nonnegative():
  model = ConvNet(widths=(4, 8), convs_per_stage=1)
  x = _images((4, 8, 8, 1))
  variables = _init(model, x)
  out, _ = _apply(model, variables, x, mutable=['batch_stats'])
  assert out.shape == (4, 8)
  assert np.all(np.isfinite(out)) and np.all(np.asarray(out) >= 0)  # mean of ReLU outputs
  assert float(jnp.abs(out).max()) > 0


def test_build_encoder_registry(tiny_config):
  model_cfg = tiny_config.model
  model_cfg.dtype = 'float32'
  encoder = build_encoder(model_cfg, parallel.DATA_AXIS)
  assert isinstance(encoder, ConvNet)
  assert encoder.axis_name == parallel.DATA_AXIS and encoder.widths == (4, 8)
  model_cfg.name = 'resnet50'
  model_cfg.width = 4
  model_cfg.small_images = True
  encoder = build_encoder(model_cfg)
  out = jax.eval_shape(lambda x: encoder.init_with_output(RNG, x)[0],
                       jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32))
  assert out.shape == (2, 128)
  model_cfg.name = 'vgg'
  with pytest.raises(ValueError, match='resnet18'):
    build_encoder(model_cfg)


@pytest.mark.parametrize('num_layers', [1, 2, 3])
@pytest.mark.parametrize('last_bn', [False, True])
def test_projection_mlp_structure(num_layers, last_bn):
  head = ProjectionMLP(hidden_dim=16, output_dim=8, num_layers=num_layers, last_bn=last_bn)
  x = _images((5, 12))
  variables = _init(head, x)
  out, _ = _apply(head, variables, x, mutable=['batch_stats'])
  assert out.shape == (5, 8) and out.dtype == jnp.float32
  params = variables['params']
  dense = sorted(k for k in params if k.startswith('Dense'))
  assert len(dense) == num_layers
  assert params[dense[-1]]['kernel'].shape == ((16 if num_layers > 1 else 12), 8)
  # The last linear layer has a bias only when no BN follows it.
  assert ('bias' in params[dense[-1]]) == (not last_bn)
  # The last BN has no affine parameters, but it does keep running statistics.
  num_bn_stats = len(variables.get('batch_stats', {}))
  assert num_bn_stats == num_layers - 1 + int(last_bn)
  assert len([k for k in params if k.startswith('BatchNorm')]) == num_layers - 1


def test_projection_mlp_last_bn_standardises_each_dim_in_train_mode():
  x = _images((64, 12)) * 3.0 + 1.0
  head = ProjectionMLP(hidden_dim=16, output_dim=8, num_layers=2, last_bn=True)
  variables = _init(head, x)
  out, _ = _apply(head, variables, x, mutable=['batch_stats'])
  out = np.asarray(out, np.float64)
  np.testing.assert_allclose(out.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(out.var(0), 1.0, rtol=1e-3)
  # Sensitivity: without last_bn the same head's outputs are not standardised.
  plain = ProjectionMLP(hidden_dim=16, output_dim=8, num_layers=2, last_bn=False)
  out_plain, _ = _apply(plain, _init(plain, x), x, mutable=['batch_stats'])
  out_plain = np.asarray(out_plain, np.float64)
  assert (np.abs(out_plain.mean(0)).max() > 1e-2 or
          np.abs(out_plain.var(0) - 1).max() > 1e-2)


# ---------------------------------------------------------------------- zero-init residual

def test_last_bn_scale_of_every_basic_block_is_zero_at_init(resnet18_tiny):
  _, variables = resnet18_tiny
  params = variables['params']
  blocks = [k for k in params if k.startswith('BasicBlock')]
  assert len(blocks) == 8
  for name in blocks:
    bns = sorted(k for k in params[name] if k.startswith('BatchNorm'))
    # BatchNorm_2 is the projection shortcut's, only in the blocks that change shape.
    assert bns == (['BatchNorm_0', 'BatchNorm_1', 'BatchNorm_2'] if name in (
        'BasicBlock_2', 'BasicBlock_4', 'BasicBlock_6') else ['BatchNorm_0', 'BatchNorm_1'])
    for bn_name in bns:
      bn = params[name][bn_name]
      expected_scale = 0.0 if bn_name == 'BatchNorm_1' else 1.0  # only the residual's last
      np.testing.assert_array_equal(bn['scale'], expected_scale, err_msg=f'{name}/{bn_name}')
      np.testing.assert_array_equal(bn['bias'], 0.0, err_msg=f'{name}/{bn_name}')
  np.testing.assert_array_equal(params['stem_bn']['scale'], 1.0)


def test_last_bn_scale_of_bottleneck_is_zero_at_init():
  # ResNet-50's block, initialised alone (a whole ResNet-50 is slow to compile on CPU).
  block = Bottleneck(filters=4, strides=2, conv=functools.partial(nn.Conv, use_bias=False),
                     norm=functools.partial(nn.BatchNorm, use_running_average=False))
  params = _init(block, jnp.zeros((1, 8, 8, 8)))['params']
  assert sorted(k for k in params if k.startswith('BatchNorm')) == [
      'BatchNorm_0', 'BatchNorm_1', 'BatchNorm_2', 'BatchNorm_3']
  assert params['Conv_2']['kernel'].shape == (1, 1, 4, 16)  # the 4x expansion
  for bn_name in ('BatchNorm_0', 'BatchNorm_1', 'BatchNorm_3'):
    np.testing.assert_array_equal(params[bn_name]['scale'], 1.0, err_msg=bn_name)
  np.testing.assert_array_equal(params['BatchNorm_2']['scale'], 0.0)
  # ResNet-50 wires the blocks the same way: 16 bottlenecks, each with that BatchNorm_2.
  abstract = _abstract_init(ResNet50(width=4, small_images=True), (1, 8, 8, 3))['params']
  blocks = [k for k in abstract if k.startswith('Bottleneck')]
  assert len(blocks) == 16
  stage_of_block = [0] * 3 + [1] * 4 + [2] * 6 + [3] * 3
  for i, stage in enumerate(stage_of_block):
    assert abstract[f'Bottleneck_{i}']['BatchNorm_2']['scale'].shape == (16 * 2**stage,)


@pytest.mark.parametrize('train', [True, False])
def test_blocks_are_relu_of_shortcut_at_init(resnet18_tiny, train):
  model, variables = resnet18_tiny
  x = _images((4, 8, 8, 3))
  _, state = _apply(model, variables, x, train=train, capture_intermediates=True,
                    mutable=['intermediates', 'batch_stats'])
  inter = state['intermediates']
  outs = [inter[f'BasicBlock_{i}']['__call__'][0] for i in range(8)]
  # The first block's input is ReLU(stem BN) (no max-pool with the small-image stem), and
  # with an identity shortcut a block returns ReLU(input) = input.
  stem = jnp.maximum(inter['stem_bn']['__call__'][0], 0)
  assert float(jnp.abs(stem).max()) > 0
  np.testing.assert_array_equal(outs[0], stem)
  for i in (1, 3, 5, 7):
    np.testing.assert_array_equal(outs[i], outs[i - 1], err_msg=f'BasicBlock_{i}')
  # Projection shortcuts: the block is ReLU(BN(conv1x1 stride 2 (input))).
  for i in (2, 4, 6):
    params = variables['params'][f'BasicBlock_{i}']
    shortcut = jax.lax.conv_general_dilated(
        outs[i - 1], params['Conv_2']['kernel'], (2, 2), 'SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if train:
      mean, var = shortcut.mean((0, 1, 2)), shortcut.var((0, 1, 2))
    else:
      stats = variables['batch_stats'][f'BasicBlock_{i}']['BatchNorm_2']
      mean, var = stats['mean'], stats['var']
    expected = jnp.maximum((shortcut - mean) / jnp.sqrt(var + 1e-5), 0)
    np.testing.assert_allclose(outs[i], expected, rtol=1e-4, atol=1e-4,
                               err_msg=f'BasicBlock_{i}')
    assert outs[i].shape != outs[i - 1].shape


# ------------------------------------------------------------- synchronised BN across devices

SYNC_MODELS = {
    'convnet': lambda axis: ConvNet(widths=(4, 8), convs_per_stage=1, axis_name=axis),
    'resnet18': lambda axis: ResNet18(width=4, small_images=True, axis_name=axis),
    'projection_mlp': lambda axis: ProjectionMLP(hidden_dim=8, output_dim=4, num_layers=3,
                                                 last_bn=True, axis_name=axis),
}


@pytest.mark.parametrize('name', sorted(SYNC_MODELS))
def test_sharded_batchnorm_equals_global_batch(name):
  axis = parallel.DATA_AXIS
  mesh = parallel.make_mesh(8)
  shape = (16, 6) if name == 'projection_mlp' else (16, 8, 8, 3)
  x = _images(shape, seed=1) * 2.0 + 0.5
  local_model, synced_model = SYNC_MODELS[name](None), SYNC_MODELS[name](axis)
  # Random running statistics going in, so that the momentum update is exercised.
  variables = _random_variables(local_model, shape)
  params, stats = variables['params'], variables['batch_stats']

  def apply(model, params, stats, x):
    out, updated = model.apply({'params': params, 'batch_stats': stats}, x, train=True,
                               mutable=['batch_stats'])
    return out, updated['batch_stats']

  ref_out, ref_stats = jax.jit(functools.partial(apply, local_model))(params, stats, x)

  sharded = jax.jit(jax.shard_map(
      functools.partial(apply, synced_model), mesh=mesh,
      in_specs=(P(), P(), P(axis)), out_specs=(P(axis), P())))
  out, new_stats = sharded(params, stats, x)
  assert out.shape == ref_out.shape
  # Float32 round-off only; ResNet-18 stacks 20 BNs (the last ones over 16 values each, with
  # E[x^2] - E[x]^2 variances), so it gets a little more room.
  tol = 1e-4 if name == 'resnet18' else 1e-5
  np.testing.assert_allclose(out, ref_out, rtol=tol, atol=tol)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=tol, atol=tol / 10),
               new_stats, ref_stats)
  # The statistics actually moved.
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), ref_stats, stats)
  assert min(jax.tree.leaves(moved)) > 1e-3

  # Sensitivity: per-device statistics (no axis_name) give different outputs.
  per_shard = jax.jit(jax.shard_map(
      lambda p, s, x: apply(local_model, p, s, x)[0], mesh=mesh,
      in_specs=(P(), P(), P(axis)), out_specs=P(axis)))
  out_local = per_shard(params, stats, x)
  assert float(jnp.abs(out_local - ref_out).max()) > 1e-2

  # In eval mode there is no collective: both use the running averages.
  if name == 'convnet':
    eval_ref = _apply(local_model, variables, x, train=False)
    eval_sharded = jax.jit(jax.shard_map(
        lambda v, x: synced_model.apply(v, x, train=False),
        mesh=mesh, in_specs=(P(), P(axis)), out_specs=P(axis)))(variables, x)
    np.testing.assert_allclose(eval_sharded, eval_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name, conv, bn', [('convnet', 'Conv_0', 'BatchNorm_0'),
                                             ('resnet18', 'stem_conv', 'stem_bn')])
def test_running_statistics_update(name, conv, bn):
  """running = 0.9 * running + 0.1 * batch statistic (biased variance), per channel."""
  model = SYNC_MODELS[name](None)
  x = _images((6, 8, 8, 3), seed=2) + 1.0
  variables = _random_variables(model, x.shape)
  _, state = _apply(model, variables, x, capture_intermediates=True,
                    mutable=['intermediates', 'batch_stats'])
  h = np.asarray(state['intermediates'][conv]['__call__'][0], np.float64)
  old, new = variables['batch_stats'][bn], state['batch_stats'][bn]
  np.testing.assert_allclose(new['mean'], 0.9 * old['mean'] + 0.1 * h.mean((0, 1, 2)),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new['var'], 0.9 * old['var'] + 0.1 * h.var((0, 1, 2)),
                             rtol=1e-4, atol=1e-6)
  # Eval mode leaves the statistics alone.
  _, eval_state = _apply(model, variables, x, train=False, mutable=['batch_stats'])
  jax.tree.map(np.testing.assert_array_equal, eval_state['batch_stats'],
               variables['batch_stats'])


# --------------------------------------------------------------------------------- bfloat16

def test_bfloat16_resnet_computes_in_bf16_with_float32_params():
  x = _images((4, 8, 8, 3))
  model16 = ResNet18(width=4, small_images=True, dtype=jnp.bfloat16)
  model32 = ResNet18(width=4, small_images=True)
  abstract16 = _abstract_init(model16, x.shape)
  # Parameters and running statistics are float32 whatever the computation dtype.
  assert jax.tree.map(lambda s: (s.shape, s.dtype), abstract16) == jax.tree.map(
      lambda s: (s.shape, s.dtype), _abstract_init(model32, x.shape))
  assert {leaf.dtype for leaf in jax.tree.leaves(abstract16)} == {jnp.dtype(jnp.float32)}

  variables = _random_variables(model32, x.shape)
  out16, state = _apply(model16, variables, x, capture_intermediates=True,
                        mutable=['intermediates', 'batch_stats'])
  inter = state['intermediates']
  assert inter['stem_conv']['__call__'][0].dtype == jnp.bfloat16
  assert inter['BasicBlock_3']['__call__'][0].dtype == jnp.bfloat16
  assert inter['BasicBlock_7']['Conv_0']['__call__'][0].dtype == jnp.bfloat16
  assert {leaf.dtype for leaf in jax.tree.leaves(state['batch_stats'])} == {
      jnp.dtype(jnp.float32)}
  assert out16.dtype == jnp.float32  # the features are cast back

  out32, _ = _apply(model32, variables, x, mutable=['batch_stats'])
  scale = float(jnp.abs(out32).max())
  assert scale > 0.1
  np.testing.assert_allclose(out16, out32, atol=0.05 * scale)
  assert not np.array_equal(np.asarray(out16), np.asarray(out32))


def test_bfloat16_convnet_and_projection_head():
  x = _images((8, 8, 8, 1))
  conv16 = ConvNet(widths=(4, 8), convs_per_stage=1, dtype=jnp.bfloat16)
  conv32 = ConvNet(widths=(4, 8), convs_per_stage=1)
  variables = _random_variables(conv32, x.shape)
  out16, state = _apply(conv16, variables, x, capture_intermediates=True,
                        mutable=['intermediates', 'batch_stats'])
  assert state['intermediates']['Conv_1']['__call__'][0].dtype == jnp.bfloat16
  out32, _ = _apply(conv32, variables, x, mutable=['batch_stats'])
  assert out16.dtype == jnp.float32
  np.testing.assert_allclose(out16, out32, atol=0.03 * float(jnp.abs(out32).max()))
  assert not np.array_equal(np.asarray(out16), np.asarray(out32))

  head16 = ProjectionMLP(hidden_dim=16, output_dim=8, last_bn=True, dtype=jnp.bfloat16)
  head32 = ProjectionMLP(hidden_dim=16, output_dim=8, last_bn=True)
  hv = _random_variables(head32, out32.shape)
  h16, hstate = _apply(head16, hv, out32, capture_intermediates=True,
                       mutable=['intermediates', 'batch_stats'])
  assert hstate['intermediates']['Dense_0']['__call__'][0].dtype == jnp.bfloat16
  h32, _ = _apply(head32, hv, out32, mutable=['batch_stats'])
  assert h16.dtype == jnp.float32
  np.testing.assert_allclose(h16, h32, atol=0.05)  # last_bn: unit-variance outputs
  assert not np.array_equal(np.asarray(h16), np.asarray(h32))


def test_convnet_rejects_inputs_too_small_for_its_stages():
  model = ConvNet(widths=(4, 4, 4, 4, 4, 4))
  with pytest.raises(ValueError, match='too many for inputs'):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((2, 16, 16, 1)))


@pytest.mark.parametrize('shape', [(2, 8, 8, 3), (2, 7, 5, 2)])
def test_max_pool_2x2_equals_flax_max_pool_values_and_gradient(shape):
  # Catches a wrong reshape order (pooling across rows and channels instead of 2x2 windows),
  # odd sizes not cropped as VALID padding does, and a gradient routed to the wrong element.
  from ssl_jax.models.convnet import max_pool_2x2
  x = _images(shape)  # continuous values: no ties, so the max of each window is unique
  reference = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
  np.testing.assert_array_equal(max_pool_2x2(x), reference(x))
  cotangent = _images(reference(x).shape, seed=1)
  grad = lambda f: jax.vjp(f, x)[1](cotangent)[0]
  np.testing.assert_array_equal(grad(max_pool_2x2), grad(reference))


def test_grid_average_cells_by_hand():
  # Catches cells taken in the wrong order or with the wrong bounds: 5 rows in a 2-grid are
  # rows 0-2 and 2-4 (PyTorch's adaptive average pooling), 4 columns are 0-1 and 2-3.
  from ssl_jax.models.convnet import grid_average
  x = jnp.arange(20.0).reshape(1, 5, 4, 1)
  expected = [x[0, 0:3, 0:2].mean(), x[0, 0:3, 2:4].mean(), x[0, 2:5, 0:2].mean(),
              x[0, 2:5, 2:4].mean()]
  np.testing.assert_allclose(grid_average(x, 2)[0], expected)
  np.testing.assert_allclose(grid_average(x, 1)[0], [x.mean()])
  # A map smaller than the grid (a multi-crop local crop): cells repeat single pixels, so the
  # feature size does not depend on the input size. Rows 0, 0, 1, 1 of a 2x2 map.
  small = jnp.arange(4.0).reshape(1, 2, 2, 1)
  np.testing.assert_allclose(grid_average(small, 4)[0],
                             [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3])


def test_convnet_pool_grid_feature_dim():
  model = ConvNet(widths=(4, 8), convs_per_stage=1, pool_grid=2)
  out, _ = _shapes_with_intermediates(model, (3, 16, 16, 1))
  assert out.shape == (3, 4 * 8)
