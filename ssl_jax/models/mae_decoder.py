"""MAE's lightweight decoder (He et al. 2022, "Masked Autoencoders Are Scalable Vision
Learners", Sec. 3; reference github.com/facebookresearch/mae, models_mae.py).

It sees the encoded visible patches and a shared, learned mask token at every masked
position, each with its (fixed 2-D sin-cos) position embedding, runs a few Transformer blocks
(`vit.Block`) and predicts the pixels of every patch: patch_size^2 x channels values per
patch, in the order `patchify` lays them out. Only pre-training uses it; the encoder alone is
the representation.

Initialisation as vit.py's (Linear weights truncated normal 0.02, zero biases); the mask token
normal 0.02 as the reference's. The reference draws its Linear weights Xavier-uniform.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ssl_jax.models import vit


def patchify(images: jnp.ndarray, patch_size: int) -> jnp.ndarray:
  """[B, H, W, C] -> [B, (H/p) (W/p), p p C]: patches in row-major order of the grid (the
  ViT's token order), each flattened row by row, channels last (the reference's
  'nchpwq->nhwpqc'). Pixels past the last whole patch are dropped, as by the ViT."""
  b, h, w, c = images.shape
  p = patch_size
  gh, gw = h // p, w // p
  x = images[:, :gh * p, :gw * p].reshape(b, gh, p, gw, p, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * c)


def unpatchify(patches: jnp.ndarray, grid: tuple[int, int], patch_size: int) -> jnp.ndarray:
  """`patchify`'s inverse: [B, gh gw, p p C] -> [B, gh p, gw p, C]."""
  b, _, d = patches.shape
  p = patch_size
  c = d // (p * p)
  x = patches.reshape(b, grid[0], grid[1], p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, grid[0] * p, grid[1] * p, c)


def pixel_targets(images: jnp.ndarray, patch_size: int, normalize: bool,
                  eps: float = 1e-6) -> jnp.ndarray:
  """float32 [B, L, p p C]: the pixels to reconstruct. With `normalize` (the paper's
  norm_pix_loss, Sec. 3 and Table 1c) each patch's pixels minus their mean, over
  sqrt(var + eps), the variance unbiased (PyTorch's `Tensor.var`, as the reference)."""
  target = patchify(images.astype(jnp.float32), patch_size)
  if not normalize:
    return target
  mean = jnp.mean(target, axis=-1, keepdims=True)
  var = jnp.var(target, axis=-1, keepdims=True, ddof=1)
  return (target - mean) / jnp.sqrt(var + eps)


class MAEDecoder(nn.Module):
  """Encoded tokens [B, 1 + K, D_enc] (class token first, then the K visible patches) and
  `restore` [B, L] (the position, among the visible-then-masked order, of each patch of the
  grid: the reference's ids_restore), the `grid` (rows, columns) of patches and the images'
  `channels` -> predicted pixels [B, L, p p C] in float32."""
  width: int = 512
  depth: int = 8
  num_heads: int = 16
  mlp_ratio: float = 4.0
  patch_size: int = 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, restore, grid: tuple[int, int], channels: int,
               train: bool = True):
    b, num_patches = restore.shape
    x = nn.Dense(self.width, dtype=self.dtype, kernel_init=vit._trunc_normal,  # noqa: SLF001
                 bias_init=nn.initializers.zeros, name='embed')(tokens.astype(self.dtype))
    mask_token = self.param('mask_token', nn.initializers.normal(0.02), (1, 1, self.width))
    num_masked = num_patches - (x.shape[1] - 1)
    # Visible patches, then a mask token per masked patch, put back in grid order.
    shuffled = jnp.concatenate(
        [x[:, 1:], jnp.broadcast_to(mask_token.astype(self.dtype), (b, num_masked, self.width))],
        axis=1)
    patches = jnp.take_along_axis(shuffled, restore[:, :, None], axis=1)
    x = jnp.concatenate([x[:, :1], patches], axis=1)
    # Fixed, as the reference's decoder_pos_embed (requires_grad=False); none for the class
    # token (a zero row).
    table = np.concatenate([np.zeros((1, self.width), np.float32),
                            vit.sincos_2d_position_embedding(grid[0], grid[1], self.width)])
    x = x + jnp.asarray(table).astype(self.dtype)
    for i in range(self.depth):
      x = vit.Block(self.num_heads, self.mlp_ratio, dtype=self.dtype, name=f'block_{i}')(
          x, train)
    x = vit._layer_norm('norm')(x).astype(self.dtype)  # noqa: SLF001
    pred = nn.Dense(self.patch_size ** 2 * channels, dtype=self.dtype,
                    kernel_init=vit._trunc_normal, bias_init=nn.initializers.zeros,  # noqa: SLF001
                    name='pred')(x)
    return pred[:, 1:].astype(jnp.float32)  # the class token predicts nothing
