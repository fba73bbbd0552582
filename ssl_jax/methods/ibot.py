"""iBOT (Zhou et al. 2022, "iBOT: Image BERT pre-training with online tokenizer"; reference
github.com/bytedance/ibot, main_ibot.py, loader.py, models/head.py).

DINO's self-distillation on the class token plus masked image modelling with an online
tokenizer (Sec. 3.2): the student sees its global crops with blocks of patches replaced by a
learned mask token and predicts, at the masked positions, the teacher's centred and sharpened
patch distributions on the same crops unmasked. The teacher is the student's moving average
(momentum 0.996 -> 1, cosine), as in DINO (`methods/dino.py`, whose loss pieces this reuses).

  L = lambda1 L_[CLS] + lambda2 L_MIM,

L_[CLS] DINO's cross-view loss on the class tokens (teacher global crops against every other
student crop, local crops included: `losses.dino.self_distillation`), L_MIM eq. 1
(`losses.ibot.masked_patch_distillation`): per image, the cross-entropy summed over its masked
patches over their number, averaged over images and global crops.

As the reference:
  * masks (`block_masks`) are BEiT's blockwise masking as loader.py's `ImageFolderMask`: per
    global crop, with probability `masked_crop_fraction` (the reference's `--pred_ratio 0 0.3`
    picks the ratio 0 or 0.3 +- 0.2 with equal chance) a target ratio r uniform in
    `mask_ratio` +- `mask_ratio_spread`, then rectangles of area uniform in
    [(min(h, w) // 3)^2, r L - masked] and aspect ratio log-uniform in `mask_aspect_ratio`
    added until r L patches are masked or 10 tries in a row fail; local crops are never
    masked;
  * the mask token (`params['mask_token']`, zeros at initialisation) replaces a masked
    patch's embedding before the position embedding (`models.vit.ViT`, `masked_embed`); it
    is the network's, not the ViT's, and the teacher has none;
  * one head (`IBOTHead`): DINO's MLP and l2-normalised bottleneck on every token, a
    weight-normalised last layer for the class token and, unless `shared_head`, another for
    the patch tokens; the teacher's head shares its last layer when `shared_head_teacher`
    (the reference's default), reading the moving average of the student's class-token layer
    for the patches. The patch outputs number `num_patch_prototypes`, or `num_prototypes`
    when either head shares (the reference's `same_dim`);
  * two centres (`method_state['center']`, `['patch_center']`), each c <- m c + (1 - m)
    batch mean after the loss, the patch centre over every patch of every global crop;
  * two teacher temperatures, each warmed up linearly over `teacher_warmup_epochs` (per step
    here, per epoch there);
  * the last layers are frozen during the first `freeze_last_layer_epochs` (the reference's
    `cancel_gradients_last_layer` matches both names);
  * evaluation scores the teacher's backbone.

Departures: no `pred_start_epoch` (masking from the first step, the paper's ViT setting; its
Swin runs start at epoch 50): `forward` is not given the step. The image-level feature that
the class-token head reads is the class token with `model.vit_pool='cls'` (the paper's), and
the mean of the normalised patch tokens with 'gap'. Masks draw integer random bits and do
their arithmetic in numpy's float32, so a float64 reference run masks the same patches.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssl_jax import models, parallel
from ssl_jax.losses import dino as dino_loss
from ssl_jax.losses import ibot as ibot_loss
from ssl_jax.methods.base import Method
from ssl_jax.methods.common import concatenated_views, split_views
from ssl_jax.models import DTYPES, build_encoder
from ssl_jax.models.dino_head import DINOHead

# fold_in tag ('mask') that keeps the masking keys apart from the dropout keys.
_MASK_STREAM = 0x6D61736B
# loader.py's tries per block before masking stops short of its target.
MAX_BLOCK_TRIES = 10


def _uniform(bits):
  """[0, 1) from uint32 bits: 24 of them times 2^-24, exact in float32 (numpy's dtype, which
  the float64 reference run does not turn into float64)."""
  return (bits >> 8).astype(np.float32) * np.float32(2.0 ** -24)


def block_mask(key, grid: tuple[int, int], ratio, aspect_ratio: tuple[float, float]):
  """bool [h * w] (row-major): loader.py's blockwise masking of an h x w patch grid to
  `ratio` h w patches (BEiT's `MaskingGenerator`).

  While fewer than r = ratio h w patches are masked, up to `MAX_BLOCK_TRIES` rectangles are
  drawn, of area uniform in [(min(h, w) // 3)^2, r - masked] and aspect ratio log-uniform in
  `aspect_ratio`, sides rounded, placed uniformly where they fit (sides < h, w); the first
  that masks at least one new patch and at most r - masked of them is added. If none does,
  masking stops. The tries of one round are drawn and tested at once: the mask changes only
  when one succeeds, which ends the round, so this is the reference's sequential loop."""
  h, w = grid
  target = ratio * np.float32(h * w)
  low = np.float32((min(h, w) // 3) ** 2)
  log_lo, log_hi = np.log(np.asarray(aspect_ratio, np.float32))
  rows = np.arange(h)[None, :, None]
  cols = np.arange(w)[None, None, :]

  def add_block(carry):
    i, mask, count, _ = carry
    bits = jax.random.bits(jax.random.fold_in(key, i), (4, MAX_BLOCK_TRIES), jnp.uint32)
    room = target - count.astype(np.float32)
    area = low + _uniform(bits[0]) * (room - low)
    aspect = jnp.exp(log_lo + _uniform(bits[1]) * (log_hi - log_lo))
    bh = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    bw = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (bh < h) & (bw < w)
    top = (bits[2] % jnp.maximum(h - bh + 1, 1).astype(jnp.uint32)).astype(jnp.int32)
    left = (bits[3] % jnp.maximum(w - bw + 1, 1).astype(jnp.uint32)).astype(jnp.int32)
    inside = ((rows >= top[:, None, None]) & (rows < (top + bh)[:, None, None]) &
              (cols >= left[:, None, None]) & (cols < (left + bw)[:, None, None]))
    new = inside & ~mask
    num_new = jnp.sum(new, axis=(1, 2), dtype=jnp.int32)
    ok = fits & (num_new > 0) & (num_new.astype(np.float32) <= room)
    first = jnp.argmax(ok)
    found = jnp.any(ok)
    return (i + 1, mask | (new[first] & found), count + jnp.where(found, num_new[first], 0),
            ~found)

  def more(carry):
    _, _, count, stopped = carry
    return (count.astype(np.float32) < target) & ~stopped

  # Zeros computed from the key's draws: inside shard_map the keys vary over the devices, and
  # the loop's carry must vary as they do.
  zero = (target * 0).astype(jnp.int32)
  init = (zero, jnp.broadcast_to(zero > 0, (h, w)), zero, zero > 0)
  return jax.lax.while_loop(more, add_block, init)[1].reshape(h * w)


def example_mask(key, grid: tuple[int, int], mask_ratio: float, spread: float,
                 masked_fraction: float, aspect_ratio: tuple[float, float]):
  """One crop's mask [h * w]: masked at all with probability `masked_fraction`, then to a
  ratio uniform in [mask_ratio - spread, mask_ratio + spread] (`block_mask`)."""
  ratio_key, block_key = jax.random.split(key)
  u = _uniform(jax.random.bits(ratio_key, (2,), jnp.uint32))
  ratio = np.float32(mask_ratio - spread) + u[0] * np.float32(2 * spread)
  ratio = jnp.where(u[1] < np.float32(masked_fraction), ratio, np.float32(0.0))
  return block_mask(block_key, grid, ratio, aspect_ratio)


def block_masks(key, num_views: int, rows: int, grid: tuple[int, int], method_config,
                first_row=None, axis_name=None):
  """bool [num_views * rows, h * w]: the masks of `rows` examples of each of `num_views`
  global crops, laid out as the crops are concatenated (view-major).

  Example e of view v is masked with the key fold_in(fold_in(key, v), first_row + e),
  `first_row` the global index of these rows' first example (None: this device's first row
  over `axis_name`): a mask depends only on the key, the view and the example's place in the
  global batch, never on the device or micro-batch that holds it (as
  `models.vit.drop_path_mask`)."""
  m = method_config
  if first_row is None:
    first_row = parallel.global_row_offset(rows, axis_name)
  view = np.repeat(np.arange(num_views), rows)
  example = first_row + np.tile(np.arange(rows), num_views)
  keys = jax.vmap(lambda v, e: jax.random.fold_in(jax.random.fold_in(key, v), e))(view,
                                                                                  example)
  return jax.vmap(lambda k: example_mask(k, grid, m.mask_ratio, m.mask_ratio_spread,
                                         m.masked_crop_fraction,
                                         tuple(m.mask_aspect_ratio)))(keys)


class IBOTHead(DINOHead):
  """The reference's `iBOTHead`: DINO's head (`models.dino_head.DINOHead`: its Linear-GELU
  layers and l2-normalised bottleneck, `bottleneck`) on the class-token features and every
  patch token, then the weight-normalised `last_layer` for the former and, unless `shared`, a
  second one, `patch_last_layer`, `patch_output_dim` wide, for the latter. Returns float32
  (class [B, K], patches [B', L, K'])."""
  patch_output_dim: int = 8192
  shared: bool = True

  @nn.compact
  def __call__(self, features, patches, train: bool = True):
    del train  # no BatchNorm or dropout
    b, (pb, num_patches) = features.shape[0], patches.shape[:2]
    # One pass of the MLP over all tokens: it is shared, as the reference's.
    x = self.bottleneck(jnp.concatenate([features, patches.reshape(pb * num_patches, -1)]))
    last = self.output_layer(self.output_dim)
    patch_last = last if self.shared else self.output_layer(self.patch_output_dim,
                                                            name='patch_last_layer')
    patch_out = patch_last(x[b:]).reshape(pb, num_patches, -1)
    return last(x[:b]).astype(jnp.float32), patch_out.astype(jnp.float32)


class IBOTNetwork(nn.Module):
  """The ViT on the global crops (masked where `masks` says, for the student) and on the
  local crops, the head on their image features and the global crops' patch tokens: (class
  outputs [(G + local) rows, K], patch outputs [G rows, L, K'])."""
  encoder: nn.Module
  head: nn.Module
  # The student's: a learned mask token (the reference's `masked_embed`); the teacher has
  # none, and its parameters are the moving averages of the encoder and head alone.
  masked_modeling: bool = True

  def _features(self, tokens):
    if self.encoder.pool == 'cls':
      return tokens[:, 0]
    return jnp.mean(tokens[:, 1:], axis=1)

  @nn.compact
  def __call__(self, global_crops, local_crops=None, masks=None, train: bool = True):
    mask_token = None
    if self.masked_modeling:
      # (1, width): 2-D, so weight decay applies to it, as to the reference's.
      mask_token = self.param('mask_token', nn.initializers.zeros, (1, self.encoder.width),
                              jnp.float32)
    tokens = self.encoder(global_crops, train=train, tokens=True, mask=masks,
                          mask_token=mask_token)
    features = [self._features(tokens)]
    if local_crops is not None:
      features.append(self._features(self.encoder(local_crops, train=train, tokens=True)))
    return self.head(jnp.concatenate(features), tokens[:, 1:], train=train)

  def encode(self, x):
    return self.encoder(x, train=False)


def _warmup(start: float, end: float, warmup_steps: int, step):
  """Linear from `start` at step 0 to `end` at `warmup_steps`, then `end`."""
  if warmup_steps <= 0:
    return jnp.asarray(end, jnp.float32)  # optax.linear_schedule would hold `start`
  return optax.linear_schedule(init_value=start, end_value=end,
                               transition_steps=warmup_steps)(step)


@dataclasses.dataclass(frozen=True)
class IBOT(Method):
  multi_crop = True
  target_networks = ('encoder', 'head')

  def _network(self, axis_name, shared: bool, masked_modeling: bool) -> IBOTNetwork:
    m = self.config.method
    head = IBOTHead(output_dim=m.num_prototypes, patch_output_dim=self.patch_prototypes(),
                    hidden_dim=m.projector_hidden_dim, bottleneck_dim=m.projector_output_dim,
                    num_layers=m.projector_num_layers, norm_last_layer=m.norm_last_layer,
                    shared=shared, dtype=DTYPES[self.config.model.dtype])
    return IBOTNetwork(encoder=build_encoder(self.config.model, axis_name), head=head,
                       masked_modeling=masked_modeling)

  def patch_prototypes(self) -> int:
    """K', the patch outputs: `num_patch_prototypes`, ignored (K' = K) when either head
    shares its last layer, as the reference (main_ibot.py's `same_dim`)."""
    m = self.config.method
    return m.num_prototypes if m.shared_head or m.shared_head_teacher else m.num_patch_prototypes

  def network(self, axis_name: str | None = None) -> IBOTNetwork:
    return self._network(axis_name, self.config.method.shared_head, True)

  def teacher_network(self, axis_name: str | None = None) -> IBOTNetwork:
    return self._network(axis_name, self.config.method.shared_head_teacher, False)

  @classmethod
  def method_problems(cls, config) -> list[str]:
    m, model = config.method, config.model
    if not models.is_vit(model.name):
      return [f'ibot masks the patch tokens of a Vision Transformer, model.name='
              f'{model.name!r} has none: use a vit_* backbone (the config argument '
              'backbone=vit_micro on Fashion-MNIST, vit_small as the paper).']
    # DINO's checks (temperatures, centre momentum, head, schedules), then iBOT's own.
    problems = dino_loss.config_problems(m)
    for name in ('teacher_patch_temperature', 'teacher_patch_temperature_start'):
      if m[name] <= 0:
        problems.append(f'method.{name} must be positive.')
    if m.num_patch_prototypes < 1:
      problems.append('method.num_patch_prototypes must be positive (the paper: 8192).')
    if m.shared_head and not m.shared_head_teacher:
      problems.append('method.shared_head=True with shared_head_teacher=False would give the '
                      'teacher a patch layer that the student lacks, never trained: set '
                      'shared_head_teacher=True.')
    if not 0.0 <= m.mask_ratio_spread <= m.mask_ratio <= 1.0 - m.mask_ratio_spread:
      problems.append(f'method.mask_ratio={m.mask_ratio} +- mask_ratio_spread='
                      f'{m.mask_ratio_spread} must stay within [0, 1], spread >= 0 (the '
                      'paper: 0.3 +- 0.2).')
    if not 0.0 <= m.masked_crop_fraction <= 1.0:
      problems.append(f'method.masked_crop_fraction={m.masked_crop_fraction} must be in '
                      '[0, 1]: the probability that a global crop is masked (the paper: 0.5).')
    lo, hi = m.mask_aspect_ratio
    if not 0 < lo <= hi:
      problems.append(f'method.mask_aspect_ratio={tuple(m.mask_aspect_ratio)} must be '
                      '(low, high) with 0 < low <= high (the paper: (0.3, 1 / 0.3)).')
    if config.augment.crop_size < model.patch_size:
      problems.append(f'{config.augment.crop_size}-pixel crops hold no {model.patch_size}-pixel '
                      'patch: use larger crops or smaller patches (model.patch_size).')
    return problems

  def init(self, rng, images):
    params, batch_stats = self.init_networks(rng, images)
    m = self.config.method
    return params, batch_stats, {
        'center': jnp.zeros((m.num_prototypes,), jnp.float32),
        'patch_center': jnp.zeros((self.patch_prototypes(),), jnp.float32)}

  def frozen_steps(self) -> dict[tuple[str, ...], int]:
    """Both last layers frozen for the first `freeze_last_layer_epochs` (see DINO's)."""
    m = self.config.method
    steps = round(m.freeze_last_layer_epochs * self.run_length.steps_per_epoch)
    layers = ('last_layer',) if m.shared_head else ('last_layer', 'patch_last_layer')
    return {**super().frozen_steps(), **{('head', name): steps for name in layers}}

  def teacher_temperatures(self, step):
    """(tau_t for the class token, tau_t' for the patches) at optimizer step `step`."""
    m = self.config.method
    warmup = round(m.teacher_warmup_epochs * self.run_length.steps_per_epoch)
    return (_warmup(m.teacher_temperature_start, m.teacher_temperature, warmup, step),
            _warmup(m.teacher_patch_temperature_start, m.teacher_patch_temperature, warmup,
                    step))

  def masks(self, rng, global_crops, first_row, axis_name):
    """bool [G n, L]: the masks of this call's n rows of each of the G global crops, in the
    order the crops are concatenated (`block_masks`, keyed by the loss rng)."""
    p = self.config.model.patch_size
    rows, height, width = global_crops[0].shape[:3]
    return block_masks(jax.random.fold_in(rng, _MASK_STREAM), len(global_crops), rows,
                       (height // p, width // p), self.config.method, first_row, axis_name)

  def forward(self, params, batch_stats, views, rng, axis_name, first_row):
    if rng is None:
      raise ValueError('iBOT draws its masks from the loss rng: pass one.')
    g = self.num_views
    rows = views[0].shape[0]
    masks = self.masks(rng, views[:g], first_row, axis_name)
    local_crops = jnp.concatenate(views[g:]) if len(views) > g else None
    network = concatenated_views(self.network(axis_name), rows, first_row)
    (cls_out, patch_out), updates = network.apply(
        {'params': params, 'batch_stats': batch_stats}, jnp.concatenate(views[:g]),
        local_crops, masks, train=True, mutable=['batch_stats'],
        rngs=self.dropout_rngs(rng, 0))
    return {'student': split_views(cls_out, len(views)),
            'student_patch': split_views(patch_out, g),
            'mask': split_views(masks.astype(jnp.float32), g)}, updates['batch_stats']

  def target_forward(self, target_params, batch_stats, method_state, views, rng, axis_name,
                     first_row):
    """The teacher on the global crops unmasked, without drop path (no dropout rng)."""
    del method_state, rng
    g = self.num_views
    network = concatenated_views(self.teacher_network(axis_name), views[0].shape[0],
                                 first_row)
    # A ViT and DINO's head: no BatchNorm, so no running statistics to keep.
    cls_out, patch_out = network.apply({'params': target_params, 'batch_stats': batch_stats},
                                       jnp.concatenate(views[:g]), train=True)
    return {'teacher': split_views(cls_out, g), 'teacher_patch': split_views(patch_out, g)}, {}

  def objective(self, params, method_state, outputs, targets, target_stats, rng, step,
                axis_name):
    del params, target_stats, rng
    m = self.config.method
    tau_cls, tau_patch = self.teacher_temperatures(step)
    cls_loss, cls_metrics = dino_loss.self_distillation(
        outputs['student'], targets['teacher'], method_state['center'],
        m.student_temperature, tau_cls, axis_name)
    patch_loss, patch_metrics = ibot_loss.masked_patch_distillation(
        outputs['student_patch'], targets['teacher_patch'], outputs['mask'],
        method_state['patch_center'], m.student_temperature, tau_patch, axis_name)
    loss = m.cls_loss_weight * cls_loss + m.patch_loss_weight * patch_loss
    new_state = {
        'center': dino_loss.update_center(method_state['center'], targets['teacher'],
                                          m.center_momentum, axis_name),
        'patch_center': ibot_loss.update_patch_center(
            method_state['patch_center'], targets['teacher_patch'], m.center_momentum,
            axis_name)}
    metrics = dict(cls_metrics, **patch_metrics, cls_loss=cls_loss, patch_loss=patch_loss,
                   teacher_temperature=tau_cls, teacher_patch_temperature=tau_patch)
    return loss, (metrics, jax.lax.stop_gradient(new_state))

  def evaluation_variables(self, params, batch_stats, target_params, method_state):
    del params, method_state  # the student's; a ViT keeps no running statistics
    return target_params, batch_stats
