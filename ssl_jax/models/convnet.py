"""A plain VGG-style ConvNet: the fast encoder for CPU runs and tests.

XLA's CPU convolutions are slow, and a residual network spends most of its time in layers that
add little on 28x28 inputs; a few conv-BN-ReLU stages with pooling learn useful features in
the few minutes a laptop run has.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ssl_jax.models import remat as remat_lib


class ConvNet(nn.Module):
  """Stages of `convs_per_stage` 3x3 conv-BN-ReLU, 2x2 max-pool between stages.

  Returns globally average-pooled features [B, widths[-1]]. With `remat`, each stage's
  activations are recomputed in the backward pass (`remat.py`; the network has no residual
  blocks), except what `remat_policy` names ('' = its default).
  """
  widths: Sequence[int] = (32, 64, 128)
  convs_per_stage: int = 2
  axis_name: str | None = None
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  remat: bool = False
  remat_policy: str = ''

  def _stage(self, x, width: int, train: bool):
    """`convs_per_stage` conv-BN-ReLU layers of `width` channels. Called as a function of this
    module, so its layers are this module's (`Conv_3`, `BatchNorm_3`) with or without remat:
    a stage module would nest their names."""
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), use_bias=False, dtype=self.dtype,
                             kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'))
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=1e-5, dtype=self.dtype,
                             axis_name=self.axis_name if train else None)
    for _ in range(self.convs_per_stage):
      x = nn.relu(norm()(conv(width)(x)))
    return x

  @nn.compact
  def __call__(self, x, train: bool = True):
    stage = type(self)._stage
    if self.remat:
      # width and train are Python values the stage branches on: static (self is 0).
      stage = remat_lib.remat(stage, self.remat_policy, static_argnums=(2, 3))
    x = x.astype(self.dtype)
    input_size = x.shape[1:3]
    for i, width in enumerate(self.widths):
      if i > 0:
        if min(x.shape[1:3]) < 2:
          raise ValueError(
              f'ConvNet with {len(self.widths)} stages (model.widths={tuple(self.widths)}) '
              f'halves its input {len(self.widths) - 1} times: too many for inputs of '
              f'{input_size}. Use fewer stages or a larger augment.crop_size.')
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      x = stage(self, x, width, train)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # pooled in float32, not rounded
