"""Feature extraction from a frozen encoder, in fixed-size jitted batches."""

from __future__ import annotations

import numpy as np
import jax


def extract_features(encode_fn, images_uint8: np.ndarray, batch_size: int = 1024,
                     image_size: int | None = None) -> np.ndarray:
  """Applies `encode_fn(float_images) -> [B, D]` over uint8 images [N, H, W, C] in batches
  (float images are taken to be in [0, 1] already, e.g. augmented views).

  `image_size` resizes the images first (bilinear, antialiased), for encoders trained on
  crops of another resolution. The last batch is padded so that one compiled shape serves
  every batch.
  """

  encode = jax.jit(lambda x: encode_fn(preprocess(x, image_size)))
  outputs = []
  for start in range(0, len(images_uint8), batch_size):
    batch = images_uint8[start:start + batch_size]
    pad = batch_size - len(batch)
    if pad:
      batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], batch.dtype)])
    outputs.append(np.asarray(encode(batch))[:batch_size - pad])
  return np.concatenate(outputs)


def preprocess(images, image_size: int | None = None):
  """What evaluation feeds an encoder: uint8 images scaled to float [0, 1] (float images are
  taken to be in [0, 1] already), resized to `image_size` (bilinear, antialiased) if set."""
  is_uint8 = images.dtype == np.uint8
  x = images.astype(np.float32) / 255.0 if is_uint8 else images.astype(np.float32)
  if image_size and image_size != x.shape[1]:
    x = jax.image.resize(x, (x.shape[0], image_size, image_size, x.shape[3]), 'bilinear')
  return x


def raw_pixel_features(images_uint8: np.ndarray) -> np.ndarray:
  return images_uint8.reshape(len(images_uint8), -1).astype(np.float32) / 255.0
