"""Host half of the view policy: decode an image and cut its random-resized crops on the CPU.

Variable-size images (ImageNet JPEGs, a folder of PNG/JPEG files) cannot be batched before
they are cropped, so grain worker processes decode each one with Pillow, sample every view's
RandomResizedCrop box on the ORIGINAL image size and resize the box to the view's crop size.
The accelerator then receives fixed-size uint8 views and applies the rest of the policy
(flip, colour jitter, grayscale, blur, solarisation) with `augment`.

The box sampler is the formula of `augment.sample_crop_box` (torchvision's
RandomResizedCrop.get_params), and `crop_resize` resamples the box in one antialiased
bilinear pass, as `augment.crop_and_resize` does: a view cut here is distributed as one cut
on the device from the whole image.

Randomness: view `v` of the example at position `p` of the global example stream draws from
`view_rng(seed, p, v)`, so it depends on neither the batch size, the worker nor the host.

Everything here is a module-level function or a NamedTuple, so it pickles into grain's
worker processes.
"""

from __future__ import annotations

import io
import math
from typing import Any, NamedTuple, Sequence

import numpy as np
from PIL import Image

# torchvision's RandomResizedCrop tries 10 boxes before falling back (augment uses this one).
CROP_ATTEMPTS = 10

# Modes holding 16-bit (or wider) grey levels. PIL's convert('L'/'RGB') clips these at 255
# instead of rescaling, which would turn most of a 16-bit PNG white.
_WIDE_GRAY_MODES = frozenset({'I', 'I;16', 'I;16B', 'I;16L', 'I;16N'})


class ImageDecodeError(ValueError):
  """The bytes are not an image Pillow can fully decode (unknown format, corrupt, truncated)."""


def decode_image(data: bytes, channels: int = 3) -> Image.Image:
  """Fully decodes `data` to an 'RGB' (channels=3) or 'L' (channels=1) image.

  Grayscale, palette, RGBA (alpha dropped, not composited, as torchvision's loader),
  CMYK and 16-bit images are converted; 'L' is ITU-R 601-2 luma (PIL's convert('L'),
  torchvision's rgb_to_grayscale). EXIF orientation is not applied (as torchvision and TF).

  Raises:
    ImageDecodeError: with the underlying reason, for anything that cannot be decoded,
      including truncated files: the pixels are loaded here, not lazily later.
  """
  if channels not in (1, 3):
    raise ValueError(f'channels must be 1 or 3, got {channels}.')
  try:
    image = Image.open(io.BytesIO(data))
    # Image.open only reads the header; load() decodes now, so corrupt data fails here.
    # A truncated file raises because ImageFile.LOAD_TRUNCATED_IMAGES is left at its default
    # (False): it is a process-wide global, and grain's prefetch threads share the process.
    image.load()
    return _convert(image, channels)
  except MemoryError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # Pillow's format plugins raise many exception types on bad input (OSError, SyntaxError,
    # ValueError, EOFError, struct.error, DecompressionBombError, ...); one type lets the
    # pipeline skip the file instead of losing a worker process.
    raise ImageDecodeError(f'cannot decode image ({len(data)} bytes): '
                           f'{type(e).__name__}: {e}') from e


def _convert(image: Image.Image, channels: int) -> Image.Image:
  target = 'RGB' if channels == 3 else 'L'
  if image.mode == target:
    return image
  if image.mode in _WIDE_GRAY_MODES:
    image = _wide_gray_to_l(image)
    return image if target == 'L' else image.convert('RGB')
  if image.mode != 'RGB':
    # RGB first, so that every mode reaches 'L' by the same luma formula.
    image = image.convert('RGB')
  return image if target == 'RGB' else image.convert('L')


def _wide_gray_to_l(image: Image.Image) -> Image.Image:
  # 16-bit grey levels to 8 bits by round(v / 257), which maps 0..65535 onto 0..255 exactly.
  values = np.asarray(image).astype(np.int64)
  return Image.fromarray(((np.clip(values, 0, 65535) + 128) // 257).astype(np.uint8), 'L')


class CropSpec(NamedTuple):
  """One view's random-resized crop: output side, area fraction range, aspect range."""
  size: int
  scale: tuple[float, float]
  ratio: tuple[float, float]


def crop_specs(view_cfgs: Sequence[Any]) -> tuple[CropSpec, ...]:
  """The crops of `augment.view_configs(...)`'s views, in the same order."""
  return tuple(
      CropSpec(int(c.crop_size), (float(c.crop_scale[0]), float(c.crop_scale[1])),
               (float(c.crop_ratio[0]), float(c.crop_ratio[1])))
      for c in view_cfgs)


def sample_crop_box(rng: np.random.Generator, height: int, width: int,
                    scale: Sequence[float] = (0.08, 1.0),
                    ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """torchvision's RandomResizedCrop box (top, left, h, w) on a height x width image.

  Up to 10 attempts of area uniform in `scale` times the image area and log-aspect uniform
  in log(`ratio`); the first box that fits is placed uniformly. If none fits, torchvision's
  central fallback.
  """
  # One draw for all attempts: a Generator call costs more than the arithmetic.
  u = rng.random(4 * CROP_ATTEMPTS)
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for k in range(CROP_ATTEMPTS):
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[k])
    aspect = math.exp(log_lo + (log_hi - log_lo) * u[CROP_ATTEMPTS + k])
    # Python's round (half to even), as torchvision and jnp.round.
    w = round(math.sqrt(target_area * aspect))
    h = round(math.sqrt(target_area / aspect))
    if 0 < w <= width and 0 < h <= height:
      top = int(u[2 * CROP_ATTEMPTS + k] * (height - h + 1))
      left = int(u[3 * CROP_ATTEMPTS + k] * (width - w + 1))
      return top, left, h, w
  return central_crop_box(height, width, ratio)


def central_crop_box(height: int, width: int,
                     ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """torchvision's fallback: the largest central box whose aspect ratio lies within `ratio`."""
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _as_array(image: Image.Image) -> np.ndarray:
  array = np.asarray(image)
  # A one-channel image keeps its channel axis, as the device side expects [H, W, C].
  return array[..., None] if array.ndim == 2 else array


def crop_resize(image: Image.Image, box: Sequence[int], size: int) -> np.ndarray:
  """image[top:top+h, left:left+w] resized to size x size: uint8 [size, size, C].

  One antialiased bilinear resampling of the box (PIL's resize with `box=`, no intermediate
  crop). Near the box's edges the filter reads the image pixels just outside the box, as
  `augment.crop_and_resize` does, where torchvision's crop-then-resize clamps to the box.
  """
  top, left, h, w = (int(v) for v in box)
  resized = image.resize((size, size), Image.Resampling.BILINEAR,
                         box=(left, top, left + w, top + h))
  return _as_array(resized)


def center_crop(image: Image.Image, resize_size: int, crop_size: int) -> np.ndarray:
  """The evaluation transform, torchvision's Resize(resize_size) + CenterCrop(crop_size).

  The short side goes to resize_size and the long one to int(resize_size * long / short);
  the central crop_size square of that is computed directly from the original image in one
  bilinear antialiased resampling, with the same filter positions as resizing then cropping
  (equal up to PIL's rounding between its two passes, whose order depends on the sizes).
  Returns uint8 [crop_size, crop_size, C].
  """
  if not 0 < crop_size <= resize_size:
    raise ValueError(f'Need 0 < crop_size <= resize_size, got crop_size={crop_size} and '
                     f'resize_size={resize_size}.')
  width, height = image.size
  if width <= height:
    new_w, new_h = resize_size, int(resize_size * height / width)
  else:
    new_w, new_h = int(resize_size * width / height), resize_size
  top = int(round((new_h - crop_size) / 2.0))
  left = int(round((new_w - crop_size) / 2.0))
  # The crop in original coordinates: output pixel j of the crop is pixel left + j of the
  # resized image, whose filter is centred at (left + j + 0.5) * width / new_w.
  sx, sy = width / new_w, height / new_h
  box = (left * sx, top * sy, (left + crop_size) * sx, (top + crop_size) * sy)
  resized = image.resize((crop_size, crop_size), Image.Resampling.BILINEAR, box=box)
  return _as_array(resized)


def view_rng(seed: int, position: int, view: int) -> np.random.Generator:
  """The generator of view `view` of the example at `position` of the global stream."""
  return np.random.default_rng([seed, position, view])


def random_views(image: Image.Image, specs: Sequence[CropSpec], seed: int,
                 position: int) -> tuple[np.ndarray, ...]:
  """One uint8 [spec.size, spec.size, C] random-resized crop of `image` per spec."""
  width, height = image.size
  return tuple(
      crop_resize(image, sample_crop_box(view_rng(seed, position, v), height, width,
                                         spec.scale, spec.ratio), spec.size)
      for v, spec in enumerate(specs))
