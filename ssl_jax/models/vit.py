"""Vision Transformers (Dosovitskiy et al. 2021) as encoders for every method.

The architecture is timm's `VisionTransformer` as DINO and MoCo v3 use it: a patch embedding
(a convolution with kernel and stride `patch_size`), a class token, absolute position
embeddings, pre-LayerNorm blocks of multi-head self-attention and a GELU MLP, and a final
LayerNorm. The representation is the class token (`pool='cls'`) or the mean of the patch
tokens (`pool='gap'`, normalised after pooling as timm's `fc_norm` and MAE do).

Initialisation follows timm's default scheme (`init_weights_vit_timm`) and DINO's: Linear
weights truncated normal with standard deviation 0.02 and zero biases, LayerNorm ones and
zeros, the learned position embedding and the class token truncated normal 0.02 (DINO; timm
draws the class token with std 1e-6). Neither touches the patch embedding's convolution, which
keeps PyTorch's default; here it is LeCun normal (flax's default, and timm's 'jax' scheme)
with a zero bias. jax's truncated normal is a normal of std 0.02 cut at two standard
deviations (0.88 x 0.02 after the cut); PyTorch's `trunc_normal_(std=.02)` cuts at +-2
absolute, that is not at all.

`optim.decay_mask` decays every parameter of more than one dimension: here the position
embedding and the class token too, as DINO's parameter groups do (timm exempts them).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax import parallel
from ssl_jax.models import remat as remat_lib

POOLS = ('cls', 'gap')
POS_EMBEDS = ('learned', 'sincos')
# name: (width, depth, heads); the MLP is 4 x width wide in all of them. 'vit_micro' is no
# paper's: a 4-block ViT for the CPU recipe on Fashion-MNIST (configs/common.py), where a
# ViT-Ti step costs some 40 times the ConvNet's; the others are DeiT's and ViT's.
SIZES = {
    'vit_micro': (64, 4, 2),
    'vit_tiny': (192, 12, 3),
    'vit_small': (384, 12, 6),
    'vit_base': (768, 12, 12),
    'vit_large': (1024, 24, 16),
}

_trunc_normal = nn.initializers.truncated_normal(stddev=0.02)


def _layer_norm(name: str) -> nn.LayerNorm:
  # float32 whatever the compute dtype. Two-pass variance: E[x^2] - E[x]^2 cancels when the
  # residual stream's mean is large against its spread.
  return nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, use_fast_variance=False, name=name)


def _dense(features: int, dtype, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, kernel_init=_trunc_normal,
                  bias_init=nn.initializers.zeros, name=name)


def sincos_2d_position_embedding(grid_h: int, grid_w: int, dim: int,
                                 temperature: float = 10000.0) -> np.ndarray:
  """[grid_h * grid_w, dim] fixed 2-D sin-cos embedding of MoCo v3's
  `build_2d_sincos_position_embedding`: sin and cos of the row index times dim / 4
  frequencies, then of the column index (tokens in row-major order, as the patches)."""
  if dim % 4:
    raise ValueError(f'The sin-cos position embedding needs a width divisible by 4, got {dim}.')
  pos_dim = dim // 4
  omega = 1.0 / temperature ** (np.arange(pos_dim, dtype=np.float32) / pos_dim)
  rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float32),
                           np.arange(grid_w, dtype=np.float32), indexing='ij')
  out_r = rows.reshape(-1, 1) * omega
  out_c = cols.reshape(-1, 1) * omega
  return np.concatenate([np.sin(out_r), np.cos(out_r), np.sin(out_c), np.cos(out_c)],
                        axis=1).astype(np.float32)


def resize_position_embedding(pos_embed, grid: tuple[int, int]):
  """[1, 1 + S*S, D] embedding of a square S x S grid (class token first) for a grid of
  `grid` = (h, w) patches: the patch part resized bicubically (DINO's
  `interpolate_pos_encoding`), the class token's unchanged; as is when the grid matches.

  jax's bicubic kernel has a = -0.5 where PyTorch's has -0.75; both interpolate (they agree
  on the original grid points). Without antialiasing, as PyTorch's `interpolate`.
  """
  num_patches, dim = pos_embed.shape[1] - 1, pos_embed.shape[2]
  side = math.isqrt(num_patches)
  if side * side != num_patches:
    raise ValueError(f'Position embedding of {num_patches} patches is not a square grid.')
  if tuple(grid) == (side, side):
    return pos_embed
  patches = pos_embed[:, 1:].reshape(1, side, side, dim).astype(jnp.float32)
  patches = jax.image.resize(patches, (1, grid[0], grid[1], dim), 'bicubic', antialias=False)
  return jnp.concatenate([pos_embed[:, :1].astype(jnp.float32),
                          patches.reshape(1, grid[0] * grid[1], dim)], axis=1)


def drop_path_mask(key, rows: int, keep_prob: float, axis_name=None,
                   rows_per_view: int = 0, first_row=None) -> jnp.ndarray:
  """[rows] booleans: which of these rows keep a residual branch (stochastic depth).

  The rows are read as consecutive blocks of `rows_per_view` rows (0: one block), as a
  method concatenates its views: block v holds examples first_row + 0, 1, ... of view v,
  where `first_row` is the global-batch index of the first example (None: this device's
  first row, `parallel.global_row_offset` over `axis_name`, the batch axes inside
  `shard_map`; a micro-batch passes its own, `ssl_jax.microbatch`).
  Example e of view v keeps the branch iff a float32 uniform drawn from
  fold_in(fold_in(key, v), e) is below `keep_prob` (float32 in float64 mode too, so that a
  float64 reference run drops the same rows). With the same `key` on every device, an
  example's mask depends only on the key, its view and its index in the global batch, never
  on the device that holds it, the device count or the micro-batch: as
  `augment.example_keys` for the views.
  """
  per_view = rows_per_view or rows
  if rows % per_view:
    raise ValueError(f'A batch of {rows} rows is not whole views of {per_view} rows.')
  row = np.arange(rows)
  if first_row is None:
    first_row = parallel.global_row_offset(per_view, axis_name)
  example = first_row + row % per_view
  fold = lambda view, e: jax.random.fold_in(jax.random.fold_in(key, view), e)  # noqa: E731
  keys = jax.vmap(fold)(row // per_view, example)
  # float32 whatever the default float: under jax_enable_x64 (the float64 reference runs)
  # a default-dtype uniform would come from 64 bits and drop other rows. numpy's float32,
  # which the tests' float64 reference leaves alone (it maps jnp.float32 to float64).
  uniform = jax.vmap(lambda k: jax.random.uniform(k, dtype=np.float32))(keys)
  return uniform < np.float32(keep_prob)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (timm's layout: q, k, v, then heads);
  softmax in float32."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    head_dim = d // self.num_heads
    qkv = _dense(3 * d, self.dtype, 'qkv')(x).reshape(b, n, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    # Logits accumulated and kept in float32: rounded to bfloat16 they would reach the
    # float32 softmax with three significant digits.
    logits = jnp.einsum('bqhd,bkhd->bhqk', q * head_dim ** -0.5, k,
                        preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, n, d)
    return _dense(d, self.dtype, 'proj')(out)


class Block(nn.Module):
  """x + DropPath(LayerScale(Attention(LN(x)))), then the same with the MLP."""
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  layer_scale_init: float = 0.0
  dtype: Any = jnp.float32
  axis_name: Any = None  # for the drop-path masks: see `drop_path_mask`
  rows_per_view: int = 0
  first_row: Any = None

  def _residual(self, y, name: str, train: bool):
    if self.layer_scale_init:
      gamma = self.param(name, nn.initializers.constant(self.layer_scale_init), y.shape[-1:])
      y = y * gamma.astype(self.dtype)
    # Stochastic depth needs a 'dropout' rng: the methods pass one to their online network
    # in training (`Method.dropout_rngs`), none to a target or teacher, and evaluation runs
    # with train=False; without one the block is deterministic whatever the rate.
    if train and self.drop_path > 0 and self.has_rng('dropout'):
      keep = 1.0 - self.drop_path
      mask = drop_path_mask(self.make_rng('dropout'), y.shape[0], keep, self.axis_name,
                            self.rows_per_view, self.first_row)
      y = jnp.where(mask[:, None, None], y / keep, 0).astype(self.dtype)
    return y

  @nn.compact
  def __call__(self, x, train: bool = True):
    d = x.shape[-1]
    y = Attention(self.num_heads, dtype=self.dtype, name='attn')(
        _layer_norm('norm1')(x).astype(self.dtype))
    x = x + self._residual(y, 'ls1', train)
    y = _layer_norm('norm2')(x).astype(self.dtype)
    y = nn.gelu(_dense(int(d * self.mlp_ratio), self.dtype, 'fc1')(y), approximate=False)
    y = _dense(d, self.dtype, 'fc2')(y)
    return x + self._residual(y, 'ls2', train)


class ViT(nn.Module):
  """A Vision Transformer; `__call__` returns float32 features [B, width].

  Attributes:
    width, depth, num_heads, mlp_ratio: the transformer's size (`SIZES`).
    patch_size: side of the square patches; inputs are cut into floor(H / p) x floor(W / p)
      of them (a remainder is dropped, as by PyTorch's strided convolution).
    pool: 'cls' (the class token) or 'gap' (mean of the patch tokens).
    pos_embed: 'learned' (a parameter for the grid seen at initialisation, resized
      bicubically for other grids) or 'sincos' (MoCo v3's fixed 2-D sin-cos, a constant
      rather than a parameter, computed for the input's grid: positions in patch units, so
      a larger input extends the grid instead of stretching it; nothing for weight decay
      to shrink). The class token gets a learned embedding or none (sin-cos, as MoCo v3).
    drop_path_rate: stochastic depth rising linearly from 0 in the first block to this in
      the last (timm, DINO); active only in training with a 'dropout' rng (see `Block`).
      An example's masks depend on the rng and its place in the global batch only, so a step
      is the same on any number of devices (`drop_path_mask`).
    axis_name: the mesh axis (or axes) that the batch is split over inside `shard_map`
      (None: one device), rows_per_view: how the local batch is laid out, in blocks of
      this many rows, one per view (0: a single block), and first_row: the global index of
      the first example (None: this device's first row); they only place each row in the
      global batch for its drop-path masks (`drop_path_mask`), nothing is communicated.
    layer_scale_init: initial value of LayerScale's per-channel gains (CaiT); 0: none.
    frozen_patch_embed: MoCo v3's random, frozen patch projection: no gradient reaches the
      patch embedding.
    dtype: computation dtype; parameters stay float32, LayerNorm and softmax run in float32.
    remat: recompute each `Block`'s activations in the backward pass instead of storing them
      (`remat.py`), except what `remat_policy` names ('' = its default).
  """
  width: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  patch_size: int = 16
  pool: str = 'cls'
  pos_embed: str = 'learned'
  drop_path_rate: float = 0.0
  layer_scale_init: float = 0.0
  frozen_patch_embed: bool = False
  dtype: Any = jnp.float32
  axis_name: Any = None
  rows_per_view: int = 0
  first_row: Any = None
  remat: bool = False
  remat_policy: str = ''

  @nn.compact
  def __call__(self, x, train: bool = True, keep=None, tokens: bool = False, mask=None,
               mask_token=None):
    """Features [B, width] of images x [B, H, W, C].

    keep: None (every patch), or int [B, K] indices of the patch tokens (row-major in the
      grid) that the blocks see, per example: MAE's visible patches (He et al. 2022, Sec. 3),
      taken after the position embeddings are added, so each keeps its place, and after the
      class token, which every example keeps. Parameters and their shapes do not depend on
      it.
    tokens: return every token after the final LayerNorm, [B, 1 + K, width] (the class token
      first; K = all patches without `keep`), as MAE's decoder reads them, instead of the
      pooled features.
    mask, mask_token: None, or bool [B, L] (True: masked; patches row-major in the grid) and
      `width` values (any shape of that size): iBOT's masked image modelling (Zhou et al.
      2022, `masked_embed`) puts the mask token in place of each masked patch's embedding,
      before the position embedding is added, so the token still says where the patch was.
      The token belongs to the caller's network, not to the ViT, whose parameters stay a
      plain ViT's.
    """
    if self.width % self.num_heads:
      raise ValueError(f'ViT width {self.width} is not divisible by its {self.num_heads} heads.')
    if self.pool not in POOLS or self.pos_embed not in POS_EMBEDS:
      raise ValueError(f'ViT pool must be one of {POOLS} and pos_embed one of {POS_EMBEDS}; '
                       f'got {self.pool!r}, {self.pos_embed!r}.')
    p = self.patch_size
    if min(x.shape[1:3]) < p:
      raise ValueError(f'Inputs of {x.shape[1:3]} pixels are smaller than one {p}-pixel patch.')
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                kernel_init=nn.initializers.lecun_normal(), name='patch_embed')(
                    x.astype(self.dtype))
    if self.frozen_patch_embed:
      # No gradient; and since weight decay needs none, the optimizer leaves the kernel out
      # too, as MoCo v3's requires_grad=False does (`models.frozen_parameters`, declared by
      # `Method.frozen_steps`, applied by `optim.make_optimizer`).
      x = jax.lax.stop_gradient(x)
    b, grid_h, grid_w, d = x.shape
    x = x.reshape(b, grid_h * grid_w, d)
    if mask is not None:
      x = jnp.where(mask[:, :, None], jnp.reshape(mask_token, (1, 1, d)).astype(self.dtype), x)
    cls_token = self.param('cls_token', _trunc_normal, (1, 1, d))
    x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(self.dtype), (b, 1, d)), x], axis=1)
    if self.pos_embed == 'learned':
      if self.is_initializing() and grid_h != grid_w:
        raise ValueError(f'Initialise the ViT on square inputs (got a {grid_h} x {grid_w} '
                         'patch grid): its position embedding is stored for a square grid.')
      if self.has_variable('params', 'pos_embed'):
        # Read as stored: `self.param` would reject a grid other than the one at init.
        table = self.get_variable('params', 'pos_embed')
      else:
        table = self.param('pos_embed', _trunc_normal, (1, 1 + grid_h * grid_w, d))
      table = resize_position_embedding(table, (grid_h, grid_w))
    else:
      table = np.concatenate([np.zeros((1, d), np.float32),
                              sincos_2d_position_embedding(grid_h, grid_w, d)])[None]
    x = x + jnp.asarray(table).astype(self.dtype)
    if keep is not None:
      patches = jnp.take_along_axis(x[:, 1:], keep[:, :, None], axis=1)
      x = jnp.concatenate([x[:, :1], patches], axis=1)
    rates = np.linspace(0.0, self.drop_path_rate, self.depth)
    # `train` is passed positionally and static (self is 0): the block branches on it. The
    # blocks keep their names (block_i) with or without remat.
    block = remat_lib.remat(Block, self.remat_policy, (2,)) if self.remat else Block
    for i in range(self.depth):
      x = block(self.num_heads, self.mlp_ratio, drop_path=float(rates[i]),
                layer_scale_init=self.layer_scale_init, dtype=self.dtype,
                axis_name=self.axis_name, rows_per_view=self.rows_per_view,
                first_row=self.first_row, name=f'block_{i}')(x, train)
    if tokens:
      return _layer_norm('norm')(x).astype(jnp.float32)
    if self.pool == 'cls':
      x = _layer_norm('norm')(x[:, 0])  # LayerNorm is per token: the others are not needed
    else:
      x = _layer_norm('norm')(jnp.mean(x[:, 1:].astype(jnp.float32), axis=1))
    return x.astype(jnp.float32)
