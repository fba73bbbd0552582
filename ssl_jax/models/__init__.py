"""Encoder registry: `build_encoder(config.model, axis_name)` returns a Flax module mapping
images [B, H, W, C] to features [B, D]."""

from __future__ import annotations

import functools

import jax.numpy as jnp

from ssl_jax.models.convnet import ConvNet
from ssl_jax.models.resnet import ResNet18, ResNet34, ResNet50

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _resnet(cls, cfg, axis_name, dtype):
  return cls(width=cfg.width, small_images=cfg.small_images, axis_name=axis_name, dtype=dtype)


def _convnet(cfg, axis_name, dtype):
  return ConvNet(widths=tuple(cfg.widths), convs_per_stage=cfg.convs_per_stage,
                 axis_name=axis_name, dtype=dtype)


ENCODERS = {
    'resnet18': functools.partial(_resnet, ResNet18),
    'resnet34': functools.partial(_resnet, ResNet34),
    'resnet50': functools.partial(_resnet, ResNet50),
    'convnet': _convnet,
}


def build_encoder(model_cfg, axis_name: str | None = None):
  if model_cfg.name not in ENCODERS:
    raise ValueError(f'Unknown model.name {model_cfg.name!r}; known: {sorted(ENCODERS)}.')
  return ENCODERS[model_cfg.name](model_cfg, axis_name, DTYPES[model_cfg.dtype])
