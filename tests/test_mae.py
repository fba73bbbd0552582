"""MAE: patches and the normalised-pixel target by hand, the masked-patch loss by hand (and
over devices), masks that follow each example's global row, the encoder on a subset of
patches against the plain ViT (same forward, same parameter tree), the decoder blind to
masked pixels, 8 devices against 1 and float64, exact resume (slow), and config errors that
name the fix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import method_harness as mh
from ssl_jax import config_lib, parallel
from ssl_jax.methods import build_method
from ssl_jax.methods.mae import num_visible, random_masking
from ssl_jax.models import build_encoder
from ssl_jax.models.mae_decoder import patchify, pixel_targets, unpatchify


# ------------------------------------------------------------------------------------------
# Patches and targets


def test_patch_order_by_hand():
  # A 4 x 4 image of 2 channels, pixel (r, c) = (10 (4r + c), 10 (4r + c) + 1), 2-pixel
  # patches: patch 1 is the top-right block, its pixels row by row, channels last.
  values = np.arange(16).reshape(4, 4) * 10
  image = np.stack([values, values + 1], axis=-1)[None].astype(np.float32)
  patches = np.asarray(patchify(jnp.asarray(image), 2))
  assert patches.shape == (1, 4, 8)
  np.testing.assert_array_equal(patches[0, 0], [0, 1, 10, 11, 40, 41, 50, 51])
  np.testing.assert_array_equal(patches[0, 1], [20, 21, 30, 31, 60, 61, 70, 71])
  np.testing.assert_array_equal(patches[0, 2], [80, 81, 90, 91, 120, 121, 130, 131])
  np.testing.assert_array_equal(patches[0, 3], [100, 101, 110, 111, 140, 141, 150, 151])


def test_unpatchify_inverts_patchify():
  images = jax.random.uniform(jax.random.PRNGKey(0), (2, 8, 12, 3))
  patches = patchify(images, 4)
  assert patches.shape == (2, 6, 48)
  np.testing.assert_array_equal(unpatchify(patches, (2, 3), 4), images)


def test_normalised_pixel_target_by_hand():
  # One 2 x 2 patch (0, 1, 2, 3): mean 1.5, unbiased variance (2.25 + 0.25) * 2 / 3 = 5/3
  # (PyTorch's Tensor.var, as the reference); a constant patch gives zeros, not NaN.
  images = jnp.asarray(np.stack([np.arange(4.0).reshape(2, 2),
                                 np.full((2, 2), 7.0)])[..., None])
  target = np.asarray(pixel_targets(images, 2, normalize=True))
  np.testing.assert_allclose(target[0, 0], (np.arange(4.0) - 1.5) / np.sqrt(5 / 3 + 1e-6),
                             rtol=1e-6)
  np.testing.assert_array_equal(target[1, 0], np.zeros(4))
  np.testing.assert_array_equal(pixel_targets(images, 2, normalize=False)[0, 0], np.arange(4.0))


# ------------------------------------------------------------------------------------------
# The loss

ERRORS = np.array([[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]], np.float32)
MASK = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], np.float32)


def test_loss_averages_masked_patches_only():
  # Masked: (1 + 4 + 16 + 32) / 4 = 13.25; visible: (2 + 8) / 2 = 5. The same when each of two
  # devices holds one example (the sums are over the global batch).
  method = build_method(_config())
  outputs = {'errors': jnp.asarray(ERRORS), 'mask': jnp.asarray(MASK)}
  loss, (metrics, state) = method.objective({}, {}, outputs, {}, {}, None, 0, None)
  np.testing.assert_allclose(loss, 13.25, rtol=1e-6)
  np.testing.assert_allclose(metrics['visible_patch_loss'], 5.0, rtol=1e-6)
  assert state == {}
  axis = parallel.DATA_AXIS
  sharded = jax.jit(jax.shard_map(
      lambda o: method.objective({}, {}, o, {}, {}, None, 0, axis)[0],
      mesh=parallel.make_mesh(2), in_specs=(P(axis),), out_specs=P()))
  np.testing.assert_allclose(sharded(outputs), 13.25, rtol=1e-6)


# ------------------------------------------------------------------------------------------
# Masks


def test_masks_follow_the_global_row_and_mask_the_ratio():
  key, rows, num_patches, ratio = jax.random.PRNGKey(3), 16, 16, 0.75
  keep, mask, restore = jax.device_get(random_masking(key, rows, num_patches, ratio))
  # Exactly 12 of the 16 patches masked in every example; the kept ones are the unmasked
  # ones, and `restore` puts visible-then-masked back in grid order.
  assert num_visible(num_patches, ratio) == 4 and keep.shape == (rows, 4)
  np.testing.assert_array_equal(mask.sum(axis=1), np.full(rows, 12.0))
  for i in range(rows):
    np.testing.assert_array_equal(np.flatnonzero(mask[i] == 0), np.sort(keep[i]))
    order = np.concatenate([keep[i], np.flatnonzero(mask[i])[np.argsort(restore[i][mask[i] > 0])]])
    np.testing.assert_array_equal(order[restore[i]], np.arange(num_patches))
  # Examples get different masks.
  assert len({tuple(m) for m in mask.astype(int)}) > rows // 2
  # On 8 devices (2 rows each, rows placed by the device's index) and for a block of rows
  # that starts at row 4 (a micro-batch): the same masks as the rows of the whole batch.
  axis = parallel.DATA_AXIS
  sharded = jax.jit(jax.shard_map(
      lambda k: random_masking(k, rows // 8, num_patches, ratio, None, axis),
      mesh=parallel.make_mesh(8), in_specs=(P(),), out_specs=P(axis)))
  for got, want in zip(jax.device_get(sharded(key)), (keep, mask, restore)):
    np.testing.assert_array_equal(got, want)
  block = jax.device_get(random_masking(key, 4, num_patches, ratio, first_row=4))
  for got, want in zip(block, (keep, mask, restore)):
    np.testing.assert_array_equal(got, want[4:8])


# ------------------------------------------------------------------------------------------
# Encoder and network


@pytest.fixture(autouse=True, scope='module')
def tiny_vit():
  with mh.tiny_vit_registered():  # model.name='vit_test' builds the harness's tiny ViT
    yield


def _config(**method_fields):
  config = mh.tiny_vit_config('mae')
  config.method.decoder_width = 16
  config.method.decoder_depth = 1
  config.method.decoder_num_heads = 2
  config.method.update(method_fields)
  return config


@pytest.mark.parametrize('pos_embed', ['sincos', 'learned'])
def test_encoder_parameters_are_a_plain_vits(pos_embed):
  config = _config()
  config.model.vit_pos_embed = pos_embed
  images = jnp.zeros((2, 16, 16, 1))
  params = jax.eval_shape(lambda r: build_method(config).init(r, images)[0],
                          jax.random.PRNGKey(0))
  plain = jax.eval_shape(lambda r: build_encoder(config.model).init(r, images, train=False),
                         jax.random.PRNGKey(0))['params']
  shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
  assert set(params) == {'encoder', 'decoder'}
  assert shapes(params['encoder']) == shapes(plain)


def test_encoder_on_all_or_permuted_patches_matches_the_plain_vit():
  config = _config()
  config.model.vit_pos_embed = 'learned'  # position embeddings that are parameters, too
  method, params, _, _, _ = mh.init_method(config)
  vit = build_encoder(config.model)
  enc = {'params': params['encoder']}
  x = jax.random.uniform(jax.random.PRNGKey(1), (3, 16, 16, 1))
  plain = vit.apply(enc, x, train=False)
  # The method's `encode` (what evaluation scores) is this same forward.
  np.testing.assert_array_equal(method.encode(params, {}, x), plain)
  every = jnp.broadcast_to(jnp.arange(16), (3, 16))
  np.testing.assert_array_equal(vit.apply(enc, x, train=False, keep=every), plain)
  # Tokens follow their patches: the patches in another order (each with its own position
  # embedding) give the same tokens in that order (attention is permutation-equivariant).
  tokens = vit.apply(enc, x, train=False, tokens=True)
  perm = np.stack([np.random.default_rng(i).permutation(16) for i in range(3)])
  shuffled = vit.apply(enc, x, train=False, keep=jnp.asarray(perm), tokens=True)
  assert shuffled.shape == tokens.shape == (3, 17, 16)
  np.testing.assert_allclose(shuffled[:, 0], tokens[:, 0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(shuffled[:, 1:], np.take_along_axis(
      np.asarray(tokens[:, 1:]), perm[:, :, None], axis=1), rtol=1e-5, atol=1e-5)
  # A subset: 5 tokens after the class token.
  assert vit.apply(enc, x, train=False, keep=jnp.asarray(perm[:, :5]), tokens=True).shape == (
      3, 6, 16)


def test_predictions_ignore_masked_pixels():
  # The decoder sees masked patches only as the mask token: rewriting their pixels changes
  # no prediction (the target and the loss on them do change).
  method, params, _, _, _ = mh.init_method(_config())
  network = method.network()
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 1))
  keep, mask, restore = random_masking(jax.random.PRNGKey(2), 2, 16, 0.75)
  noise = jax.random.uniform(jax.random.PRNGKey(4), x.shape)
  pixel_mask = unpatchify(jnp.repeat(mask[:, :, None], 16, axis=2), (4, 4), 4)
  x_other = jnp.where(pixel_mask > 0, noise, x)
  predict = jax.jit(lambda im: network.apply({'params': params}, im, train=False, keep=keep,
                                             restore=restore))
  np.testing.assert_array_equal(predict(x_other), predict(x))
  # Not vacuous: a visible pixel does change them.
  x_visible = jnp.where(pixel_mask > 0, x, noise)
  assert float(jnp.abs(predict(x_visible) - predict(x)).max()) > 1e-4


def test_eight_devices_agree_with_one():
  mh.check_devices_agree(_config())


@pytest.mark.slow  # three short runs: `pytest -m slow`
def test_resumed_run_ends_with_identical_state(tmp_path):
  """MAE keeps no method state, but its masks come from each step's rng: a run stopped at
  step 2 and resumed masks the same patches at steps 3 and 4 as the straight run, so it
  ends in the same state, bit for bit."""
  config = _config()
  with mh.tiny_vit_registered():
    first, resumed = mh.resumed_run_matches_straight_run(config, tmp_path)
  # Not vacuous: steps 3 and 4 trained the encoder and the decoder.
  for part in ('encoder', 'decoder'):
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first.params[part]),
                                                        jax.tree.leaves(resumed.params[part])))


# ------------------------------------------------------------------------------------------
# Configs


def _problems(config):
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(config, num_devices=1)
  return str(err.value)


def test_config_errors_name_the_fix():
  for ratio in (0.0, 1.0, 1.5):
    config = mh.load_config('mae')
    config.method.mask_ratio = ratio
    assert f'method.mask_ratio={ratio} must be in (0, 1)' in _problems(config)
  config = mh.load_config('mae', 'crop=16')
  config.method.mask_ratio = 0.95  # 16 patches: int(16 x 0.05) = 0 visible
  assert 'lower it, or use smaller patches' in _problems(config)
  config = mh.load_config('mae', 'crop=18')
  assert 'augment.crop_size=18 is not a multiple of model.patch_size=4' in _problems(config)
  assert 'use a vit_* backbone' in _problems(mh.load_config('mae', 'backbone=convnet'))
  config = mh.load_config('mae')
  config.method.decoder_num_heads = 3
  assert 'method.decoder_width=64 must be a multiple of 4' in _problems(config)


def test_recipes():
  cpu = mh.load_config('mae')
  config_lib.validate(cpu, num_devices=1)
  assert (cpu.model.name, cpu.augment.crop_size, cpu.model.patch_size) == ('vit_micro', 28, 4)
  paper = mh.load_config('mae', 'dataset=tfds:imagenet2012')
  config_lib.validate(paper, num_devices=1)
  m, o, a = paper.method, paper.optimizer, paper.augment
  assert (paper.model.name, paper.model.patch_size, a.crop_size) == ('vit_base', 16, 224)
  assert (m.mask_ratio, m.norm_pix_loss) == (0.75, True)
  assert (m.decoder_width, m.decoder_depth, m.decoder_num_heads) == (512, 8, 16)
  assert (o.name, o.base_lr, o.lr_scaling, o.b1, o.b2, o.weight_decay) == (
      'adamw', 1.5e-4, 'linear', 0.9, 0.95, 0.05)
  assert (paper.batch_size, paper.num_epochs, o.warmup_epochs) == (4096, 800.0, 40.0)
  assert tuple(a.crop_scale) == (0.2, 1.0) and a.flip_prob == 0.5
  assert a.jitter_prob == a.grayscale_prob == a.blur_prob == a.solarize_prob == 0.0
  assert paper.model.vit_pos_embed == 'sincos' and paper.model.vit_pool == 'cls'
