"""SimCLR data augmentations (Chen et al. 2020, Appendix A) as pure per-example JAX functions.

Each random op is `op(key, image, ...) -> image` on ONE float32 image HxWxC in [0, 1]
(C == 1 grayscale or C == 3 RGB) and is vmapped over a batch by the caller with one key per
example. Randomness only ever enters through the key and every branch on a sampled value is
a `jnp.where` / `lax.cond` / `lax.switch`, so the ops run unchanged under `jit` and `vmap`.
Where the paper defers to torchvision (RandomResizedCrop, ColorJitter, RandomGrayscale,
GaussianBlur) the semantics follow torchvision's.

`view_configs` turns the experiment's `augment` config into one config per view: the global
views (with optional per-view overrides, e.g. BYOL's asymmetric blur and solarisation) and
the multi-crop local views (Caron et al. 2020: smaller crops of a smaller area).
`augment_views` is the trainer's entry point. The key of example `i` in view `v` is

    fold_in(fold_in(key, v), start_index + i)

so an example's views depend only on (key, its global index, view): never on the batch size
or on which device holds it. A device holding global rows [s, s + n) passes start_index=s;
inside a jitted, batch-sharded computation with start_index=0 this holds automatically.
"""

from __future__ import annotations

import math
import types
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

from ssl_jax.data import host_crop

Array = jax.Array

# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

# torchvision's RandomResizedCrop tries 10 boxes before falling back.
CROP_ATTEMPTS = host_crop.CROP_ATTEMPTS


def _is_rgb(image: Array) -> bool:
  # Channel count is static, so grayscale-only branches are removed at trace time.
  return image.shape[-1] == 3


# Each op draws all its randomness as ONE uniform vector from its key: every separate draw
# inlines its own Threefry hash, and compile time grows with their number.


def _uniforms(key: Array, n: int) -> Array:
  # A flat draw rounded up to a multiple of 8: under vmap, XLA:CPU compiled such draws 2-5x
  # faster than other lengths or multi-dimensional shapes (measured with jax 0.10).
  return jax.random.uniform(key, (-(-n // 8) * 8,))[:n]


def _uniform_between(u: Array, low: float, high: float) -> Array:
  # Equal bounds give exactly `low`, which makes zero-strength settings exact identities.
  return low + (high - low) * u


def _apply_with_prob(u: Array, p: float, fn: Callable[[Array], Array], image: Array) -> Array:
  # A Python p of 0 or 1 is decided at trace time, so e.g. SimCLR's solarize_prob = 0 costs
  # neither compile nor run time.
  if isinstance(p, (int, float)):
    if p <= 0:
      return image
    if p >= 1:
      return fn(image)
  # u is uniform in [0, 1). lax.cond skips the work when not vmapped; under vmap it becomes
  # a select.
  return lax.cond(u < p, fn, lambda x: x, image)


# ---------------------------------------------------------------------------------------------
# Random resized crop


def sample_crop_box(key: Array, height: int, width: int,
                    scale: Sequence[float] = (0.08, 1.0),
                    ratio: Sequence[float] = (3 / 4, 4 / 3)) -> Array:
  """Samples torchvision's RandomResizedCrop box, returned as int32 [top, left, h, w].

  All attempts are drawn at once (vectorised rejection sampling) and the first that fits is
  kept, which keeps the shapes static; if none fits, torchvision's central-crop fallback.
  """
  u_area, u_ratio, u_top, u_left = _uniforms(key, 4 * CROP_ATTEMPTS).reshape(4, CROP_ATTEMPTS)
  target_area = height * width * _uniform_between(u_area, scale[0], scale[1])
  aspect = jnp.exp(_uniform_between(u_ratio, math.log(ratio[0]), math.log(ratio[1])))
  # Integer sizes and positions, as torchvision crops whole pixels.
  w = jnp.round(jnp.sqrt(target_area * aspect)).astype(jnp.int32)
  h = jnp.round(jnp.sqrt(target_area / aspect)).astype(jnp.int32)
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  top = _uniform_offset(u_top, height - h + 1)
  left = _uniform_offset(u_left, width - w + 1)
  first = jnp.argmax(fits)
  sampled = jnp.stack([top[first], left[first], h[first], w[first]])
  return jnp.where(jnp.any(fits), sampled, _central_crop_box(height, width, ratio))


def _uniform_offset(u: Array, num_positions: Array) -> Array:
  # Uniform integer in [0, num_positions); the clamp only matters for boxes that do not fit,
  # which are discarded anyway.
  n = jnp.maximum(num_positions, 1)
  return jnp.minimum(jnp.floor(u * n).astype(jnp.int32), n - 1)


def _central_crop_box(height: int, width: int, ratio: Sequence[float]) -> Array:
  # torchvision's fallback, shared with the host sampler (static: the shape is known).
  return jnp.array(host_crop.central_crop_box(height, width, ratio), jnp.int32)


def crop_and_resize(image: Array, box: Array, out_size: Sequence[int]) -> Array:
  """Resizes image[top:top+h, left:left+w] to out_size bilinearly, in one resampling.

  scale_and_translate maps input coordinate y to output y * scale + translation, so the box's
  top edge goes to 0 and its bottom edge to out_h. Because the box is traced only through
  scale and translation, the output shape stays static and the op vmaps over boxes.
  """
  top, left, h, w = (box[i].astype(jnp.float32) for i in range(4))
  out_h, out_w = out_size
  scale = jnp.stack([out_h / h, out_w / w])
  translation = -jnp.stack([top, left]) * scale
  # antialias matches torchvision's resize default when the crop is larger than the output.
  return jax.image.scale_and_translate(
      image, (out_h, out_w, image.shape[-1]), (0, 1), scale, translation,
      method='bilinear', antialias=True).astype(image.dtype)


def random_resized_crop(key: Array, image: Array, out_size: Sequence[int],
                        scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3)) -> Array:
  """torchvision's RandomResizedCrop: random box of random area and aspect, resized."""
  height, width = image.shape[:2]
  box = sample_crop_box(key, height, width, scale, ratio)
  return crop_and_resize(image, box, tuple(out_size))


# ---------------------------------------------------------------------------------------------
# Flip


def horizontal_flip(key: Array, image: Array, p: float = 0.5) -> Array:
  return _apply_with_prob(jax.random.uniform(key), p, lambda x: x[:, ::-1], image)


# ---------------------------------------------------------------------------------------------
# Colour: deterministic adjustments (torchvision.transforms.functional semantics)


def to_grayscale(image: Array) -> Array:
  """Luma as an HxWx1 image; a 1-channel image already is its own luma."""
  if not _is_rgb(image):
    return image
  # An explicit weighted sum rather than a dot with a constant vector: inside shard_map,
  # vmap of lax.cond trips JAX's varying-axes check on dot_general's constant operand.
  r, g, b = image[..., 0:1], image[..., 1:2], image[..., 2:3]
  return LUMA_WEIGHTS[0] * r + LUMA_WEIGHTS[1] * g + LUMA_WEIGHTS[2] * b


def _blend(image: Array, other: Array, factor: Array) -> Array:
  # torchvision clamps after every blend, so the ops compose on in-range images.
  return jnp.clip(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def adjust_brightness(image: Array, factor: Array) -> Array:
  return _blend(image, jnp.zeros_like(image), factor)


def adjust_contrast(image: Array, factor: Array) -> Array:
  # Blends towards the single mean luma of the whole image, not a per-channel mean.
  return _blend(image, jnp.mean(to_grayscale(image)), factor)


def adjust_saturation(image: Array, factor: Array) -> Array:
  if not _is_rgb(image):
    return image
  return _blend(image, to_grayscale(image), factor)


def rgb_to_hsv(image: Array) -> Array:
  """HxWx3 RGB in [0, 1] to HSV with every channel in [0, 1] (torchvision's _rgb2hsv)."""
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  maxc = jnp.max(image, axis=-1)
  minc = jnp.min(image, axis=-1)
  gray = maxc == minc
  chroma = maxc - minc
  # Gray pixels have no defined hue; the safe divisors keep them at h = s = 0 without NaNs.
  s = chroma / jnp.where(gray, 1.0, maxc)
  safe_chroma = jnp.where(gray, 1.0, chroma)
  rc = (maxc - r) / safe_chroma
  gc = (maxc - g) / safe_chroma
  bc = (maxc - b) / safe_chroma
  h = jnp.where(maxc == r, bc - gc,
                jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
  h = jnp.where(gray, 0.0, h)
  h = jnp.mod(h / 6.0 + 1.0, 1.0)
  return jnp.stack([h, s, maxc], axis=-1)


def hsv_to_rgb(image: Array) -> Array:
  """Inverse of rgb_to_hsv (torchvision's _hsv2rgb)."""
  h, s, v = image[..., 0], image[..., 1], image[..., 2]
  sector = jnp.floor(h * 6.0)
  f = h * 6.0 - sector
  sector = jnp.mod(sector, 6).astype(jnp.int32)
  p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
  q = jnp.clip(v * (1.0 - s * f), 0.0, 1.0)
  t = jnp.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
  # (r, g, b) for each of the six 60-degree sectors of the hue circle.
  table = jnp.stack([
      jnp.stack([v, t, p], -1), jnp.stack([q, v, p], -1), jnp.stack([p, v, t], -1),
      jnp.stack([p, q, v], -1), jnp.stack([t, p, v], -1), jnp.stack([v, p, q], -1),
  ], axis=0)
  return jnp.take_along_axis(table, sector[None, ..., None], axis=0)[0]


def adjust_hue(image: Array, delta: Array) -> Array:
  """Rotates hue by delta (in turns, torchvision's hue_factor)."""
  if not _is_rgb(image):
    return image
  hsv = rgb_to_hsv(image)
  hsv = hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + delta, 1.0))
  # The HSV round trip is only exact to rounding; a zero shift must be exactly the identity.
  return jnp.where(delta == 0, image, hsv_to_rgb(hsv).astype(image.dtype))


# ---------------------------------------------------------------------------------------------
# Colour: random ops


def _factor_range(strength: float) -> tuple[float, float]:
  # torchvision keeps multiplicative factors non-negative.
  return max(0.0, 1.0 - strength), 1.0 + strength


def sample_jitter_params(u: Array, brightness: float, contrast: float, saturation: float,
                         hue: float) -> tuple[Array, Array]:
  """torchvision's ColorJitter.get_params from 8 uniforms u in [0, 1).

  Returns (order, factors): a permutation of the op indices 0..3 (brightness, contrast,
  saturation, hue) and the four sampled values [b, c, s, hue_delta].
  """
  # The ranks of 4 i.i.d. uniforms are a uniformly random permutation (ties have
  # probability ~0), and cheaper to compile than jax.random.permutation's sorting rounds.
  order = jnp.argsort(u[4:8])
  factors = jnp.stack([
      _uniform_between(u[0], *_factor_range(brightness)),
      _uniform_between(u[1], *_factor_range(contrast)),
      _uniform_between(u[2], *_factor_range(saturation)),
      _uniform_between(u[3], -hue, hue),
  ])
  return order, factors


def apply_jitter(image: Array, order: Array, factors: Array) -> Array:
  """Applies the four colour adjustments in the given order with the given factors."""
  ops = [
      lambda x: adjust_brightness(x, factors[0]),
      lambda x: adjust_contrast(x, factors[1]),
      lambda x: adjust_saturation(x, factors[2]),
      lambda x: adjust_hue(x, factors[3]),
  ]
  # The order is traced, so each slot picks its op with lax.switch; a fori_loop rather than
  # four unrolled slots compiles the four ops once instead of four times.
  return lax.fori_loop(0, 4, lambda slot, x: lax.switch(order[slot], ops, x), image)


def color_jitter(key: Array, image: Array, brightness: float, contrast: float,
                 saturation: float, hue: float, p: float = 0.8) -> Array:
  """torchvision's ColorJitter, applied with probability p (SimCLR's RandomApply)."""
  u = _uniforms(key, 9)
  order, factors = sample_jitter_params(u[1:], brightness, contrast, saturation, hue)
  return _apply_with_prob(u[0], p, lambda x: apply_jitter(x, order, factors), image)


def random_grayscale(key: Array, image: Array, p: float = 0.2) -> Array:
  if not _is_rgb(image):
    return image
  return _apply_with_prob(jax.random.uniform(key), p,
                          lambda x: jnp.broadcast_to(to_grayscale(x), x.shape), image)


# ---------------------------------------------------------------------------------------------
# Blur and solarize


def default_blur_kernel_size(side: int) -> int:
  """SimCLR's choice: about 10% of the image side, made odd (23 for 224)."""
  radius = (side // 10) // 2
  return 2 * radius + 1


def gaussian_kernel1d(sigma: Array, kernel_size: int) -> Array:
  radius = kernel_size // 2
  x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  # As sigma -> 0 the off-centre taps underflow to 0, leaving an exact delta.
  weights = jnp.exp(-0.5 * (x / sigma) ** 2)
  return weights / jnp.sum(weights)


def _convolve_axis(image: Array, kernel: Array, axis: int) -> Array:
  # Unrolled taps over reflect-padded shifts: a depthwise 1-D convolution whose kernel may
  # differ per example under vmap, which a batched lax.conv would handle less directly.
  radius = kernel.shape[0] // 2
  pad = [(0, 0)] * image.ndim
  pad[axis] = (radius, radius)
  padded = jnp.pad(image, pad, mode='reflect')
  n = image.shape[axis]
  taps = [kernel[k] * lax.slice_in_dim(padded, k, k + n, axis=axis)
          for k in range(kernel.shape[0])]
  return sum(taps[1:], taps[0])


def blur(image: Array, sigma: Array, kernel_size: int) -> Array:
  """Separable Gaussian blur with reflect padding (torchvision's gaussian_blur)."""
  kernel = gaussian_kernel1d(sigma, kernel_size)
  return _convolve_axis(_convolve_axis(image, kernel, 0), kernel, 1)


def gaussian_blur(key: Array, image: Array, p: float = 0.5,
                  sigma: Sequence[float] = (0.1, 2.0), kernel_size: int | None = None) -> Array:
  """Blur with sigma uniform in `sigma`, applied with probability p."""
  if kernel_size is None:
    kernel_size = default_blur_kernel_size(min(image.shape[:2]))
  if kernel_size < 1 or kernel_size % 2 == 0 or kernel_size // 2 >= min(image.shape[:2]):
    # Reflect padding needs the kernel radius to be smaller than the image side.
    raise ValueError(f'kernel_size must be odd with kernel_size // 2 < image side, '
                     f'got {kernel_size} for an image of shape {image.shape}')
  u_apply, u_sigma = _uniforms(key, 2)
  s = _uniform_between(u_sigma, sigma[0], sigma[1])
  return _apply_with_prob(u_apply, p, lambda x: blur(x, s, kernel_size), image)


def solarize(key: Array, image: Array, p: float = 0.0, threshold: float = 0.5) -> Array:
  return _apply_with_prob(jax.random.uniform(key), p,
                          lambda x: jnp.where(x >= threshold, 1.0 - x, x), image)


# ---------------------------------------------------------------------------------------------
# Policy and batched entry point


def default_simclr_config() -> ml_collections.ConfigDict:
  """SimCLR's ImageNet augmentation with colour strength s = 1."""
  s = 1.0
  return ml_collections.ConfigDict(dict(
      crop_size=224,
      crop_scale=(0.08, 1.0),
      crop_ratio=(3 / 4, 4 / 3),
      flip_prob=0.5,
      jitter_prob=0.8,
      brightness=0.8 * s,
      contrast=0.8 * s,
      saturation=0.8 * s,
      hue=0.2 * s,
      grayscale_prob=0.2,
      blur_prob=0.5,
      blur_sigma=(0.1, 2.0),
      solarize_prob=0.0,
  ))


def simclr_view(key: Array, image: Array, cfg: Any, crop: bool = True) -> Array:
  """One SimCLR view: crop -> flip -> colour jitter -> grayscale -> blur -> solarize.

  `cfg` is read by attribute and must hold Python values (it is static under jit). Optional
  attributes: `blur_kernel_size` (0 or absent: ~10% of crop_size) and `solarize_threshold` (0.5).
  `crop=False` takes `image` to be the view's crop already, made on the host from the original
  image (`data.host_crop`); the other ops then draw exactly what they would after a crop.
  """
  k_crop, k_flip, k_jitter, k_gray, k_blur, k_solar = jax.random.split(key, 6)
  size = (cfg.crop_size, cfg.crop_size)
  if crop:
    image = random_resized_crop(k_crop, image, size, tuple(cfg.crop_scale),
                                tuple(cfg.crop_ratio))
  elif image.shape[:2] != size:
    raise ValueError(f'A host-cropped view must be {size}, got {image.shape[:2]}.')
  image = horizontal_flip(k_flip, image, cfg.flip_prob)
  image = color_jitter(k_jitter, image, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue,
                       cfg.jitter_prob)
  image = random_grayscale(k_gray, image, cfg.grayscale_prob)
  image = gaussian_blur(k_blur, image, cfg.blur_prob, tuple(cfg.blur_sigma),
                        getattr(cfg, 'blur_kernel_size', None) or None)
  return solarize(k_solar, image, cfg.solarize_prob, getattr(cfg, 'solarize_threshold', 0.5))


def example_keys(key: Array, view: int, batch_size: int, start_index: int | Array = 0) -> Array:
  """Per-example keys of one view: fold_in(fold_in(key, view), start_index + i).

  fold_in rather than split(key, batch_size): a split key's i-th element may depend on the
  batch size, while this one depends only on the example's global index.
  """
  view_key = jax.random.fold_in(key, view)
  indices = start_index + jnp.arange(batch_size, dtype=jnp.int32)
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(view_key, indices)


# Fields that a view may override through `augment.per_view.<field> = (view 0, view 1, ...)`.
PER_VIEW_FIELDS = ('flip_prob', 'jitter_prob', 'grayscale_prob', 'blur_prob', 'solarize_prob',
                   'brightness', 'contrast', 'saturation', 'hue')


def view_configs(cfg: Any, num_global_views: int) -> list[types.SimpleNamespace]:
  """Per-view augmentation settings: the global views, then `cfg.num_local_crops` local ones.

  A field listed in `cfg.per_view` holds one value per global view; local crops keep the base
  value of every field and use `local_crop_size` and `local_crop_scale` for their crop.
  """
  base = {k: (tuple(v) if isinstance(v, (list, tuple)) else v)
          for k, v in _as_dict(cfg).items() if k != 'per_view'}
  per_view = _as_dict(getattr(cfg, 'per_view', None) or {})
  for field, values in per_view.items():
    if field not in PER_VIEW_FIELDS:
      raise ValueError(f'augment.per_view.{field} is not a per-view field; '
                       f'known: {PER_VIEW_FIELDS}.')
    if len(values) != num_global_views:
      raise ValueError(f'augment.per_view.{field} has {len(values)} values but the method '
                       f'uses {num_global_views} global views.')
  views = []
  for v in range(num_global_views):
    views.append(types.SimpleNamespace(**dict(base, **{f: vals[v] for f, vals in
                                                       per_view.items()})))
  num_local = base.get('num_local_crops', 0)
  if num_local:
    local = dict(base, crop_size=base['local_crop_size'] or round(base['crop_size'] * 96 / 224),
                 crop_scale=tuple(base['local_crop_scale']))
    views.extend(types.SimpleNamespace(**local) for _ in range(num_local))
  return views


def _as_dict(cfg: Any) -> dict:
  if hasattr(cfg, 'to_dict'):
    return cfg.to_dict()
  if isinstance(cfg, types.SimpleNamespace):
    return dict(vars(cfg))
  return dict(cfg)


def augment_views(key: Array, images_uint8: Array | Sequence[Array],
                  view_cfgs: Sequence[Any], start_index: int | Array = 0) -> list[Array]:
  """One augmented view of a uint8 batch [B, H, W, C] per entry of `view_cfgs`.

  `images_uint8` is either the batch as stored (each view is cropped from it here) or one
  uint8 batch [B, s, s, C] per view, already cropped on the host (variable-size images,
  `data.host_crop`). Returns float32 arrays [B, s, s, C] in [0, 1], s being each view's
  crop_size. Keys come from `example_keys`, so example i's views depend only on
  (key, start_index + i, view).
  """
  cropped = isinstance(images_uint8, (tuple, list))
  if cropped and len(images_uint8) != len(view_cfgs):
    raise ValueError(f'{len(images_uint8)} host-cropped views for {len(view_cfgs)} views.')
  # A Python loop over views: vmapping over views as well compiled ~50% slower on XLA:CPU,
  # and multi-crop views differ in size anyway.
  views = []
  for v, view_cfg in enumerate(view_cfgs):
    images = (images_uint8[v] if cropped else images_uint8).astype(jnp.float32) / 255.0
    per_example = jax.vmap(lambda k, x, c=view_cfg: simclr_view(k, x, c, crop=not cropped))
    keys = _shard_like(example_keys(key, v, images.shape[0], start_index), images)
    views.append(per_example(keys, images))
  return views


def augment_batch(key: Array, images_uint8: Array, cfg: Any, num_views: int = 2,
                  start_index: int | Array = 0) -> list[Array]:
  """`num_views` global views (plus any local crops `cfg` asks for) of a uint8 batch."""
  return augment_views(key, images_uint8, view_configs(cfg, num_views), start_index)


def _shard_like(keys: Array, images: Array) -> Array:
  """Splits [B] keys over devices as the batch axis of `images` is split.

  With explicit mesh axes vmap requires this; with auto axes (or inside shard_map) the spec
  is empty and the compiler places the keys itself.
  """
  sharding = jax.typeof(images).sharding
  batch_axis = sharding.spec[0] if len(sharding.spec) else None
  if batch_axis is None:
    return keys
  spec = jax.sharding.PartitionSpec(batch_axis)
  return jax.sharding.reshard(keys, jax.sharding.NamedSharding(sharding.mesh, spec))


def normalize(images: Array, mean: Sequence[float] | Array, std: Sequence[float] | Array) -> Array:
  """Per-channel standardisation over the last axis."""
  mean = jnp.asarray(mean, images.dtype)
  std = jnp.asarray(std, images.dtype)
  return (images - mean) / std
