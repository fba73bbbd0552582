"""Heads put on top of an encoder: the projection MLP of SimCLR and its relatives."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ssl_jax import precision

NORMS = ('batch', 'layer')


class ProjectionMLP(nn.Module):
  """Linear -> BN -> ReLU, repeated, then a final linear layer (SimCLR, Chen et al. 2020).

  `num_layers` counts linear layers (2 in SimCLR v1, 3 in v2). `last_bn` adds a BatchNorm
  without affine parameters after the last layer, as SimCLR v2 and MoCo v3 do.
  BatchNorm statistics are global across devices through `axis_name`. `norm` = 'layer'
  puts LayerNorm where the BatchNorms are (per example: no batch statistics, so a
  micro-batched step, `ssl_jax.microbatch`, equals the whole batch's with a ViT encoder).
  Computes in `dtype` and returns float32 (`precision`).
  """
  hidden_dim: int = 2048
  output_dim: int = 128
  num_layers: int = 2
  last_bn: bool = False
  axis_name: str | None = None
  dtype: Any = jnp.float32
  norm: str = 'batch'

  @nn.compact
  def __call__(self, x, train: bool = True):
    if self.norm not in NORMS:
      raise ValueError(f'ProjectionMLP norm={self.norm!r} is unknown; known: {NORMS}.')

    def norm(**kwargs):
      if self.norm == 'layer':
        return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, **kwargs)
      return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                          dtype=self.dtype, axis_name=self.axis_name if train else None,
                          **kwargs)

    x = x.astype(self.dtype)
    for _ in range(self.num_layers - 1):
      x = nn.Dense(self.hidden_dim, use_bias=False, dtype=self.dtype)(x)
      x = nn.relu(norm()(x))
    x = nn.Dense(self.output_dim, use_bias=not self.last_bn, dtype=self.dtype)(x)
    if self.last_bn:
      x = norm(use_scale=False, use_bias=False)(x)
    return precision.to_float32(x)
