"""SimCLR augmentations: identities at zero strength, closed forms, sampling statistics, and
the key derivation that makes batched (and sharded) results equal per-example ones."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ssl_jax.data import augment as A

N_KEYS = 2000  # For frequency tests; tolerances are 5 standard errors.


def keys(n, seed=0):
  return jax.random.split(jax.random.key(seed), n)


def rand_image(shape, seed=0):
  return jax.random.uniform(jax.random.key(1000 + seed), shape, jnp.float32)


def freq_tol(p, n=N_KEYS):
  return 5 * math.sqrt(p * (1 - p) / n)


def changed_fraction(op, image, n=N_KEYS):
  """Fraction of keys for which op(key, image) differs from image."""
  out = jax.jit(jax.vmap(op, in_axes=(0, None)))(keys(n), image)
  return float(jnp.mean(jnp.any(out != image, axis=(1, 2, 3))))


def small_cfg(**overrides):
  cfg = A.default_simclr_config()
  cfg.crop_size = 16
  cfg.solarize_prob = 0.3  # Exercise every op.
  cfg.update(overrides)
  return cfg


def identity_cfg(size):
  return small_cfg(crop_size=size, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0,
                   jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)


# --------------------------------------------------------------------------------------------
# Identities at zero strength


@pytest.mark.parametrize('channels', [1, 3])
@pytest.mark.parametrize('name,op', [
    ('crop', lambda k, x: A.random_resized_crop(k, x, x.shape[:2], (1.0, 1.0), (1.0, 1.0))),
    ('flip', lambda k, x: A.horizontal_flip(k, x, p=0.0)),
    ('jitter_zero_strength', lambda k, x: A.color_jitter(k, x, 0.0, 0.0, 0.0, 0.0, p=1.0)),
    ('jitter_p0', lambda k, x: A.color_jitter(k, x, 0.8, 0.8, 0.8, 0.2, p=0.0)),
    ('grayscale', lambda k, x: A.random_grayscale(k, x, p=0.0)),
    ('blur_p0', lambda k, x: A.gaussian_blur(k, x, p=0.0, kernel_size=5)),
    ('blur_sigma0', lambda k, x: A.gaussian_blur(k, x, p=1.0, sigma=(1e-3, 1e-3), kernel_size=5)),
    ('solarize', lambda k, x: A.solarize(k, x, p=0.0)),
])
def test_identity_at_zero_strength(name, op, channels):
  image = rand_image((16, 16, channels))
  out = jax.jit(jax.vmap(op, in_axes=(0, None)))(keys(16), image)
  np.testing.assert_allclose(out, jnp.broadcast_to(image, out.shape), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Crop


def test_crop_and_resize_extracts_the_box():
  image = rand_image((16, 20, 3))
  out = A.crop_and_resize(image, jnp.array([2, 3, 5, 6]), (5, 6))
  np.testing.assert_allclose(out, image[2:7, 3:9], rtol=0, atol=1e-6)


def test_crop_and_resize_upsamples_bilinearly():
  # A horizontal ramp is reproduced exactly by bilinear interpolation away from the borders.
  ramp = jnp.broadcast_to(jnp.arange(8, dtype=jnp.float32)[None, :, None] / 8, (8, 8, 1))
  out = A.crop_and_resize(ramp, jnp.array([0, 2, 4, 4]), (8, 8))
  # Output column j samples input x = 2 + (j + 0.5) / 2, whose pixel-centre value is
  # (x - 0.5) / 8 on the ramp.
  expected = (2 + (np.arange(8) + 0.5) / 2 - 0.5) / 8
  np.testing.assert_allclose(out[0, 1:-1, 0], expected[1:-1], atol=1e-6)


def box_stats(height, width, scale, ratio, n=N_KEYS):
  sample = jax.jit(jax.vmap(lambda k: A.sample_crop_box(k, height, width, scale, ratio)))
  return np.asarray(sample(keys(n)))


def test_crop_area_fraction_is_uniform_in_scale():
  # With ratio 1 every attempt fits, so the area fraction is uniform up to pixel rounding.
  boxes = box_stats(100, 100, (0.08, 1.0), (1.0, 1.0))
  frac = boxes[:, 2] * boxes[:, 3] / 100 ** 2
  rounding = 2 * 100 ** 0.5 / 100 ** 2 + 1e-4  # One pixel of side at most.
  assert frac.min() >= 0.08 - 0.01 and frac.max() <= 1.0
  se = (0.92 / math.sqrt(12)) / math.sqrt(len(frac))
  assert abs(frac.mean() - 0.54) < 5 * se + rounding
  # Uniform, not just the right mean: each quarter of the range holds about a quarter.
  quarters = np.histogram(frac, bins=np.linspace(0.08, 1.0, 5))[0] / len(frac)
  np.testing.assert_allclose(quarters, 0.25, atol=freq_tol(0.25))


def test_crop_box_stays_inside_with_aspect_in_range():
  boxes = box_stats(28, 28, (0.08, 1.0), (3 / 4, 4 / 3))
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
  assert (top + h <= 28).all() and (left + w <= 28).all()
  # Sizes are rounded to whole pixels: the unrounded ones lie within half a pixel.
  assert ((w - 0.5) / (h + 0.5) <= 4 / 3).all() and ((w + 0.5) / (h - 0.5) >= 3 / 4).all()
  assert ((w + 0.5) * (h + 0.5) >= 0.08 * 28 * 28).all()
  # Areas near 1 with non-square aspect do not fit; the mean is still well inside the range.
  assert 0.08 < (h * w).mean() / 28 ** 2 < 1.0


def test_crop_position_is_uniform():
  # A fixed 10x10 box in a 20x20 image has 11 possible offsets per axis.
  boxes = box_stats(20, 20, (0.25, 0.25), (1.0, 1.0))
  assert (boxes[:, 2] == 10).all() and (boxes[:, 3] == 10).all()
  for offsets in (boxes[:, 0], boxes[:, 1]):
    counts = np.bincount(offsets, minlength=11) / len(offsets)
    assert len(counts) == 11
    np.testing.assert_allclose(counts, 1 / 11, atol=freq_tol(1 / 11))


def test_crop_falls_back_to_central_crop():
  # An area fraction above 1 never fits, so torchvision's fallback is all that remains.
  square = box_stats(16, 16, (2.0, 3.0), (3 / 4, 4 / 3), n=8)
  np.testing.assert_array_equal(square, np.tile([0, 0, 16, 16], (8, 1)))
  # Too wide for ratio <= 4/3: full height, width round(10 * 4/3) = 13, centred.
  wide = box_stats(10, 40, (2.0, 3.0), (3 / 4, 4 / 3), n=8)
  np.testing.assert_array_equal(wide, np.tile([0, 13, 10, 13], (8, 1)))
  tall = box_stats(40, 10, (2.0, 3.0), (3 / 4, 4 / 3), n=8)
  np.testing.assert_array_equal(tall, np.tile([13, 0, 13, 10], (8, 1)))


# --------------------------------------------------------------------------------------------
# Flip, grayscale, solarize


def test_flip_always_and_frequency():
  image = rand_image((8, 8, 3))
  np.testing.assert_array_equal(A.horizontal_flip(jax.random.key(0), image, p=1.0), image[:, ::-1])
  freq = changed_fraction(lambda k, x: A.horizontal_flip(k, x, p=0.3), image)
  assert abs(freq - 0.3) < freq_tol(0.3)


def test_grayscale_luma_formula_and_gray_input():
  image = rand_image((8, 8, 3))
  out = np.asarray(A.random_grayscale(jax.random.key(0), image, p=1.0))
  x = np.asarray(image, np.float64)
  luma = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
  for c in range(3):
    np.testing.assert_allclose(out[..., c], luma, atol=1e-6)
  gray_rgb = jnp.repeat(rand_image((8, 8, 1)), 3, axis=-1)
  np.testing.assert_allclose(A.random_grayscale(jax.random.key(0), gray_rgb, p=1.0), gray_rgb,
                             atol=1e-6)
  one_channel = rand_image((8, 8, 1))
  np.testing.assert_array_equal(A.random_grayscale(jax.random.key(0), one_channel, p=1.0),
                                one_channel)
  freq = changed_fraction(lambda k, x: A.random_grayscale(k, x, p=0.2), image)
  assert abs(freq - 0.2) < freq_tol(0.2)


@pytest.mark.parametrize('threshold', [0.5, 0.3])
def test_solarize_closed_form(threshold):
  image = rand_image((8, 8, 3))
  out = A.solarize(jax.random.key(0), image, p=1.0, threshold=threshold)
  x = np.asarray(image)
  np.testing.assert_array_equal(out, np.where(x >= threshold, 1 - x, x))
  assert not np.array_equal(out, x)


# --------------------------------------------------------------------------------------------
# Colour jitter


def test_brightness_closed_form():
  image = rand_image((8, 8, 3))
  for factor in (0.0, 0.7, 1.5):
    np.testing.assert_allclose(A.adjust_brightness(image, factor),
                               np.clip(np.asarray(image) * factor, 0, 1), atol=1e-6)


@pytest.mark.parametrize('channels', [1, 3])
def test_contrast_blends_with_mean_luma(channels):
  image = rand_image((8, 8, channels))
  x = np.asarray(image, np.float64)
  luma = x @ np.array([0.299, 0.587, 0.114]) if channels == 3 else x[..., 0]
  mean = luma.mean()  # One scalar for the whole image, not per channel.
  for factor in (0.0, 0.5, 1.6):
    expected = np.clip(factor * x + (1 - factor) * mean, 0, 1)
    np.testing.assert_allclose(A.adjust_contrast(image, factor), expected, atol=1e-6)


def test_saturation_zero_is_grayscale_and_one_is_identity():
  image = rand_image((8, 8, 3))
  gray = jnp.broadcast_to(A.to_grayscale(image), image.shape)
  np.testing.assert_allclose(A.adjust_saturation(image, 0.0), gray, atol=1e-6)
  np.testing.assert_array_equal(A.adjust_saturation(image, 1.0), image)
  one_channel = rand_image((8, 8, 1))
  np.testing.assert_array_equal(A.adjust_saturation(one_channel, 0.0), one_channel)


def test_hsv_round_trip_and_known_values():
  image = rand_image((16, 16, 3))
  np.testing.assert_allclose(A.hsv_to_rgb(A.rgb_to_hsv(image)), image, atol=1e-5)
  rgb = jnp.array([[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.5, 0.5, 0.5], [1.0, 1.0, 0]]])
  expected_hsv = [[0, 1, 1], [1 / 3, 1, 1], [2 / 3, 1, 1], [0, 0, 0.5], [1 / 6, 1, 1]]
  np.testing.assert_allclose(A.rgb_to_hsv(rgb)[0], expected_hsv, atol=1e-6)


def test_hue_shift():
  image = rand_image((16, 16, 3))
  np.testing.assert_array_equal(A.adjust_hue(image, 0.0), image)
  red = jnp.array([[[1.0, 0.0, 0.0]]])
  np.testing.assert_allclose(A.adjust_hue(red, 1 / 3), [[[0, 1, 0]]], atol=1e-5)
  np.testing.assert_allclose(A.adjust_hue(red, -1 / 3), [[[0, 0, 1]]], atol=1e-5)
  # A hue rotation keeps value (max channel) and saturation, and a full turn is the identity.
  shifted = A.adjust_hue(image, 0.15)
  assert not np.allclose(shifted, image, atol=1e-3)
  np.testing.assert_allclose(A.rgb_to_hsv(shifted)[..., 1:], A.rgb_to_hsv(image)[..., 1:],
                             atol=1e-5)
  np.testing.assert_allclose(A.adjust_hue(A.adjust_hue(image, 0.4), 0.6), image, atol=1e-5)
  one_channel = rand_image((8, 8, 1))
  np.testing.assert_array_equal(A.adjust_hue(one_channel, 0.3), one_channel)


def test_jitter_params_ranges_and_random_order():
  sample = jax.jit(jax.vmap(lambda k: A.sample_jitter_params(k, 0.8, 0.4, 0.6, 0.2)))
  order, factors = (np.asarray(a) for a in sample(keys(N_KEYS)))
  np.testing.assert_array_equal(np.sort(order, axis=1), np.tile(np.arange(4), (N_KEYS, 1)))
  perms, counts = np.unique(order, axis=0, return_counts=True)
  assert len(perms) == 24
  np.testing.assert_allclose(counts / N_KEYS, 1 / 24, atol=freq_tol(1 / 24))
  for col, (lo, hi) in enumerate([(0.2, 1.8), (0.6, 1.4), (0.4, 1.6), (-0.2, 0.2)]):
    f = factors[:, col]
    assert f.min() >= lo and f.max() <= hi
    se = (hi - lo) / math.sqrt(12 * N_KEYS)
    assert abs(f.mean() - (lo + hi) / 2) < 5 * se


def test_apply_jitter_follows_the_order():
  image = rand_image((8, 8, 3))
  factors = jnp.array([1.5, 0.5, 1.0, 0.0])  # Saturation and hue are identities here.
  b_then_c = A.adjust_contrast(A.adjust_brightness(image, 1.5), 0.5)
  c_then_b = A.adjust_brightness(A.adjust_contrast(image, 0.5), 1.5)
  # Clipping after brightness makes the two orders differ.
  assert not np.allclose(b_then_c, c_then_b, atol=1e-3)
  np.testing.assert_allclose(A.apply_jitter(image, jnp.array([0, 1, 2, 3]), factors), b_then_c,
                             atol=1e-6)
  np.testing.assert_allclose(A.apply_jitter(image, jnp.array([2, 1, 3, 0]), factors), c_then_b,
                             atol=1e-6)


def test_jitter_frequency():
  image = rand_image((8, 8, 3))
  freq = changed_fraction(lambda k, x: A.color_jitter(k, x, 0.5, 0.0, 0.0, 0.0, p=0.8), image)
  assert abs(freq - 0.8) < freq_tol(0.8)


# --------------------------------------------------------------------------------------------
# Blur


def test_default_blur_kernel_size():
  assert A.default_blur_kernel_size(224) == 23
  assert A.default_blur_kernel_size(32) == 3
  assert A.default_blur_kernel_size(28) == 3


def test_blur_matches_reflect_padded_reference():
  image = rand_image((12, 10, 3))
  sigma, size = 1.3, 5
  out = A.blur(image, sigma, size)
  x = np.arange(size) - size // 2
  k = np.exp(-x ** 2 / (2 * sigma ** 2))
  k /= k.sum()
  padded = np.pad(np.asarray(image, np.float64), ((2, 2), (2, 2), (0, 0)), mode='reflect')
  expected = np.zeros(image.shape)
  for dy in range(size):
    for dx in range(size):
      expected += k[dy] * k[dx] * padded[dy:dy + 12, dx:dx + 10]
  np.testing.assert_allclose(out, expected, atol=1e-6)
  # A blur averages, so a constant image stays constant.
  np.testing.assert_allclose(A.blur(jnp.full((12, 10, 1), 0.3), sigma, size), 0.3, atol=1e-6)


def test_blur_frequency():
  image = rand_image((16, 16, 3))
  freq = changed_fraction(
      lambda k, x: A.gaussian_blur(k, x, p=0.5, sigma=(1.0, 2.0), kernel_size=5), image)
  assert abs(freq - 0.5) < freq_tol(0.5)


def test_blur_rejects_even_kernel():
  with pytest.raises(ValueError):
    A.gaussian_blur(jax.random.key(0), rand_image((16, 16, 3)), kernel_size=4)


# --------------------------------------------------------------------------------------------
# Random ops and policy: shape, dtype, range, determinism


@pytest.mark.parametrize('channels', [1, 3])
@pytest.mark.parametrize('op', [
    lambda k, x: A.random_resized_crop(k, x, (12, 12)),
    lambda k, x: A.horizontal_flip(k, x),
    lambda k, x: A.color_jitter(k, x, 0.8, 0.8, 0.8, 0.2),
    lambda k, x: A.random_grayscale(k, x),
    lambda k, x: A.gaussian_blur(k, x, kernel_size=5),
    lambda k, x: A.solarize(k, x, p=0.5),
], ids=['crop', 'flip', 'jitter', 'grayscale', 'blur', 'solarize'])
def test_random_ops_keep_range_shape_dtype(op, channels):
  images = jax.random.uniform(jax.random.key(channels), (64, 16, 16, channels))
  out = jax.jit(jax.vmap(op))(keys(64), images)
  expected_hw = (12, 12) if out.shape[1] == 12 else (16, 16)
  assert out.shape == (64, *expected_hw, channels) and out.dtype == jnp.float32
  assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
  assert not np.allclose(out[0], out[1])  # Different keys, different random outputs.


@functools.lru_cache(maxsize=None)
def jitted_view(channels):
  del channels  # Only keys the cache: one compilation per channel count.
  cfg = small_cfg()
  return jax.jit(jax.vmap(lambda k, x: A.simclr_view(k, x, cfg)))


@pytest.mark.parametrize('channels', [1, 3])
def test_simclr_view_under_jit_vmap(channels):
  images = jax.random.uniform(jax.random.key(channels), (32, 28, 28, channels))
  view = jitted_view(channels)
  ks = keys(32)
  out = view(ks, images)
  assert out.shape == (32, 16, 16, channels) and out.dtype == jnp.float32
  assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
  np.testing.assert_array_equal(view(ks, images), out)  # Same keys, same views.
  other = view(keys(32, seed=1), images)
  for i in range(32):
    assert not np.allclose(other[i], out[i])


# --------------------------------------------------------------------------------------------
# Batched entry point


@functools.lru_cache(maxsize=None)
def jitted_augment_batch(num_views):
  cfg = small_cfg()
  return jax.jit(lambda k, x, s: A.augment_batch(k, x, cfg, num_views, start_index=s))


def uint8_batch(b=8, channels=3):
  return np.asarray(jax.random.randint(jax.random.key(7), (b, 28, 28, channels), 0, 256),
                    np.uint8)


def test_augment_batch_equals_per_example_views():
  key = jax.random.key(42)
  images = uint8_batch()
  views = jitted_augment_batch(2)(key, images, 0)
  assert len(views) == 2
  single = jax.jit(lambda k, x: A.simclr_view(k, x, small_cfg()))
  for v, batch_out in enumerate(views):
    assert batch_out.shape == (8, 16, 16, 3) and batch_out.dtype == jnp.float32
    for i in range(len(images)):
      # The documented rule, written out: fold_in(fold_in(key, view), index).
      k = jax.random.fold_in(jax.random.fold_in(key, v), i)
      expected = single(k, jnp.asarray(images[i], jnp.float32) / 255.0)
      np.testing.assert_allclose(batch_out[i], expected, rtol=0, atol=1e-6)
  assert not np.allclose(views[0], views[1])


def test_augment_batch_is_independent_of_batch_slicing():
  key = jax.random.key(3)
  images = uint8_batch()
  fn = jitted_augment_batch(1)
  full = fn(key, images, 0)[0]
  np.testing.assert_array_equal(fn(key, images[:4], 0)[0], full[:4])
  # A shard holding global rows 4..7 passes its offset and gets the same views.
  np.testing.assert_array_equal(fn(key, images[4:], 4)[0], full[4:])
  assert not np.allclose(fn(key, images[4:], 0)[0], full[4:])


def test_augment_batch_sharded_equals_single_device():
  n = len(jax.devices())
  mesh = jax.make_mesh((n,), ('data',))
  images = uint8_batch(b=n)
  key = jax.random.key(5)
  fn = jitted_augment_batch(1)
  single = fn(key, images, 0)[0]
  sharded_images = jax.device_put(images, NamedSharding(mesh, P('data')))
  sharded = fn(key, sharded_images, 0)[0]
  np.testing.assert_array_equal(sharded, single)


def test_augment_batch_converts_uint8_to_unit_range():
  images = uint8_batch(b=2, channels=1)
  out = A.augment_batch(jax.random.key(0), images, identity_cfg(28), num_views=1)[0]
  np.testing.assert_allclose(out, images.astype(np.float32) / 255.0, rtol=0, atol=1e-6)


def test_normalize():
  images = rand_image((2, 4, 4, 3))
  mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
  np.testing.assert_allclose(A.normalize(images, mean, std),
                             (np.asarray(images) - np.array(mean)) / np.array(std), atol=1e-6)


def test_default_config_matches_simclr():
  cfg = A.default_simclr_config()
  assert isinstance(cfg, ml_collections.ConfigDict)
  assert cfg.crop_size == 224 and tuple(cfg.crop_scale) == (0.08, 1.0)
  assert tuple(cfg.crop_ratio) == pytest.approx((3 / 4, 4 / 3))
  assert (cfg.flip_prob, cfg.jitter_prob, cfg.grayscale_prob, cfg.blur_prob,
          cfg.solarize_prob) == (0.5, 0.8, 0.2, 0.5, 0.0)
  assert (cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue) == pytest.approx(
      (0.8, 0.8, 0.8, 0.2))
  assert tuple(cfg.blur_sigma) == (0.1, 2.0)
