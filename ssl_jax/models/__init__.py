"""Encoder registry: `build_encoder(config.model, axis_name)` returns a Flax module mapping
images [B, H, W, C] to features [B, D]."""

from __future__ import annotations

import functools

import jax.numpy as jnp

from ssl_jax.models.convnet import ConvNet
from ssl_jax.models.resnet import ResNet18, ResNet34, ResNet50
from ssl_jax.models.vit import SIZES as VIT_SIZES
from ssl_jax.models.vit import ViT

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _resnet(cls, cfg, axis_name, dtype):
  return cls(width=cfg.width, small_images=cfg.small_images, axis_name=axis_name, dtype=dtype)


def _convnet(cfg, axis_name, dtype):
  # `.get`: configs saved before pool_grid existed pooled globally.
  return ConvNet(widths=tuple(cfg.widths), convs_per_stage=cfg.convs_per_stage,
                 pool_grid=cfg.get('pool_grid', 1), axis_name=axis_name, dtype=dtype)


def _vit(width, depth, num_heads, cfg, axis_name, dtype):
  # No BatchNorm: `axis_name` only places rows in the global batch for drop path.
  return ViT(width=width, depth=depth, num_heads=num_heads, patch_size=cfg.patch_size,
             pool=cfg.vit_pool, pos_embed=cfg.vit_pos_embed, drop_path_rate=cfg.drop_path_rate,
             layer_scale_init=cfg.layer_scale_init,
             frozen_patch_embed=cfg.vit_frozen_patch_embed, dtype=dtype, axis_name=axis_name)


def is_vit(name: str) -> bool:
  return name.startswith('vit_')


def frozen_parameters(model_cfg) -> tuple[tuple[str, ...], ...]:
  """Key paths, inside the encoder's params, that training never changes: the optimizer
  leaves them out entirely (`Method.frozen_steps`), so weight decay cannot shrink them.
  MoCo v3's random patch projection (`vit_frozen_patch_embed`)."""
  if is_vit(model_cfg.name) and model_cfg.get('vit_frozen_patch_embed', False):
    return (('patch_embed',),)
  return ()


ENCODERS = {
    'resnet18': functools.partial(_resnet, ResNet18),
    'resnet34': functools.partial(_resnet, ResNet34),
    'resnet50': functools.partial(_resnet, ResNet50),
    'convnet': _convnet,
    **{name: functools.partial(_vit, *size) for name, size in VIT_SIZES.items()},
}


def build_encoder(model_cfg, axis_name: str | None = None):
  if model_cfg.name not in ENCODERS:
    raise ValueError(f'Unknown model.name {model_cfg.name!r}; known: {sorted(ENCODERS)}.')
  encoder = ENCODERS[model_cfg.name](model_cfg, axis_name, DTYPES[model_cfg.dtype])
  # Every encoder rematerialises its blocks the same way (models/remat.py). `.get`: configs
  # saved before these fields existed have neither, and trained without remat.
  return encoder.copy(remat=model_cfg.get('remat', False),
                      remat_policy=model_cfg.get('remat_policy', ''))
