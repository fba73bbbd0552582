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


def max_pool_2x2(x):
  """2x2 max-pooling with stride 2 of [B, H, W, C] (an odd last row or column is dropped, as
  by `nn.max_pool` with VALID padding), as a reshape and a max: the same values, but XLA:CPU
  differentiates `reduce_window` through `select_and_scatter`, several times slower than the
  whole forward pass of the layer before it (benchmarks/cpu_ops.py)."""
  b, h, w, c = x.shape
  x = x[:, :h - h % 2, :w - w % 2]
  return jnp.max(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


def grid_average(x, grid: int):
  """[B, H, W, C] averaged over each cell of a `grid` x `grid` partition of the image,
  concatenated: [B, grid * grid * C]. Cell i spans rows floor(i H / grid) to
  ceil((i + 1) H / grid), as PyTorch's adaptive average pooling: cells overlap when grid
  does not divide H, and repeat single rows when H < grid, so that every input size (the
  small local crops of multi-crop methods too) gives features of the same size. grid 1 is
  the global average."""
  _, h, w, _ = x.shape
  bounds = lambda n: [(i * n // grid, -(-(i + 1) * n // grid)) for i in range(grid)]
  cells = [jnp.mean(x[:, r0:r1, c0:c1], axis=(1, 2))
           for r0, r1 in bounds(h) for c0, c1 in bounds(w)]
  return jnp.concatenate(cells, axis=-1)


class ConvNet(nn.Module):
  """Stages of `convs_per_stage` 3x3 conv-BN-ReLU, 2x2 max-pool between stages.

  Returns the last stage's averages over a `pool_grid` x `pool_grid` grid of cells
  (`grid_average`), [B, pool_grid^2 * widths[-1]]; 1 is the global average. With `remat`,
  each stage's activations are recomputed in the backward pass (`remat.py`; the network has
  no residual blocks), except what `remat_policy` names ('' = its default).
  """
  widths: Sequence[int] = (32, 64, 128)
  convs_per_stage: int = 2
  axis_name: str | None = None
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  pool_grid: int = 1
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
        x = max_pool_2x2(x)
      x = stage(self, x, width, train)
    return grid_average(x.astype(jnp.float32), self.pool_grid)  # pooled in float32, not rounded
