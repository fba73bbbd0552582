"""ResNet encoders (He et al. 2016) in Flax linen, for images of any size.

The encoder returns the pooled feature vector (the representation that evaluation uses);
projection heads live in `heads.py`. BatchNorm takes an `axis_name` so that, inside
`shard_map`, its statistics are those of the global batch rather than of each device's
shard: SimCLR's paper found per-device statistics let the network cheat the contrastive task.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ssl_jax.models import remat as remat_lib

ModuleDef = Any


def _add_shortcut(residual, y, strides, conv, norm):
  """ReLU(shortcut + y); the shortcut is projected (1x1 conv + BN) where the shapes differ.

  Called from a block's compact `__call__`, so the layers it creates belong to that block.
  """
  if residual.shape != y.shape:
    residual = conv(y.shape[-1], (1, 1), (strides, strides))(residual)
    residual = norm()(residual)
  return nn.relu(residual + y)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions; ResNet-18/34."""
  filters: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides))(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    # Zero-init the last BN scale so each block starts as the identity (Goyal et al. 2017).
    y = self.norm(scale_init=nn.initializers.zeros)(y)
    return _add_shortcut(residual, y, self.strides, self.conv, self.norm)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 -> 1x1 with 4x expansion; ResNet-50 and deeper."""
  filters: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    residual = x
    y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides))(y)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters * 4, (1, 1))(y)
    y = self.norm(scale_init=nn.initializers.zeros)(y)
    return _add_shortcut(residual, y, self.strides, self.conv, self.norm)


class ResNet(nn.Module):
  """A ResNet trunk; `__call__` returns globally average-pooled features [B, D].

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    block: BasicBlock or Bottleneck.
    width: channels of the first stage (64 in the paper); later stages double it.
    small_images: CIFAR-style stem (3x3 conv, stride 1, no max-pool) for inputs of
      32 pixels or less, where the ImageNet stem would discard most of the image.
    axis_name: mesh axis over which BatchNorm averages its batch statistics.
    dtype: computation dtype (bfloat16 for speed on accelerators); parameters stay float32.
    remat: recompute each block's activations in the backward pass instead of storing them
      (`remat.py`), except what `remat_policy` names ('' = its default).
  """
  stage_sizes: Sequence[int]
  block: ModuleDef
  width: int = 64
  small_images: bool = False
  axis_name: str | None = None
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  remat: bool = False
  remat_policy: str = ''

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'))
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=1e-5, dtype=self.dtype,
                             axis_name=self.axis_name if train else None)
    x = x.astype(self.dtype)
    if self.small_images:
      x = conv(self.width, (3, 3), name='stem_conv')(x)
      x = nn.relu(norm(name='stem_bn')(x))
    else:
      x = conv(self.width, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name='stem_conv')(x)
      x = nn.relu(norm(name='stem_bn')(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    # The blocks take no `train` argument (their norm has it bound): nothing static.
    block = remat_lib.remat(self.block, self.remat_policy) if self.remat else self.block
    index = 0
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        # The name flax gives a plain block ('Bottleneck_3'); the remat wrapper's class
        # ('CheckpointBottleneck') would otherwise rename it, and a checkpoint trained
        # without remat would not restore with it.
        x = block(self.width * 2**i, strides, conv=conv, norm=norm,
                  name=f'{self.block.__name__}_{index}')(x)
        index += 1
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # pooled in float32, not rounded


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=Bottleneck)
