"""Host-side decoding and cropping: the crop-box distribution against torchvision's formula
and the device sampler, decoding of every image mode, resampling against independent
computations, and the per-view randomness.

Each test's comment names the bug it is there to catch.
"""

from __future__ import annotations

import functools
import io
import math
import pickle
import random
import struct
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageFile
from scipy import stats

from ssl_jax.data import augment as A
from ssl_jax.data import host_crop as H

RATIO = (3 / 4, 4 / 3)
N_BOXES = 20000
# Each KS comparison must have p above this; the samples are seeded, so the test is
# deterministic, and with ~30 comparisons a correct sampler would fail a reseeded run with
# probability ~0.3%.
KS_MIN_P = 1e-4


# --------------------------------------------------------------------------------------------
# Crop-box statistics


def torchvision_box(rnd: random.Random, height, width, scale, ratio, bug=None):
  """torchvision's RandomResizedCrop.get_params, literally, with torch's draws in `random`.

  `bug` plants one mistake, to show that the distribution checks reject it.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    if bug == 'side_uniform':  # the side, not the area, uniform: area ~ scale^2
      lo, hi = math.sqrt(scale[0]), math.sqrt(scale[1])
      target_area = area * rnd.uniform(lo, hi) ** 2
    else:
      target_area = area * rnd.uniform(scale[0], scale[1])
    if bug == 'uniform_aspect':
      aspect_ratio = rnd.uniform(ratio[0], ratio[1])
    else:
      aspect_ratio = math.exp(rnd.uniform(log_ratio[0], log_ratio[1]))
    rounding = int if bug == 'floor' else round
    w = int(rounding(math.sqrt(target_area * aspect_ratio)))
    h = int(rounding(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      last = 1 if bug == 'top_off_by_one' else 0  # never places the box at the bottom
      i = rnd.randint(0, height - h - last)
      j = rnd.randint(0, width - w)
      return i, j, h, w
  if bug == 'whole_fallback':
    return 0, 0, height, width
  # Fallback to central crop
  in_ratio = float(width) / float(height)
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:  # whole image
    w = width
    h = height
  i = (height - h) // 2
  j = (width - w) // 2
  return i, j, h, w


def torchvision_boxes(height, width, scale, ratio=RATIO, n=N_BOXES, bug=None, seed=1):
  rnd = random.Random(seed)
  return np.array([torchvision_box(rnd, height, width, scale, ratio, bug) for _ in range(n)])


def host_boxes(height, width, scale, ratio=RATIO, n=N_BOXES):
  # Through view_rng, as random_views draws them: one generator per stream position.
  return np.array([H.sample_crop_box(H.view_rng(7, p, 0), height, width, scale, ratio)
                   for p in range(n)])


def device_boxes(height, width, scale, ratio=RATIO, n=N_BOXES):
  sample = jax.jit(jax.vmap(
      lambda k: A.sample_crop_box(k, height, width, tuple(scale), tuple(ratio))))
  return np.asarray(sample(jax.random.split(jax.random.key(3), n)))


def box_statistics(boxes, height, width):
  top, left, h, w = boxes.T.astype(np.float64)
  return {
      'area_fraction': h * w / (height * width),
      'log_aspect': np.log(w / h),
      'relative_top': top / np.maximum(height - h, 1),
      'relative_left': left / np.maximum(width - w, 1),
  }


def assert_same_distribution(boxes_a, boxes_b, height, width):
  stats_a = box_statistics(boxes_a, height, width)
  stats_b = box_statistics(boxes_b, height, width)
  for name in stats_a:
    p = stats.ks_2samp(stats_a[name], stats_b[name]).pvalue
    assert p > KS_MIN_P, f'{name}: KS p-value {p:.2e} on a {height}x{width} image'


# ImageNet's typical shape; a small image with DINO's local-crop scale, where the boxes are
# 5-12 px and rounding shapes the distribution; an elongated image where about half the
# draws fall back to the central box.
BOX_CASES = [(375, 500, (0.08, 1.0)), (28, 28, (0.05, 0.14)), (40, 400, (0.08, 1.0))]


@functools.lru_cache(maxsize=None)
def cached_host_boxes(height, width, scale):
  return host_boxes(height, width, scale)


@pytest.mark.parametrize('height,width,scale', BOX_CASES)
def test_host_boxes_distributed_as_torchvision_and_device(height, width, scale):
  # Catches a host sampler that departs from torchvision's formula (area, log-aspect,
  # rounding, placement, fallback) or from the device sampler: then host and device views
  # would differ in distribution, and the host views would no longer be torchvision's.
  host = cached_host_boxes(height, width, scale)
  assert np.all(host[:, 2:] > 0)
  assert np.all(host[:, 0] + host[:, 2] <= height)
  assert np.all(host[:, 1] + host[:, 3] <= width)
  assert_same_distribution(host, torchvision_boxes(height, width, scale), height, width)
  assert_same_distribution(host, device_boxes(height, width, scale), height, width)


@pytest.mark.parametrize('bug,height,width,scale', [
    ('uniform_aspect', 375, 500, (0.08, 1.0)),
    ('side_uniform', 375, 500, (0.08, 1.0)),
    ('floor', 28, 28, (0.05, 0.14)),
    ('top_off_by_one', 28, 28, (0.05, 0.14)),
    ('whole_fallback', 40, 400, (0.08, 1.0)),
])
def test_box_check_rejects_planted_bugs(bug, height, width, scale):
  # Catches a distribution check without power: each planted mistake must be rejected by
  # the same comparison that the host sampler passes above.
  host = cached_host_boxes(height, width, scale)
  with pytest.raises(AssertionError, match='KS p-value'):
    assert_same_distribution(host, torchvision_boxes(height, width, scale, bug=bug),
                             height, width)


@pytest.mark.parametrize('height,width,ratio', [
    (40, 400, RATIO), (400, 40, RATIO), (41, 400, RATIO), (400, 41, RATIO), (30, 31, RATIO),
    (40, 400, (0.5, 2.0)), (37, 100, (1.0, 1.0))])
def test_fallback_is_torchvision_central_box(height, width, ratio):
  # Catches a wrong fallback (whole image, off-centre, wrong rounding or side): an area
  # fraction of 1.5 never fits, so every draw falls back. A 41-px side gives 54.67 px, where
  # int() and round() differ.
  rnd = random.Random(0)
  expected = torchvision_box(rnd, height, width, (1.5, 1.5), ratio)
  rng = np.random.default_rng(0)
  for _ in range(20):
    assert H.sample_crop_box(rng, height, width, (1.5, 1.5), ratio) == expected
  assert H.central_crop_box(height, width, ratio) == expected
  device = A.sample_crop_box(jax.random.key(0), height, width, (1.5, 1.5), ratio)
  assert tuple(int(v) for v in device) == expected


def test_fallback_values():
  # Anchors the reference itself: the central 40x53 box of a 40x400 image (40 * 4/3 wide)
  # and the 53x40 one of a 400x40 image (40 / (3/4) tall).
  assert H.central_crop_box(40, 400) == (0, 173, 40, 53)
  assert H.central_crop_box(400, 40) == (173, 0, 53, 40)


# --------------------------------------------------------------------------------------------
# decode_image


def encode(array, fmt, mode=None, **kwargs):
  buf = io.BytesIO()
  Image.fromarray(array, mode).save(buf, fmt, **kwargs)
  return buf.getvalue()


def rand_uint8(shape, seed=0):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def smooth_rgb(height=24, width=32):
  # Smooth content, so that JPEG's error is small enough for tight tolerances.
  y, x = np.mgrid[0:height, 0:width]
  return np.stack([4 * x + 20, 5 * y + 30, 2 * x + 3 * y + 10], -1).astype(np.uint8)


def test_decode_jpeg_and_png_rgb():
  # Catches a decoder that returns the wrong pixels, mode or orientation (e.g. BGR, HxW
  # swapped, or lazy images that are not loaded).
  image = rand_uint8((21, 34, 3))
  decoded = H.decode_image(encode(image, 'PNG'))
  assert decoded.mode == 'RGB'
  np.testing.assert_array_equal(np.asarray(decoded), image)
  smooth = smooth_rgb()
  decoded = H.decode_image(encode(smooth, 'JPEG', quality=95))
  assert decoded.mode == 'RGB' and decoded.size == (32, 24)
  assert np.abs(np.asarray(decoded).astype(int) - smooth).max() <= 6


@pytest.mark.parametrize('fmt', ['PNG', 'JPEG'])
def test_decode_grayscale_to_three_equal_channels(fmt):
  # Catches a grayscale file returned with one channel, or converted with a colour cast.
  gray = smooth_rgb()[..., 0]
  decoded = np.asarray(H.decode_image(encode(gray, fmt)))
  assert decoded.shape == gray.shape + (3,)
  np.testing.assert_array_equal(decoded[..., 0], decoded[..., 1])
  np.testing.assert_array_equal(decoded[..., 0], decoded[..., 2])
  if fmt == 'PNG':
    np.testing.assert_array_equal(decoded[..., 0], gray)


def test_decode_rgba_drops_alpha():
  # Catches alpha composited onto a background (or kept as a 4th channel): the colour
  # channels must come through unchanged, as with torchvision's loader.
  rgba = rand_uint8((13, 17, 4))
  decoded = np.asarray(H.decode_image(encode(rgba, 'PNG')))
  np.testing.assert_array_equal(decoded, rgba[..., :3])


def test_decode_palette():
  # Catches palette indices returned instead of colours.
  palette = rand_uint8((256, 3), seed=1)
  indices = rand_uint8((15, 11), seed=2)
  image = Image.fromarray(indices, 'P')
  image.putpalette(palette.reshape(-1).tolist())
  buf = io.BytesIO()
  image.save(buf, 'PNG')
  np.testing.assert_array_equal(np.asarray(H.decode_image(buf.getvalue())), palette[indices])


def test_decode_cmyk_jpeg():
  # Catches a CMYK JPEG returned with 4 channels or uninverted.
  cmyk = np.zeros((16, 16, 4), np.uint8)
  cmyk[..., :3] = (40, 100, 200)
  decoded = np.asarray(H.decode_image(encode(cmyk, 'JPEG', 'CMYK', quality=95)))
  assert decoded.shape == (16, 16, 3)
  assert np.abs(decoded.astype(int) - (215, 155, 55)).max() <= 3


def test_decode_16bit_png_rescales():
  # Catches PIL's default 16-bit to 8-bit conversion, which clips at 255 (so every value
  # above 255/65535 of full scale would come out white) instead of rescaling.
  values = np.linspace(0, 65535, 40 * 30).round().astype(np.uint16).reshape(40, 30)
  data = encode(values, 'PNG')
  assert Image.open(io.BytesIO(data)).mode.startswith('I')
  expected = np.round(values / 257.0).astype(np.uint8)
  rgb = np.asarray(H.decode_image(data))
  for c in range(3):
    np.testing.assert_array_equal(rgb[..., c], expected)
  np.testing.assert_array_equal(np.asarray(H.decode_image(data, channels=1)), expected)


def test_decode_channels_1_is_pil_luma():
  # Catches a wrong luma (e.g. a channel mean, or TF's different weights) for channels=1,
  # which must be PIL's convert('L'), as torchvision's rgb_to_grayscale, from every mode.
  rgb = rand_uint8((19, 23, 3))
  expected = np.asarray(Image.fromarray(rgb).convert('L'))
  decoded = H.decode_image(encode(rgb, 'PNG'), channels=1)
  assert decoded.mode == 'L'
  np.testing.assert_array_equal(np.asarray(decoded), expected)
  rgba = np.concatenate([rgb, rand_uint8((19, 23, 1), seed=5)], -1)
  np.testing.assert_array_equal(np.asarray(H.decode_image(encode(rgba, 'PNG'), channels=1)),
                                expected)
  with pytest.raises(ValueError, match='channels'):
    H.decode_image(encode(rgb, 'PNG'), channels=2)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
  return (struct.pack('>I', len(payload)) + kind + payload +
          struct.pack('>I', zlib.crc32(kind + payload)))


def png_bomb(width, height):
  """A tiny PNG claiming width x height 1-bit pixels (Pillow refuses it in Image.open)."""
  ihdr = struct.pack('>IIBBBBB', width, height, 1, 0, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + png_chunk(b'IHDR', ihdr) +
          png_chunk(b'IDAT', zlib.compress(b'\0' * 64)) + png_chunk(b'IEND', b''))


@pytest.mark.parametrize('case', ['random_bytes', 'empty', 'truncated_jpeg',
                                  'corrupt_png', 'decompression_bomb'])
def test_undecodable_raises_image_decode_error(case):
  # Catches errors that escape as other types (a worker process would die instead of the
  # pipeline skipping the file; a decompression bomb raises a non-OSError), truncated files
  # accepted with grey filling (lazy loading, or LOAD_TRUNCATED_IMAGES switched on), and the
  # global flag left changed.
  flag_before = ImageFile.LOAD_TRUNCATED_IMAGES
  jpeg = encode(rand_uint8((64, 80, 3)), 'JPEG', quality=90)
  png = bytearray(encode(rand_uint8((40, 50, 3)), 'PNG'))
  png[len(png) // 2] ^= 0xFF
  data = {
      'random_bytes': np.random.default_rng(0).bytes(2000),
      'empty': b'',
      'truncated_jpeg': jpeg[:len(jpeg) // 2],
      'corrupt_png': bytes(png),
      'decompression_bomb': png_bomb(20000, 20000),
  }[case]
  with pytest.raises(H.ImageDecodeError) as info:
    H.decode_image(data)
  assert info.value.__cause__ is not None  # the underlying reason is kept
  if case == 'truncated_jpeg':
    assert 'truncated' in str(info.value)
  if case == 'decompression_bomb':
    assert isinstance(info.value.__cause__, Image.DecompressionBombError)
  assert ImageFile.LOAD_TRUNCATED_IMAGES == flag_before
  assert issubclass(H.ImageDecodeError, ValueError)


# --------------------------------------------------------------------------------------------
# crop_resize and center_crop


@pytest.mark.parametrize('channels', [3, 1])
def test_crop_resize_same_size_is_exact_copy(channels):
  # Catches a misplaced box (top and left swapped, h and w swapped, (l, t, r, b) misread as
  # (l, t, w, h), off by one) and a one-channel result without its channel axis: at scale 1
  # bilinear resampling copies pixels exactly.
  image = rand_uint8((30, 40, 3) if channels == 3 else (30, 40))
  out = H.crop_resize(Image.fromarray(image), (3, 11, 17, 17), 17)
  assert out.shape == (17, 17, channels) and out.dtype == np.uint8
  expected = image[3:20, 11:28]
  np.testing.assert_array_equal(out, expected.reshape(17, 17, channels))


@pytest.mark.parametrize('box,size', [((7, 11, 37, 45), 15), ((2, 30, 25, 9), 13)])
def test_crop_resize_matches_crop_then_resize_inside(box, size):
  # Catches resampling the wrong region or with another filter: away from the box's edges,
  # one resampling with box= equals cropping with NumPy and resizing the crop (at the edges
  # the box= filter also reads pixels outside the box, as the device does). Up to 1: PIL
  # may run its two passes in the other order on the smaller image, rounding in between;
  # a box off by one pixel differs by tens of levels on this noise.
  image = rand_uint8((60, 80, 3))
  top, left, h, w = box
  out = H.crop_resize(Image.fromarray(image), box, size)
  crop = Image.fromarray(image[top:top + h, left:left + w])
  expected = np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR))
  assert out.shape == (size, size, 3)
  assert np.abs(out.astype(int) - expected)[2:-2, 2:-2].max() <= 1


def test_crop_resize_whole_image_is_plain_resize():
  # Catches a box that does not cover what it says (e.g. h and w swapped on a non-square
  # image) and odd output sizes handled wrongly.
  image = Image.fromarray(rand_uint8((45, 70, 3)))
  out = H.crop_resize(image, (0, 0, 45, 70), 31)
  np.testing.assert_array_equal(out, np.asarray(image.resize((31, 31),
                                                             Image.Resampling.BILINEAR)))


@jax.jit
def _device_crop(image, box):
  return A.crop_and_resize(image, box, (14, 14))


def test_crop_resize_matches_device_crop_and_resize():
  # Catches the host and device halves disagreeing on the same box (pixel-centre
  # convention, antialiasing, or edge handling such as crop-then-resize, which differs by
  # tens of levels at the box's edges): within uint8 rounding they must agree.
  image = rand_uint8((60, 80, 3))
  for box in [(7, 11, 37, 45), (0, 0, 60, 80), (10, 20, 12, 9), (40, 3, 20, 77)]:
    host = H.crop_resize(Image.fromarray(image), box, 14).astype(np.float32)
    device = np.asarray(_device_crop(jnp.asarray(image, jnp.float32), jnp.asarray(box)))
    assert np.abs(host - device).max() < 1.0, box


def test_center_crop_picks_centre_with_torchvision_rounding():
  # Catches an off-centre crop (floor or round-half-up instead of torchvision's
  # int(round(x / 2.0)), which rounds half to even) and axes swapped: with the short side
  # already at resize_size the resize is the identity, so the crop is an exact copy.
  image = rand_uint8((51, 53, 3))
  out = H.center_crop(Image.fromarray(image), 51, 20)
  # (51 - 20) / 2 = 15.5 -> 16 and (53 - 20) / 2 = 16.5 -> 16.
  np.testing.assert_array_equal(out, image[16:36, 16:36])
  gray = rand_uint8((53, 51))
  out = H.center_crop(Image.fromarray(gray), 51, 20)
  np.testing.assert_array_equal(out, gray[16:36, 16:36, None])


@pytest.mark.parametrize('shape', [(375, 499, 3), (500, 333, 3), (200, 201), (28, 28)])
def test_center_crop_matches_resize_then_crop(shape):
  # Catches a wrong resized size (e.g. round instead of int for the long side: 340 vs 341
  # for 375x499, which differs by up to 127 here) or a wrong box scale: one resampling with
  # box= must equal torchvision's Resize then CenterCrop on PIL images, up to 1 (PIL's
  # order of its two passes, with rounding in between, depends on the image size).
  image = Image.fromarray(rand_uint8(shape))
  resize_size, crop_size = (256, 224) if shape[0] > 100 else (32, 28)
  width, height = image.size
  short, long = min(width, height), max(width, height)
  new_short, new_long = resize_size, int(resize_size * long / short)
  new_size = (new_short, new_long) if width <= height else (new_long, new_short)
  resized = np.asarray(image.resize(new_size, Image.Resampling.BILINEAR))
  top = int(round((new_size[1] - crop_size) / 2.0))
  left = int(round((new_size[0] - crop_size) / 2.0))
  expected = resized[top:top + crop_size, left:left + crop_size]
  out = H.center_crop(image, resize_size, crop_size)
  assert out.shape == (crop_size, crop_size, 3 if len(shape) == 3 else 1)
  assert np.abs(out.astype(int) - expected.reshape(out.shape)).max() <= 1


def test_center_crop_rejects_crop_larger_than_resize():
  # Catches a silent out-of-bounds crop (torchvision would pad; evaluation never needs it).
  with pytest.raises(ValueError, match='crop_size'):
    H.center_crop(Image.fromarray(rand_uint8((40, 40, 3))), 32, 33)


# --------------------------------------------------------------------------------------------
# view_rng, random_views, crop_specs


def test_view_rng_deterministic_and_distinct():
  # Catches randomness that ignores an argument (every view or every position identical,
  # or different seeds giving the same stream) or that is not reproducible.
  draw = lambda *args: H.view_rng(*args).random(4).tolist()
  assert draw(0, 5, 1) == draw(0, 5, 1)
  draws = [draw(0, 5, 1), draw(0, 6, 1), draw(0, 5, 0), draw(1, 5, 1), draw(0, 2**40, 1)]
  assert len({tuple(d) for d in draws}) == len(draws)


SPECS = (H.CropSpec(16, (0.08, 1.0), RATIO), H.CropSpec(16, (0.08, 1.0), RATIO),
         H.CropSpec(7, (0.05, 0.14), RATIO))


@pytest.mark.parametrize('channels', [3, 1])
def test_random_views_boxes_from_original_size(channels):
  # Catches boxes sampled on (W, H) instead of (H, W) (on this tall image they would leave
  # it), view v not drawing from view_rng(seed, position, v), a spec's scale or size
  # ignored, and results that are not reproducible.
  image = Image.fromarray(rand_uint8((200, 30, 3) if channels == 3 else (200, 30)))
  for position in range(40):
    views = H.random_views(image, SPECS, 3, position)
    assert [v.shape for v in views] == [(16, 16, channels)] * 2 + [(7, 7, channels)]
    for v, (view, spec) in enumerate(zip(views, SPECS)):
      box = H.sample_crop_box(H.view_rng(3, position, v), 200, 30, spec.scale, spec.ratio)
      np.testing.assert_array_equal(view, H.crop_resize(image, box, spec.size))
  again = H.random_views(image, SPECS, 3, 39)
  for a, b in zip(views, again):
    np.testing.assert_array_equal(a, b)


def test_random_views_differ_across_views_and_positions():
  # Catches two views of an example sharing one box (a positive pair of identical crops)
  # or every example getting the same crop.
  image = Image.fromarray(rand_uint8((60, 80, 3)))
  v0, v1, _ = H.random_views(image, SPECS, 0, 0)
  assert not np.array_equal(v0, v1)
  assert not np.array_equal(v0, H.random_views(image, SPECS, 0, 1)[0])


def test_crop_specs_from_view_configs():
  # Catches global and local crops mixed up (size, scale) or their order changed: the host
  # must cut view v as augment.view_configs describes view v.
  cfg = A.default_simclr_config()
  cfg.num_local_crops = 6
  cfg.local_crop_size = 96
  cfg.local_crop_scale = (0.05, 0.14)
  specs = H.crop_specs(A.view_configs(cfg, 2))
  assert specs == ((H.CropSpec(224, (0.08, 1.0), RATIO),) * 2 +
                   (H.CropSpec(96, (0.05, 0.14), RATIO),) * 6)
  assert all(isinstance(s.size, int) for s in specs)


def test_pickles_for_worker_processes():
  # Catches something grain cannot ship to its worker processes (a lambda or local class).
  specs = pickle.loads(pickle.dumps(SPECS))
  fn = pickle.loads(pickle.dumps(functools.partial(H.random_views, specs=specs)))
  image = Image.fromarray(rand_uint8((20, 20, 3)))
  for a, b in zip(fn(image, seed=0, position=4), H.random_views(image, SPECS, 0, 4)):
    np.testing.assert_array_equal(a, b)
