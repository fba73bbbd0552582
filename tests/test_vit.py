"""Vision Transformer encoders (`ssl_jax.models.vit`): sizes against timm, pooling, position
embeddings (MoCo v3's sin-cos, interpolation), dtype, stochastic depth, LayerScale, the frozen
patch embedding, initialisation, the registry and configs, one method's train step on 1 and 8
devices, and the BatchNorm refresh of an encoder without BatchNorm. Each test says which bug
it catches."""

from __future__ import annotations

import functools
import pathlib
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ssl_jax import config_lib, configs, models, optim
from ssl_jax.configs import common
from ssl_jax.evaluation import batch_norm
from ssl_jax.methods import RunLength, build_method
from ssl_jax.models import build_encoder
from ssl_jax.models.vit import SIZES, Block, ViT, resize_position_embedding
from ssl_jax.models.vit import sincos_2d_position_embedding

import method_harness as mh

RNG = jax.random.PRNGKey(0)
TINY = dict(width=16, depth=2, num_heads=2, patch_size=4)


def _images(shape, seed=0):
  return jax.random.uniform(jax.random.PRNGKey(seed), shape)


def _num_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# Jitted: one compilation runs faster than the op-by-op dispatch of an eager apply.

def _init(model, x):
  return jax.jit(lambda x: model.init(RNG, x, train=False))(x)


def _apply(model, variables, x, rngs=None, **kwargs):
  return jax.jit(lambda v, x, r: model.apply(v, x, rngs=r, **kwargs))(variables, x, rngs)


@pytest.fixture(scope='module')
def tiny_variables():
  """The variables of ViT(**TINY) on 16-pixel inputs: the same tree whatever the pooling,
  dtype or drop-path rate, initialised once (drawing them compiles slowly on CPU)."""
  return _init(ViT(**TINY), _images((2, 16, 16, 1)))


def _block_inputs(model, variables, x, skip_blocks=False, **kwargs):
  """(output, {block name: its input}), recorded as the model runs; `skip_blocks` makes every
  block the identity (cheap to compile, for what comes before them)."""
  def run(variables, x):
    inputs = {}

    def interceptor(next_fun, args, kwargs_, context):
      if context.method_name == '__call__' and (context.module.name or '').startswith('block_'):
        inputs[context.module.name] = args[0]
        if skip_blocks:
          return args[0]
      return next_fun(*args, **kwargs_)

    with nn.intercept_methods(interceptor):
      out = model.apply(variables, x, **kwargs)
    return out, inputs

  return jax.jit(run)(variables, x)


# -------------------------------------------------------------------------------- sizes

# timm's vit_{tiny,small,base,large}_patch16_224 at 224 pixels, 3 channels, without the
# 1000-class head: class token and learned position embedding included.
TIMM_PARAMS = {'vit_tiny': 5_524_416, 'vit_small': 21_665_664, 'vit_base': 85_798_656,
               'vit_large': 303_301_632}


@pytest.mark.parametrize('name', sorted(TIMM_PARAMS))
def test_parameter_counts_match_timm(name):
  """Catches a wrong width or depth in the registry (the heads, which do not change the
  count, are checked against SIZES), a wrong MLP ratio, a missing qkv bias or LayerNorm, or
  the position embedding sized without the class token. Counted abstractly (eval_shape):
  nothing is computed."""
  config = config_lib.base_config()
  config.model.name = name
  encoder = build_encoder(config.model)
  assert (encoder.width, encoder.depth, encoder.num_heads) == SIZES[name]
  variables = jax.eval_shape(lambda x: _init(encoder, x),
                             jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  assert list(variables) == ['params']  # no BatchNorm statistics
  assert _num_params(variables) == TIMM_PARAMS[name]


# ------------------------------------------------------------------------------ pooling

@pytest.mark.parametrize('pool', ['cls', 'gap'])
def test_pooling_and_output(pool, tiny_variables):
  """Catches pooling the wrong token, averaging the class token with the patches for 'gap',
  or a missing final LayerNorm: the features are recomputed from the last block's output."""
  model = ViT(**TINY, pool=pool)
  x = _images((3, 16, 16, 1))
  variables = tiny_variables
  out, state = _apply(model, variables, x, train=False, capture_intermediates=True,
                      mutable=['intermediates'])
  assert out.shape == (3, 16) and out.dtype == jnp.float32
  tokens = state['intermediates']['block_1']['__call__'][0]
  assert tokens.shape == (3, 1 + 16, 16)
  pooled = tokens[:, 0] if pool == 'cls' else tokens[:, 1:].mean(1)
  norm = variables['params']['norm']
  mean = pooled.mean(-1, keepdims=True)
  var = ((pooled - mean) ** 2).mean(-1, keepdims=True)
  expected = (pooled - mean) / jnp.sqrt(var + 1e-6) * norm['scale'] + norm['bias']
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------- position embeddings

def _mocov3_sincos(grid_size: int, embed_dim: int, temperature: float = 10000.0):
  """MoCo v3's `build_2d_sincos_position_embedding` (vits.py), line by line in numpy
  (torch.meshgrid's default indexing is 'ij'), class token row included."""
  h = w = grid_size
  grid_w = np.arange(w, dtype=np.float32)
  grid_h = np.arange(h, dtype=np.float32)
  grid_w, grid_h = np.meshgrid(grid_w, grid_h, indexing='ij')
  pos_dim = embed_dim // 4
  omega = np.arange(pos_dim, dtype=np.float32) / pos_dim
  omega = 1. / (temperature**omega)
  out_w = np.einsum('m,d->md', grid_w.flatten(), omega)
  out_h = np.einsum('m,d->md', grid_h.flatten(), omega)
  pos_emb = np.concatenate([np.sin(out_w), np.cos(out_w), np.sin(out_h), np.cos(out_h)],
                           axis=1)[None, :, :]
  pe_token = np.zeros([1, 1, embed_dim], dtype=np.float32)
  return np.concatenate([pe_token, pos_emb], axis=1)


def test_sincos_position_embedding_is_moco_v3s(tiny_variables):
  """Catches rows and columns swapped, a wrong frequency ladder, sin/cos order, or a class
  token given a non-zero embedding: the tokens entering the first block, with the patch
  embedding and class token zeroed, are MoCo v3's table exactly; no parameter is made."""
  np.testing.assert_allclose(sincos_2d_position_embedding(14, 14, 384),
                             _mocov3_sincos(14, 384)[0, 1:], rtol=1e-6, atol=1e-6)
  model = ViT(**TINY, pos_embed='sincos')
  abstract = jax.eval_shape(lambda: _init(model, _images((2, 16, 16, 1))))
  assert 'pos_embed' not in abstract['params']
  params = {k: v for k, v in tiny_variables['params'].items() if k != 'pos_embed'}
  params = jax.tree.map(jnp.zeros_like, params)
  for side in (16, 20):  # the input's own grid at another resolution (no interpolation)
    _, inputs = _block_inputs(model, {'params': params}, _images((2, side, side, 1)),
                              skip_blocks=True, train=False)
    np.testing.assert_allclose(inputs['block_0'][0], _mocov3_sincos(side // 4, 16)[0],
                               rtol=1e-6, atol=1e-6)


def test_learned_position_embedding_interpolation(tiny_variables):
  """Catches a learned embedding not resized for another resolution (a shape error), one
  resized at the training resolution (it must be exactly the stored table), a class-token row
  that moves, and a resize that does not preserve a constant (misnormalised kernel)."""
  table = jax.random.normal(RNG, (1, 1 + 16, 8))
  assert resize_position_embedding(table, (4, 4)) is table
  for grid in ((5, 5), (3, 3), (2, 6)):
    resized = resize_position_embedding(table, grid)
    assert resized.shape == (1, 1 + grid[0] * grid[1], 8)
    np.testing.assert_array_equal(resized[:, 0], table[:, 0])
  constant = jnp.full((1, 17, 8), 0.3)
  np.testing.assert_allclose(resize_position_embedding(constant, (7, 7)), 0.3, atol=1e-6)

  # In the model: patch embedding zeroed, the first block sees cls + table at 16 pixels and
  # the bicubically resized table at 20 pixels.
  model = ViT(**TINY)
  params = dict(tiny_variables['params'])
  params['patch_embed'] = jax.tree.map(jnp.zeros_like, params['patch_embed'])
  pos, cls = params['pos_embed'], params['cls_token']
  cls_row = lambda n: jnp.pad(cls, ((0, 0), (0, n), (0, 0)))  # noqa: E731
  for side, grid in ((16, (4, 4)), (20, (5, 5))):
    out, inputs = _block_inputs(model, {'params': params}, _images((2, side, side, 1)),
                                skip_blocks=True, train=False)
    assert out.shape == (2, 16)
    expected = resize_position_embedding(pos, grid) + cls_row(grid[0] * grid[1])
    if side == 16:
      np.testing.assert_array_equal(inputs['block_0'][0], (pos + cls_row(16))[0])
    np.testing.assert_allclose(inputs['block_0'][0], expected[0], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------- dtype

def test_bfloat16_computes_in_bf16_with_float32_params_and_features(tiny_variables):
  """Catches parameters created in bfloat16, features returned in bfloat16, or the dtype not
  reaching the blocks."""
  x = _images((4, 16, 16, 1))
  model16, model32 = ViT(**TINY, dtype=jnp.bfloat16), ViT(**TINY)
  abstract = lambda m: jax.eval_shape(lambda: _init(m, x))  # noqa: E731
  assert jax.tree.map(lambda s: (s.shape, s.dtype), abstract(model16)) == jax.tree.map(
      lambda s: (s.shape, s.dtype), abstract(model32))
  assert {a.dtype for a in jax.tree.leaves(abstract(model16))} == {jnp.dtype(jnp.float32)}
  variables = tiny_variables
  out16, state = _apply(model16, variables, x, train=False, capture_intermediates=True,
                        mutable=['intermediates'])
  assert state['intermediates']['block_0']['attn']['qkv']['__call__'][0].dtype == jnp.bfloat16
  assert state['intermediates']['block_1']['__call__'][0].dtype == jnp.bfloat16
  assert out16.dtype == jnp.float32
  out32 = _apply(model32, variables, x, train=False)
  np.testing.assert_allclose(out16, out32, atol=0.1)  # LayerNorm output: unit scale
  assert not np.array_equal(np.asarray(out16), np.asarray(out32))


# ---------------------------------------------- stochastic depth, LayerScale, frozen patches

def test_drop_path_only_in_training_with_a_dropout_rng(tiny_variables):
  """Catches stochastic depth applied in evaluation, or in a forward that passes no
  'dropout' rng (the methods' targets and teachers, the BatchNorm refresh: the documented
  deterministic default); and, by the sensitivity check, a drop path that never drops.
  Without an rng nothing can be dropped (`make_rng` would fail), so that output is the
  identity's. (tests/test_drop_path.py checks the masks and the methods' steps.)"""
  x = _images((8, 16, 16, 1))
  model = ViT(**TINY, drop_path_rate=0.5)
  rngs = {'dropout': jax.random.PRNGKey(3)}
  reference = _apply(model, tiny_variables, x, train=True)
  np.testing.assert_array_equal(_apply(model, tiny_variables, x, train=False, rngs=rngs),
                                reference)
  dropped = _apply(model, tiny_variables, x, train=True, rngs=rngs)
  assert float(jnp.abs(dropped - reference).max()) > 1e-3


def test_layer_scale():
  """Catches LayerScale gains missing, of the wrong shape or initial value, not applied to
  the residual branches, or made when layer_scale_init = 0."""
  abstract = lambda m: jax.eval_shape(lambda: _init(m, _images((2, 16, 16, 1))))  # noqa: E731
  scaled = abstract(ViT(**TINY, layer_scale_init=1e-5))['params']
  plain = abstract(ViT(**TINY))['params']
  for i in range(2):
    assert scaled[f'block_{i}']['ls1'].shape == scaled[f'block_{i}']['ls2'].shape == (16,)
  assert 'ls1' not in plain['block_0'] and _num_params(scaled) == _num_params(plain) + 4 * 16
  # One block (cheaper to initialise than the ViT): gains of 0.01 scale what both residual
  # branches add by 0.01 (to first order: the MLP's input moves by 0.01 of the attention's).
  tokens = jax.random.normal(RNG, (2, 5, 16))
  block = Block(num_heads=2, layer_scale_init=0.01)
  out, variables = jax.jit(lambda x: block.init_with_output(RNG, x, train=False))(tokens)
  for name in ('ls1', 'ls2'):
    np.testing.assert_array_equal(variables['params'][name], np.full((16,), 0.01, np.float32))
  unscaled = {k: v for k, v in variables['params'].items() if k not in ('ls1', 'ls2')}
  out_plain = jax.jit(lambda p, x: Block(num_heads=2).apply({'params': p}, x, train=False))(
      unscaled, tokens)
  assert float(jnp.abs(out_plain - tokens).max()) > 1e-3
  np.testing.assert_allclose(out - tokens, 0.01 * (out_plain - tokens), rtol=1e-2, atol=1e-6)


def test_frozen_patch_embedding_gets_no_gradient(tiny_variables):
  """Catches `vit_frozen_patch_embed` not reaching the module (through the registry) or
  the stop-gradient missing. (The train step's test checks that, unfrozen, the patch
  embedding trains.)"""
  config = config_lib.base_config()
  config.model.name = 'vit_tiny'
  config.model.vit_frozen_patch_embed = True
  model = build_encoder(config.model).clone(**{k: v for k, v in TINY.items()})
  x = _images((2, 16, 16, 1))
  params = tiny_variables['params']
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({'params': p}, x) ** 3)))(params)
  patch_grad = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads['patch_embed']))
  assert patch_grad == 0.0
  assert float(jnp.abs(grads['cls_token']).max()) > 0


def test_frozen_patch_embedding_is_left_out_of_the_optimizer(tiny_vit_registered):
  """Catches AdamW's decoupled weight decay still shrinking MoCo v3's frozen patch projection
  (the stop-gradient alone gives it zero gradients, not zero updates) and Adam moments kept
  for it; the trainer's optimizer (`experiment.build`: the method's `frozen_steps`, from the
  encoder registry's `frozen_parameters`), 5 steps of weight decay 0.5 and non-zero
  gradients for every parameter, the patch embedding's included: it keeps its initial value
  exactly and every other leaf moves. DINO's own frozen last layer is kept alongside."""
  del tiny_vit_registered
  config = mh.shrink(mh.load_config('moco_v3', 'backbone=vit_small'), crop=16)
  assert config.model.vit_frozen_patch_embed  # the recipe's
  config.model.name, config.model.patch_size = 'vit_test', 4
  config.optimizer.weight_decay, config.optimizer.warmup_epochs = 0.5, 0.0
  built, state, _ = mh.build_experiment(config, 1)
  params = jax.device_get(state.params)
  kernel = params['encoder']['patch_embed']['kernel']
  assert not any(np.shape(leaf) == kernel.shape for leaf in jax.tree.leaves(state.opt_state))
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
  update = jax.jit(built.tx.update)
  opt_state, trained = state.opt_state, params
  for _ in range(5):
    updates, opt_state = update(grads, opt_state, trained)
    trained = optax.apply_updates(trained, updates)
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), trained,
                       params)
  assert moved.pop('encoder').pop('patch_embed') == {'kernel': False, 'bias': False}
  assert all(jax.tree.leaves(moved)), moved

  dino = mh.load_config('dino', 'backbone=vit_small,dataset=tfds:imagenet2012')
  dino.model.vit_frozen_patch_embed = True  # its last layer: frozen for 1 epoch
  frozen = build_method(dino, RunLength(total_steps=100, steps_per_epoch=10)).frozen_steps()
  assert frozen == {('encoder', 'patch_embed'): optim.FOREVER, ('head', 'last_layer'): 10}


def test_initialisation_follows_timm_and_dino(tiny_variables):
  """Catches flax's default initialisers left in place (LeCun normal Linear weights, of
  standard deviation 1 / sqrt(fan_in): 0.125 to 0.25 here, not 0.02), non-zero biases, or
  LayerNorm not ones/zeros."""
  params = tiny_variables['params']
  blocks = [params['block_0'], params['block_1']]
  weights = [params['pos_embed'], params['cls_token']] + [
      w for b in blocks for w in (b['attn']['qkv']['kernel'], b['attn']['proj']['kernel'],
                                  b['fc1']['kernel'], b['fc2']['kernel'])]
  weights = np.concatenate([np.ravel(w) for w in weights])
  assert weights.size > 6000
  # jax's truncated normal: cut at 2 sigma, sigma = 0.02 x 0.88 after the cut.
  assert np.abs(weights).max() <= 0.04 + 1e-7
  assert 0.0170 < weights.std() < 0.0182, weights.std()
  for b in blocks:
    for bias in (b['attn']['qkv']['bias'], b['attn']['proj']['bias'], b['fc1']['bias'],
                 b['fc2']['bias']):
      np.testing.assert_array_equal(bias, 0.0)
    for norm in (b['norm1'], b['norm2']):
      np.testing.assert_array_equal(norm['scale'], 1.0)
      np.testing.assert_array_equal(norm['bias'], 0.0)
  np.testing.assert_array_equal(params['norm']['scale'], 1.0)
  np.testing.assert_array_equal(params['norm']['bias'], 0.0)
  np.testing.assert_array_equal(params['patch_embed']['bias'], 0.0)
  # The patch embedding: LeCun normal, std 1 / sqrt(fan_in) = 1 / 4 for 4 x 4 x 1 patches.
  assert 0.2 < float(np.std(params['patch_embed']['kernel'])) < 0.3


# ---------------------------------------------------------------------- config and registry

def test_validate_checks_vit_fields():
  """Catches a crop (or local crop, or evaluation size) not a whole number of patches passing
  validation, and unknown pool / position-embedding names or drop-path rates."""
  config = mh.load_config('simclr', 'backbone=vit_small')
  config_lib.validate(config, 8)
  config.augment.crop_size = 18
  config.model.vit_pool = 'max'
  config.model.vit_pos_embed = 'rope'
  config.model.drop_path_rate = 1.0
  config.model.patch_size = 4
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(config, 8)
  message = str(error.value)
  assert 'augment.crop_size=18 is not a multiple of model.patch_size=4' in message
  assert 'e.g. 16' in message
  for field in ('vit_pool', 'vit_pos_embed', 'drop_path_rate'):
    assert f'model.{field}' in message
  config = mh.load_config('dino', 'backbone=vit_small')
  config.augment.local_crop_size = 6
  with pytest.raises(config_lib.ConfigError, match='local crop side'):
    config_lib.validate(config, 8)


# LiT takes its image tower, ViT or not, from the workdir it locks (configs/lit.py).
METHOD_CONFIGS = sorted(path.stem for path in pathlib.Path(configs.__path__[0]).glob('*.py')
                        if path.stem not in ('__init__', 'common', 'lit'))


@pytest.mark.parametrize('dataset, patch', [('fashion_mnist', 4), ('tfds:cifar10', 4),
                                            ('tfds:imagenet2012', 16)])
def test_every_method_config_takes_a_vit_backbone(dataset, patch):
  """Catches a method config that bypasses `set_backbone` or forces settings a ViT cannot
  run with (crops not a multiple of the patch, local crops included), and the patch rule."""
  assert len(METHOD_CONFIGS) >= 14
  assert [common.vit_patch_size(c) for c in (224, 96, 32, 28, 16)] == [16, 16, 4, 2, 4]
  for name in METHOD_CONFIGS:
    config = mh.load_config(name, f'backbone=vit_small,dataset={dataset}')
    assert config.model.name == 'vit_small' and config.model.patch_size == patch, name
    assert config.optimizer.name == 'adamw', name
    config_lib.validate(config, 8)
  cpu = mh.load_config('simclr', 'backbone=vit_micro')
  assert (cpu.augment.crop_size, cpu.eval.image_size, cpu.model.patch_size, cpu.num_epochs,
          cpu.optimizer.base_lr, cpu.optimizer.warmup_epochs, cpu.model.vit_pool) == (
              16, 20, 4, common.CPU_VIT_EPOCHS, common.CPU_VIT_BASE_LR,
              common.CPU_VIT_WARMUP_EPOCHS, common.CPU_VIT_POOL)
  assert mh.load_config('dino', 'backbone=vit_tiny').augment.local_crop_size == 8


def test_every_method_config_builds_a_cpu_vit():
  """Catches a method config whose Fashion-MNIST ViT (`backbone=vit_tiny`) does not build
  (its networks traced, nothing compiled) or keeps its ImageNet-scale heads (the
  8192-wide projectors, 65536 prototypes, 98304-row queue of the papers) on the CPU recipe."""
  for name in METHOD_CONFIGS:
    config = mh.load_config(name, 'backbone=vit_tiny')
    config_lib.validate(config, 8)
    m = config.method
    for field in ('projector_hidden_dim', 'projector_output_dim', 'predictor_hidden_dim'):
      assert m.get(field, 0) <= 512, (name, field)
    assert m.get('num_prototypes', 0) <= 4096 and m.get('queue_size', 0) <= 4096, name
    method = build_method(config, RunLength(total_steps=100, steps_per_epoch=10,
                                            num_examples=60000))
    size = config.augment.crop_size
    params, _, _ = jax.eval_shape(lambda r, m=method, s=size: m.init(r, jnp.zeros((2, s, s, 1))),
                                  RNG)
    assert params['encoder']['patch_embed']['kernel'].shape == (4, 4, 1, 192), name


def test_moco_v3_and_dino_vit_recipes_are_the_papers():
  """Catches the papers' ViT recipes (configs/moco_v3.py, configs/dino.py docstrings: MoCo v3
  Sec. 4-5 and its CONFIG.md; DINO Sec. 4 and main_dino.py) replaced by the generic ViT
  recipe or the ResNet one, e.g. by a refactoring of common.set_backbone."""
  c = mh.load_config('moco_v3', 'backbone=vit_small,dataset=tfds:imagenet2012')
  o, m, a = c.optimizer, c.method, c.augment
  assert (o.name, o.base_lr, o.lr_scaling, o.weight_decay, o.b1, o.b2, o.warmup_epochs) == (
      'adamw', 1.5e-4, 'linear', 0.1, 0.9, 0.999, 40.0)
  assert (c.batch_size, c.num_epochs, a.crop_size, a.crop_scale) == (4096, 300.0, 224,
                                                                    (0.08, 1.0))
  assert (c.model.patch_size, c.model.vit_pool, c.model.vit_pos_embed,
          c.model.vit_frozen_patch_embed, c.model.drop_path_rate) == (16, 'cls', 'sincos',
                                                                      True, 0.0)
  assert (m.temperature, m.target_momentum, m.projector_num_layers, m.projector_hidden_dim,
          m.projector_output_dim, m.projector_last_bn, m.predictor_hidden_dim,
          m.predictor_last_bn) == (0.2, 0.99, 3, 4096, 256, True, 4096, True)
  assert mh.load_config('moco_v3', 'backbone=vit_base,dataset=tfds:imagenet2012'
                        ).optimizer.base_lr == 1.5e-4

  c = mh.load_config('dino', 'backbone=vit_small,dataset=tfds:imagenet2012')
  o, m, a = c.optimizer, c.method, c.augment
  assert (o.name, o.base_lr, o.lr_scaling, o.weight_decay, o.warmup_epochs) == (
      'adamw', 5e-4, 'linear', 0.04, 10.0)
  assert (c.batch_size, c.num_epochs, c.model.patch_size, c.model.vit_pool,
          c.model.drop_path_rate) == (1024, 100.0, 16, 'cls', 0.1)
  assert (a.crop_size, a.crop_scale, a.num_local_crops, a.local_crop_size,
          a.local_crop_scale) == (224, (0.4, 1.0), 8, 96, (0.05, 0.4))
  assert (m.projector_hidden_dim, m.projector_output_dim, m.num_prototypes,
          m.projector_num_layers, m.norm_last_layer) == (2048, 256, 65536, 3, True)
  assert (m.student_temperature, m.teacher_temperature_start, m.teacher_temperature,
          m.teacher_warmup_epochs, m.target_momentum, m.freeze_last_layer_epochs) == (
              0.1, 0.04, 0.07, 30.0, 0.996, 1.0)


# --------------------------------------------------------------- one method's train step

@pytest.fixture(scope='module')
def vit_simclr_config():
  """SimCLR (its projector has BatchNorm, synchronised over devices) on a tiny ViT,
  registered for the test as 'vit_test'. Mean-pooled: see the train step's test."""
  config = mh.shrink(mh.load_config('simclr', 'backbone=vit_tiny'), crop=16)
  config.model.name = 'vit_test'
  config.model.patch_size = 4
  config.model.vit_pool = 'gap'
  config.method.projector_hidden_dim, config.method.projector_output_dim = 16, 8
  config.total_steps, config.optimizer.warmup_epochs = 10, 0.0  # the first step moves
  # Stochastic depth on, through the trainer's step: its masks must not depend on the device
  # count either (tests/test_drop_path.py checks them in detail).
  config.model.drop_path_rate = 0.5
  # Colour augmentations add compile time and nothing to what is tested here.
  config.augment.jitter_prob = config.augment.grayscale_prob = config.augment.blur_prob = 0.0
  return config


@pytest.fixture(scope='module')
def tiny_vit_registered():
  tiny = functools.partial(models._vit, TINY['width'], 2, 2)  # pylint: disable=protected-access
  with mock.patch.dict(models.ENCODERS, {'vit_test': tiny}):
    yield


@pytest.fixture(scope='module')
def vit_simclr_runs(vit_simclr_config, tiny_vit_registered):
  """{devices: (states, metrics)} of one train step on 1 and on 8 devices."""
  del tiny_vit_registered
  return {n: mh.trainer_steps(vit_simclr_config.copy_and_resolve_references(), 1, num_devices=n)
          for n in (1, 8)}


@pytest.mark.slow  # 30 s: `pytest -m slow`
def test_train_step_on_1_and_8_devices(vit_simclr_config, vit_simclr_runs):
  """Catches a ViT that does not run through a method's sharded train step, a non-finite
  loss, or a result that depends on the device count (statistics of one shard, a missing
  psum, drop-path masks drawn per device): loss and gradients agree to float32 rounding.

  Mean-pooled, as the class token at initialisation is ill-conditioned in float32: its
  features barely differ between images (the token's own embedding dominates), and the
  projector's BatchNorm scales those differences, rounding included, up to unit variance;
  against float64, 1 and 8 devices alike then get the gradients 1-2 % wrong, so a
  comparison would need a tolerance that catches nothing. Mean-pooled, both are within the
  harness's float32 bound (u R, about 1e-3 of each leaf here).
  """
  config = vit_simclr_config
  (states1, metrics1), (states8, metrics8) = vit_simclr_runs[1], vit_simclr_runs[8]
  loss1, loss8 = float(metrics1[0]['loss']), float(metrics8[0]['loss'])
  assert np.isfinite(loss1) and np.isfinite(loss8)
  assert 'encoder' not in states1[1].batch_stats  # the ViT has no BatchNorm
  lr = config.optimizer.base_lr * config.batch_size / 256
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), states1[1].params,
                       states1[0].params)
  assert min(jax.tree.leaves(moved['encoder']['patch_embed'])) > 0.5 * lr
  # The loss and the gradients, through AdamW's moments (mu = 0.1 g, nu = 0.001 g^2 after
  # one step), within twice the harness's float32 bound (each run is off by up to once
  # that), whose sqrt(R) term covers the final LayerNorm's bias: its exact gradient is zero
  # (the projector's BatchNorm drops a shift of all features), so both runs hold rounding.
  length = 2 * config.batch_size * config.augment.crop_size ** 2
  for what, one, many in (('loss', loss1, loss8),
                          ('opt_state', states1[1].opt_state, states8[1].opt_state)):
    tolerance = jax.tree.map(lambda t: 2 * t, mh.float32_tolerance(one, length))
    mh.assert_close_to_float64(many, one, length, what=what, tolerance=tolerance)
  # One Adam step is at most lr: a gradient component that is ~0 in exact arithmetic (the key
  # bias's: q . b_k is the same for every key, and softmax drops it) becomes a step of up to
  # lr either way, from its rounding alone.
  mh.assert_trees_close(states8[1].params, states1[1].params, rtol=0, atol=2.01 * lr,
                        what='params')


def test_bn_refresh_is_a_no_op_without_encoder_batchnorm(vit_simclr_config,
                                                         tiny_vit_registered):
  """Catches the random-init BatchNorm refresh raising (or changing anything) for an encoder
  without BatchNorm; it must still raise for a network without an 'encoder'."""
  del tiny_vit_registered
  config = vit_simclr_config
  # The initial state, as the random-init baseline's (no step: nothing to compile).
  state = jax.device_get(mh.build_experiment(config.copy_and_resolve_references(), 1)[1])
  params, batch_stats = state.params, state.batch_stats
  assert 'encoder' not in batch_stats and 'projector' in batch_stats
  images = np.zeros((8, 16, 16, 1), np.uint8)
  refreshed = batch_norm.refreshed_encoder_batch_stats(config, params, batch_stats, images)
  assert refreshed is batch_stats
  with pytest.raises(ValueError, match="no 'encoder'"):
    batch_norm.refreshed_encoder_batch_stats(
        config, {'projector': params['projector']}, batch_stats, images)
