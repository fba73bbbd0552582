"""MAE (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners"; reference
github.com/facebookresearch/mae, models_mae.py).

Each image is cut into L patches; a random 75 % of them are masked (Sec. 3, "Masking"), the
ViT encoder runs on the visible ones only (with their position embeddings and the class
token), and a lightweight decoder (`models.mae_decoder`) sees the encoded visible patches
plus a learned mask token at every masked position and predicts the pixels of every patch.
The loss is the mean squared error between predicted and target pixels, averaged over the
masked patches only (Sec. 3, "Reconstruction target"):

  L = sum_i sum_{j in M_i} ||pred_ij - target_ij||^2 / (P sum_i |M_i|),

M_i the masked patches of example i, P the pixels per patch; the target is each patch's
pixels normalised by its own mean and standard deviation (norm_pix_loss, Table 1c). The
sums run over the whole global batch (a psum over the batch axes), so the loss is the same on
any number of devices, as is each example's mask: it is drawn from the loss's rng folded with
the example's index in the global batch (`random_masking`), as drop-path masks are.

Evaluation uses the encoder alone on the whole image (`encode`), its parameters a plain ViT's:
an MAE checkpoint loads wherever a ViT encoder does.

One view per image, no target network, no state. Departures from the reference: its Linear
layers and patch projection are initialised Xavier-uniform, here as models/vit.py (timm's
truncated normal, LeCun normal); its sin-cos position embeddings put the column before the
row (here vit.py's `sincos_2d_position_embedding`, row first: the same set of functions).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax import models, parallel
from ssl_jax.methods.base import Method
from ssl_jax.methods.common import concatenated_views
from ssl_jax.models import DTYPES, build_encoder
from ssl_jax.models.mae_decoder import MAEDecoder, pixel_targets

# fold_in tag ('mask') that keeps the masking keys apart from the dropout keys and what
# else the loss draws from its rng.
_MASK_STREAM = 0x6D61736B


def num_visible(num_patches: int, mask_ratio: float) -> int:
  """Patches each example keeps: the reference's int(L (1 - mask_ratio))."""
  return int(num_patches * (1 - mask_ratio))


def random_masking(key, rows: int, num_patches: int, mask_ratio: float, first_row=None,
                   axis_name=None):
  """Per-example random masks of `rows` examples, the reference's `random_masking`:
  (keep [rows, K] int32, the visible patches' indices in a random order; mask [rows, L]
  float32, 1 where masked; restore [rows, L] int32, each patch's position in the order
  visible-then-masked, which puts the decoder's tokens back in grid order).

  Example e's patch order is the argsort of L random uint32 drawn from
  fold_in(key, first_row + e) (the reference sorts uniforms; integers draw the same bits
  whatever the float precision, so a float64 reference run masks the same patches),
  `first_row` the global index of these rows' first example (None: this device's first row
  over `axis_name`): an example's mask depends only on the key and its place in the global
  batch, never on the device that holds it (as `models.vit.drop_path_mask`)."""
  if first_row is None:
    first_row = parallel.global_row_offset(rows, axis_name)
  keys = jax.vmap(lambda e: jax.random.fold_in(key, e))(first_row + np.arange(rows))
  noise = jax.vmap(lambda k: jax.random.bits(k, (num_patches,), jnp.uint32))(keys)
  shuffle = jnp.argsort(noise, axis=1)
  restore = jnp.argsort(shuffle, axis=1)
  k = num_visible(num_patches, mask_ratio)
  mask = (restore >= k).astype(jnp.float32)
  return shuffle[:, :k].astype(jnp.int32), mask, restore.astype(jnp.int32)


class MaskedAutoencoder(nn.Module):
  """ViT encoder on the visible patches, MAE decoder on all of them: predicted pixels
  [B, L, p p C]. Without `keep` and `restore` every patch is visible (as at initialisation)."""
  encoder: nn.Module
  decoder: nn.Module

  def __call__(self, x, train: bool = True, keep=None, restore=None):
    p = self.encoder.patch_size
    grid = (x.shape[1] // p, x.shape[2] // p)
    if restore is None:
      restore = jnp.broadcast_to(jnp.arange(grid[0] * grid[1]), (x.shape[0], grid[0] * grid[1]))
    tokens = self.encoder(x, train=train, keep=keep, tokens=True)
    return self.decoder(tokens, restore, grid, x.shape[3], train=train)

  def encode(self, x):
    return self.encoder(x, train=False)


@dataclasses.dataclass(frozen=True)
class MAE(Method):
  num_views = 1

  def network(self, axis_name: str | None = None) -> MaskedAutoencoder:
    m, model = self.config.method, self.config.model
    decoder = MAEDecoder(width=m.decoder_width, depth=m.decoder_depth,
                         num_heads=m.decoder_num_heads, patch_size=model.patch_size,
                         dtype=DTYPES[model.dtype])
    return MaskedAutoencoder(encoder=build_encoder(model, axis_name), decoder=decoder)

  @classmethod
  def method_problems(cls, config) -> list[str]:
    m, model = config.method, config.model
    if not models.is_vit(model.name):
      return [f'mae masks the patch tokens of a Vision Transformer, model.name={model.name!r} '
              'has none: use a vit_* backbone (the config argument backbone=vit_micro on '
              'Fashion-MNIST, vit_base as the paper).']
    problems = []
    if not 0 < m.mask_ratio < 1:
      problems.append(f'method.mask_ratio={m.mask_ratio} must be in (0, 1): the fraction of '
                      'patches masked (the paper: 0.75).')
    else:
      side = config.augment.crop_size // model.patch_size
      if num_visible(side * side, m.mask_ratio) < 1:
        problems.append(f'method.mask_ratio={m.mask_ratio} leaves none of the {side * side} '
                        f'patches of a {config.augment.crop_size}-pixel crop visible: lower '
                        'it, or use smaller patches (model.patch_size) or larger crops.')
    if m.decoder_width % m.decoder_num_heads or m.decoder_width % 4:
      problems.append(f'method.decoder_width={m.decoder_width} must be a multiple of 4 (its '
                      'sin-cos position embedding) and of method.decoder_num_heads='
                      f'{m.decoder_num_heads}.')
    return problems

  def forward(self, params, batch_stats, views, rng, axis_name, first_row):
    """Per example: the squared error of each patch, averaged over its pixels, [B, L], and
    the mask [B, L] (1: masked)."""
    (images,) = views
    if rng is None:
      raise ValueError('MAE draws its masks from the loss rng: pass one.')
    m, p = self.config.method, self.config.model.patch_size
    rows = images.shape[0]
    num_patches = (images.shape[1] // p) * (images.shape[2] // p)
    keep, mask, restore = random_masking(jax.random.fold_in(rng, _MASK_STREAM), rows,
                                         num_patches, m.mask_ratio, first_row, axis_name)
    network = concatenated_views(self.network(axis_name), rows, first_row)
    pred = network.apply({'params': params}, images, train=True, keep=keep, restore=restore,
                         rngs=self.dropout_rngs(rng, 0))
    target = pixel_targets(images, p, m.norm_pix_loss)
    errors = jnp.mean(jnp.square(pred - target), axis=-1)
    return {'errors': errors, 'mask': mask}, batch_stats

  def objective(self, params, method_state, outputs, targets, target_stats, rng, step,
                axis_name) -> tuple[jnp.ndarray, tuple[dict[str, Any], Any]]:
    del params, targets, target_stats, rng, step  # no target network, no schedules
    errors, mask = outputs['errors'], outputs['mask']

    def mean_over(weights):  # over the patches of the whole global batch
      return (parallel.psum(jnp.sum(errors * weights), axis_name) /
              parallel.psum(jnp.sum(weights), axis_name))

    loss = mean_over(mask)
    # Diagnostic: the loss on the visible patches, which the encoder saw (not trained on).
    metrics = {'masked_patch_loss': loss,
               'visible_patch_loss': jax.lax.stop_gradient(mean_over(1.0 - mask))}
    return loss, (metrics, method_state)
