"""SimCLR augmentations: identities at zero strength, closed forms, sampling statistics, and
the key derivation that makes batched (and sharded) results equal per-example ones.

Compilation dominates the run time, so test data comes from NumPy and JAX work is jitted:
eager JAX compiles every primitive for every new shape.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ssl_jax.data import augment as A

N_KEYS = 2000  # For frequency tests; tolerances are 5 standard errors.

# A Python 0 is skipped at trace time; a NumPy float32 0 goes through the traced lax.cond path.
ZERO = np.float32(0.0)


@functools.lru_cache(maxsize=None)
def keys(n, seed=0):
  return jax.random.split(jax.random.key(seed), n)


def rand_image(shape, seed=0):
  return np.random.default_rng(seed).random(shape, dtype=np.float32)


def freq_tol(p, n=N_KEYS):
  return 5 * math.sqrt(p * (1 - p) / n)


def over_keys(op, image, n):
  """op(key, image) for n keys, as a NumPy array [n, ...]."""
  return np.asarray(jax.jit(jax.vmap(op, in_axes=(0, None)))(keys(n), image))


def changed_fraction(op, image, n=N_KEYS):
  """Fraction of keys for which op(key, image) differs from image."""
  return float(np.mean(np.any(over_keys(op, image, n) != image, axis=(1, 2, 3))))


def with_key0(op):
  """op(key, image) jitted and called with a fixed key."""
  return functools.partial(jax.jit(op), jax.random.key(0))


def small_cfg(**overrides):
  cfg = A.default_simclr_config()
  cfg.crop_size = 16
  cfg.solarize_prob = 0.3  # Exercise every op.
  cfg.update(overrides)
  return cfg


# --------------------------------------------------------------------------------------------
# Identities at zero strength


IDENTITY_OPS = {
    'crop': lambda k, x: A.random_resized_crop(k, x, x.shape[:2], (1.0, 1.0), (1.0, 1.0)),
    'flip': lambda k, x: A.horizontal_flip(k, x, p=ZERO),
    'jitter_zero_strength': lambda k, x: A.color_jitter(k, x, 0.0, 0.0, 0.0, 0.0, p=1.0),
    'jitter_p0': lambda k, x: A.color_jitter(k, x, 0.8, 0.8, 0.8, 0.2, p=ZERO),
    'grayscale': lambda k, x: A.random_grayscale(k, x, p=ZERO),
    'blur_p0': lambda k, x: A.gaussian_blur(k, x, p=ZERO, kernel_size=5),
    'blur_sigma0': lambda k, x: A.gaussian_blur(k, x, p=1.0, sigma=(1e-3, 1e-3), kernel_size=5),
    'solarize': lambda k, x: A.solarize(k, x, p=ZERO),
    'static_p0': lambda k, x: A.solarize(k, A.gaussian_blur(k, x, p=0.0), p=0.0),
}
# Every op on RGB; on one channel only the ops whose code depends on the channel count.
IDENTITY_CASES = ([(name, 3) for name in IDENTITY_OPS] +
                  [(name, 1) for name in ('jitter_zero_strength', 'jitter_p0', 'grayscale')])


@pytest.mark.parametrize('name,channels', IDENTITY_CASES)
def test_identity_at_zero_strength(name, channels):
  op = IDENTITY_OPS[name]
  image = rand_image((16, 16, channels))
  out = over_keys(op, image, 16)
  np.testing.assert_allclose(out, np.broadcast_to(image, out.shape), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Crop

crop_and_resize = jax.jit(A.crop_and_resize, static_argnums=2)


def test_crop_and_resize_extracts_the_box():
  image = rand_image((16, 20, 3))
  out = crop_and_resize(image, jnp.array([2, 3, 5, 6]), (5, 6))
  np.testing.assert_allclose(out, image[2:7, 3:9], rtol=0, atol=1e-6)


def test_crop_and_resize_upsamples_bilinearly():
  # A horizontal ramp is reproduced exactly by bilinear interpolation away from the borders.
  ramp = np.broadcast_to(np.arange(8, dtype=np.float32)[None, :, None] / 8, (8, 8, 1))
  out = crop_and_resize(ramp, jnp.array([0, 2, 4, 4]), (8, 8))
  # Output column j samples input x = 2 + (j + 0.5) / 2, whose pixel-centre value is
  # (x - 0.5) / 8 on the ramp.
  expected = (2 + (np.arange(8) + 0.5) / 2 - 0.5) / 8
  np.testing.assert_allclose(out[0, 1:-1, 0], expected[1:-1], atol=1e-6)


def crop_boxes(height, width, scale, ratio, n=N_KEYS):
  sample = jax.jit(jax.vmap(lambda k: A.sample_crop_box(k, height, width, scale, ratio)))
  return np.asarray(sample(keys(n)))


def test_crop_area_fraction_is_uniform_in_scale():
  # With ratio 1 every attempt fits, so the area fraction is uniform up to pixel rounding.
  boxes = crop_boxes(100, 100, (0.08, 1.0), (1.0, 1.0))
  frac = boxes[:, 2] * boxes[:, 3] / 100 ** 2
  assert frac.min() >= 0.08 - 0.01 and frac.max() <= 1.0
  se = (0.92 / math.sqrt(12)) / math.sqrt(len(frac))
  rounding = 1e-3  # Half a pixel of side moves the fraction by at most ~0.01, ~0 on average.
  assert abs(frac.mean() - 0.54) < 5 * se + rounding
  # Uniform, not just the right mean: each quarter of the range holds about a quarter.
  quarters = np.histogram(frac, bins=np.linspace(0.08, 1.0, 5))[0] / len(frac)
  np.testing.assert_allclose(quarters, 0.25, atol=freq_tol(0.25))


def test_crop_box_stays_inside_with_aspect_and_area_in_range():
  top, left, h, w = crop_boxes(28, 28, (0.08, 1.0), (3 / 4, 4 / 3)).T
  assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
  assert (top + h <= 28).all() and (left + w <= 28).all()
  # Sizes are rounded to whole pixels: the unrounded ones lie within half a pixel.
  assert ((w - 0.5) / (h + 0.5) <= 4 / 3).all() and ((w + 0.5) / (h - 0.5) >= 3 / 4).all()
  assert ((w + 0.5) * (h + 0.5) >= 0.08 * 28 * 28).all()
  # Both elongations occur, not only squares.
  assert (w > h).any() and (w < h).any()


def test_crop_position_is_uniform():
  # A fixed 10x10 box in a 20x20 image has 11 possible offsets per axis.
  boxes = crop_boxes(20, 20, (0.25, 0.25), (1.0, 1.0))
  assert (boxes[:, 2] == 10).all() and (boxes[:, 3] == 10).all()
  for offsets in (boxes[:, 0], boxes[:, 1]):
    counts = np.bincount(offsets, minlength=11) / len(offsets)
    assert len(counts) == 11
    np.testing.assert_allclose(counts, 1 / 11, atol=freq_tol(1 / 11))


def test_crop_falls_back_to_central_crop():
  # An area fraction above 1 never fits, so torchvision's fallback is all that remains.
  square = crop_boxes(16, 16, (2.0, 3.0), (3 / 4, 4 / 3), n=8)
  np.testing.assert_array_equal(square, np.tile([0, 0, 16, 16], (8, 1)))
  # Too wide for ratio <= 4/3: full height, width round(10 * 4/3) = 13, centred.
  wide = crop_boxes(10, 40, (2.0, 3.0), (3 / 4, 4 / 3), n=8)
  np.testing.assert_array_equal(wide, np.tile([0, 13, 10, 13], (8, 1)))
  tall = crop_boxes(40, 10, (2.0, 3.0), (3 / 4, 4 / 3), n=8)
  np.testing.assert_array_equal(tall, np.tile([13, 0, 13, 10], (8, 1)))


# --------------------------------------------------------------------------------------------
# Flip, grayscale, solarize


def test_flip_always_and_frequency():
  image = rand_image((8, 8, 3))
  flip = with_key0(lambda k, x: A.horizontal_flip(k, x, p=1.0))
  np.testing.assert_array_equal(flip(image), image[:, ::-1])
  freq = changed_fraction(lambda k, x: A.horizontal_flip(k, x, p=0.3), image)
  assert abs(freq - 0.3) < freq_tol(0.3)


def test_grayscale_luma_formula_and_gray_input():
  gray_op = with_key0(lambda k, x: A.random_grayscale(k, x, p=1.0))
  image = rand_image((8, 8, 3))
  out = np.asarray(gray_op(image))
  luma = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
  for c in range(3):
    np.testing.assert_allclose(out[..., c], luma, atol=1e-6)
  gray_rgb = np.repeat(rand_image((8, 8, 1)), 3, axis=-1)
  np.testing.assert_allclose(gray_op(gray_rgb), gray_rgb, atol=1e-6)
  one_channel = rand_image((8, 8, 1))
  np.testing.assert_array_equal(gray_op(one_channel), one_channel)
  freq = changed_fraction(lambda k, x: A.random_grayscale(k, x, p=0.2), image)
  assert abs(freq - 0.2) < freq_tol(0.2)


def test_solarize_closed_form():
  image = rand_image((8, 8, 3))
  for threshold in (0.5, 0.3):
    out = with_key0(lambda k, x: A.solarize(k, x, p=1.0, threshold=threshold))(image)
    np.testing.assert_array_equal(out, np.where(image >= threshold, 1 - image, image))
    assert not np.array_equal(out, image)


# --------------------------------------------------------------------------------------------
# Colour jitter

adjust_brightness = jax.jit(A.adjust_brightness)
adjust_contrast = jax.jit(A.adjust_contrast)
adjust_saturation = jax.jit(A.adjust_saturation)
adjust_hue = jax.jit(A.adjust_hue)
rgb_to_hsv = jax.jit(A.rgb_to_hsv)


def test_brightness_closed_form():
  image = rand_image((8, 8, 3))
  for factor in (0.0, 0.7, 1.5):
    np.testing.assert_allclose(adjust_brightness(image, factor),
                               np.clip(image * factor, 0, 1), atol=1e-6)


@pytest.mark.parametrize('channels', [1, 3])
def test_contrast_blends_with_mean_luma(channels):
  image = rand_image((8, 8, channels))
  x = image.astype(np.float64)
  luma = x @ np.array([0.299, 0.587, 0.114]) if channels == 3 else x[..., 0]
  mean = luma.mean()  # One scalar for the whole image, not per channel.
  for factor in (0.0, 0.5, 1.6):
    expected = np.clip(factor * x + (1 - factor) * mean, 0, 1)
    np.testing.assert_allclose(adjust_contrast(image, factor), expected, atol=1e-6)


def test_saturation_zero_is_grayscale_and_one_is_identity():
  image = rand_image((8, 8, 3))
  luma = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
  np.testing.assert_allclose(adjust_saturation(image, 0.0), np.repeat(luma[..., None], 3, -1),
                             atol=1e-6)
  np.testing.assert_array_equal(adjust_saturation(image, 1.0), image)
  one_channel = rand_image((8, 8, 1))
  np.testing.assert_array_equal(adjust_saturation(one_channel, 0.0), one_channel)


def test_hsv_round_trip_and_known_values():
  image = rand_image((16, 16, 3))
  round_trip = jax.jit(lambda x: A.hsv_to_rgb(A.rgb_to_hsv(x)))
  np.testing.assert_allclose(round_trip(image), image, atol=1e-5)
  rgb = np.array([[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.5, 0.5, 0.5], [1.0, 1.0, 0]]],
                 np.float32)
  expected_hsv = [[0, 1, 1], [1 / 3, 1, 1], [2 / 3, 1, 1], [0, 0, 0.5], [1 / 6, 1, 1]]
  np.testing.assert_allclose(rgb_to_hsv(rgb)[0], expected_hsv, atol=1e-6)


def test_hue_shift():
  image = rand_image((16, 16, 3))
  np.testing.assert_array_equal(adjust_hue(image, 0.0), image)
  red = np.array([[[1.0, 0.0, 0.0]]], np.float32)
  np.testing.assert_allclose(adjust_hue(red, 1 / 3), [[[0, 1, 0]]], atol=1e-5)
  np.testing.assert_allclose(adjust_hue(red, -1 / 3), [[[0, 0, 1]]], atol=1e-5)
  # A hue rotation keeps value (max channel) and saturation, and a full turn is the identity.
  shifted = adjust_hue(image, 0.15)
  assert not np.allclose(shifted, image, atol=1e-3)
  np.testing.assert_allclose(rgb_to_hsv(shifted)[..., 1:], rgb_to_hsv(image)[..., 1:],
                             atol=1e-5)
  np.testing.assert_allclose(adjust_hue(adjust_hue(image, 0.4), 0.6), image, atol=1e-5)
  one_channel = rand_image((8, 8, 1))
  np.testing.assert_array_equal(adjust_hue(one_channel, 0.3), one_channel)


def test_jitter_params_ranges_and_random_order():
  sample = jax.jit(jax.vmap(
      lambda k: A.sample_jitter_params(jax.random.uniform(k, (8,)), 0.8, 0.4, 0.6, 0.2)))
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
  b_then_c = adjust_contrast(adjust_brightness(image, 1.5), 0.5)
  c_then_b = adjust_brightness(adjust_contrast(image, 0.5), 1.5)
  # Clipping after brightness makes the two orders differ.
  assert not np.allclose(b_then_c, c_then_b, atol=1e-3)
  apply_jitter = jax.jit(A.apply_jitter)
  np.testing.assert_allclose(apply_jitter(image, jnp.array([0, 1, 2, 3]), factors), b_then_c,
                             atol=1e-6)
  np.testing.assert_allclose(apply_jitter(image, jnp.array([2, 1, 3, 0]), factors), c_then_b,
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
  blur = jax.jit(A.blur, static_argnums=2)
  image = rand_image((12, 10, 3))
  sigma, size = 1.3, 5
  x = np.arange(size) - size // 2
  k = np.exp(-x ** 2 / (2 * sigma ** 2))
  k /= k.sum()
  padded = np.pad(image.astype(np.float64), ((2, 2), (2, 2), (0, 0)), mode='reflect')
  expected = np.zeros(image.shape)
  for dy in range(size):
    for dx in range(size):
      expected += k[dy] * k[dx] * padded[dy:dy + 12, dx:dx + 10]
  np.testing.assert_allclose(blur(image, sigma, size), expected, atol=1e-6)
  # A blur averages, so a constant image stays constant.
  np.testing.assert_allclose(blur(np.full((12, 10, 3), 0.3, np.float32), sigma, size), 0.3,
                             atol=1e-6)


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


RANDOM_OPS = {  # op, output height and width, whether it changes one-channel images.
    'crop': (lambda k, x: A.random_resized_crop(k, x, (12, 12)), (12, 12), True),
    'flip': (lambda k, x: A.horizontal_flip(k, x), (16, 16), True),
    'jitter': (lambda k, x: A.color_jitter(k, x, 0.8, 0.8, 0.8, 0.2), (16, 16), True),
    'grayscale': (lambda k, x: A.random_grayscale(k, x), (16, 16), False),
    'blur': (lambda k, x: A.gaussian_blur(k, x, kernel_size=5), (16, 16), True),
    'solarize': (lambda k, x: A.solarize(k, x, p=0.5), (16, 16), True),
}
# One-channel images go through every op in the policy test below; here only the ops whose
# code depends on the channel count get a separate one-channel case.
RANDOM_CASES = [(name, 3) for name in RANDOM_OPS] + [('jitter', 1), ('grayscale', 1)]


@pytest.mark.parametrize('name,channels', RANDOM_CASES)
def test_random_ops_keep_range_shape_dtype(name, channels):
  op, out_hw, acts_on_gray = RANDOM_OPS[name]
  images = rand_image((64, 16, 16, channels), seed=channels)
  out = jax.jit(jax.vmap(op))(keys(64), images)
  assert out.shape == (64, *out_hw, channels) and out.dtype == jnp.float32
  out = np.asarray(out)
  assert out.min() >= 0.0 and out.max() <= 1.0
  if out.shape == images.shape:
    changed = np.any(out != images, axis=(1, 2, 3))
    if channels == 3 or acts_on_gray:
      assert changed.any() and not changed.all()  # Applied to some examples, not to all.
    else:
      assert not changed.any()


def test_grayscale_input_through_the_policy_under_jit_vmap():
  # C == 1 skips saturation, hue and grayscale statically; everything else still applies.
  cfg = small_cfg()
  view = jax.jit(jax.vmap(lambda k, x: A.simclr_view(k, x, cfg)))
  images = rand_image((32, 28, 28, 1))
  out = np.asarray(view(keys(32), images))
  assert out.shape == (32, 16, 16, 1) and out.dtype == np.float32
  assert out.min() >= 0.0 and out.max() <= 1.0
  np.testing.assert_array_equal(view(keys(32), images), out)  # Same keys, same views.
  other = np.asarray(view(keys(32, seed=1), images))
  for i in range(32):
    assert not np.allclose(other[i], out[i])


# --------------------------------------------------------------------------------------------
# Batched entry point

KEY = jax.random.key(42)

# Different XLA programs (per-example vs batched, sharded vs not) fuse differently, so results
# may differ by a few float32 ulps; a different key changes outputs by orders of magnitude more.
ULP_TOL = 1e-5


@functools.lru_cache(maxsize=None)
def augment_batch_fn():
  cfg = small_cfg()
  return jax.jit(lambda k, x: A.augment_batch(k, x, cfg, num_views=2))


def uint8_batch(b=8, channels=3):
  return np.random.default_rng(7).integers(0, 256, (b, 28, 28, channels), dtype=np.uint8)


def test_augment_batch_equals_per_example_views():
  images = uint8_batch()
  views = augment_batch_fn()(KEY, images)
  assert len(views) == 2
  single = jax.jit(lambda k, x: A.simclr_view(k, x, small_cfg()))
  for v, batch_out in enumerate(views):
    assert batch_out.shape == (8, 16, 16, 3) and batch_out.dtype == jnp.float32
    assert float(batch_out.min()) >= 0.0 and float(batch_out.max()) <= 1.0
    for i in range(len(images)):
      # The documented rule, written out: fold_in(fold_in(key, view), index).
      k = jax.random.fold_in(jax.random.fold_in(KEY, v), i)
      expected = single(k, images[i].astype(np.float32) / 255.0)
      np.testing.assert_allclose(batch_out[i], expected, rtol=0, atol=ULP_TOL)
  for i in range(len(images)):
    assert not np.allclose(views[0][i], views[1][i])


def test_augment_batch_is_independent_of_slicing_and_sharding():
  images = uint8_batch()
  full = augment_batch_fn()(KEY, images)
  # As in the trainer: shard_map over 2 devices, each augmenting its 4 rows with their global
  # offset. Device 0 sees the slice images[:4], device 1 images[4:].
  mesh = Mesh(np.asarray(jax.devices()[:2]), ('data',))
  per_device = jax.jit(jax.shard_map(
      lambda x: A.augment_batch(KEY, x, small_cfg(), 2,
                                start_index=jax.lax.axis_index('data') * x.shape[0]),
      mesh=mesh, in_specs=P('data'), out_specs=P('data')))
  for sharded, expected in zip(per_device(images), full):
    np.testing.assert_allclose(sharded, expected, rtol=0, atol=ULP_TOL)


def test_augment_batch_with_explicitly_sharded_batch():
  # Under explicit mesh axes vmap needs the keys sharded like the batch; augment_batch does it.
  n = jax.device_count()
  assert n == 8, 'conftest should provide 8 CPU devices'
  images = uint8_batch()
  mesh = jax.make_mesh((n,), ('data',), axis_types=(AxisType.Explicit,))
  sharded_images = jax.device_put(images, NamedSharding(mesh, P('data')))
  for sharded, expected in zip(augment_batch_fn()(KEY, sharded_images),
                               augment_batch_fn()(KEY, images)):
    assert sharded.sharding.spec[0] == 'data'
    np.testing.assert_allclose(sharded, expected, rtol=0, atol=ULP_TOL)


def test_normalize():
  images = rand_image((2, 4, 4, 3))
  mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
  np.testing.assert_allclose(A.normalize(images, mean, std),
                             (images - np.array(mean)) / np.array(std), atol=1e-6)


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


def test_blur_is_a_no_op_at_16_pixels_unless_a_kernel_size_is_set():
  """The ConvNet recipes' 16-pixel crops get SimCLR's 10 % kernel, one pixel: no blur, as
  configs/common.py set_backbone documents; augment.blur_kernel_size turns it back on."""
  image = rand_image((28, 28, 3))

  def view(**overrides):
    cfg = small_cfg(blur_prob=1.0, jitter_prob=0.0, grayscale_prob=0.0, solarize_prob=0.0)
    cfg.update(overrides)
    return np.asarray(jax.jit(lambda k, x: A.simclr_view(k, x, cfg))(KEY, image))

  no_blur = view(blur_prob=0.0)
  np.testing.assert_array_equal(view(), no_blur)
  np.testing.assert_array_equal(view(blur_kernel_size=0), no_blur)
  assert np.abs(view(blur_kernel_size=3) - no_blur).max() > 1e-2
