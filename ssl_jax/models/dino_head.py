"""DINO's projection head (Caron et al. 2021, Sec. 3.1 and App. "Projection head").

An MLP (hidden layers of `hidden_dim` with GELU) to an l2-normalised `bottleneck_dim`
embedding, then a weight-normalised linear layer to K outputs: output k is
g_k <w_k / ||w_k||, z>. With `norm_last_layer` the scales g_k are fixed to 1, so every output
is a cosine, which the authors found made training more stable. No BatchNorm: the reference
adds it only on request (`use_bn_in_head`, off by default, for ViTs and ResNets alike).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ssl_jax import precision
from ssl_jax.losses.info_nce import l2_normalize


class WeightNormDense(nn.Module):
  """y = x (V / ||V||_col) g (Salimans & Kingma 2016), no bias. The kernel V [d, K] stores
  each output's direction; its length is irrelevant, so weight decay on V changes nothing.

  The column norms are taken in float32; the product runs on `dtype` operands but
  accumulates and returns float32: y are cosines that DINO divides by a teacher temperature
  of 0.04, where bfloat16's rounding of the output (2^-9 of |y|) would be logit noise of up
  to 0.05 (`precision`)."""
  features: int
  learn_scale: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    # PyTorch's nn.Linear default init (uniform, variance 1 / (3 fan_in)), as the reference's
    # last layer keeps it: Adam's steps are relative to the kernel's norm.
    kernel = self.param('kernel', nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform'),
                        (x.shape[-1], self.features), jnp.float32)
    direction = kernel / jnp.linalg.norm(kernel, axis=0, keepdims=True)
    y = jnp.matmul(x.astype(self.dtype), direction.astype(self.dtype),
                   preferred_element_type=jnp.promote_types(self.dtype, jnp.float32))
    if self.learn_scale:
      y = y * self.param('scale', nn.initializers.ones, (self.features,), jnp.float32)
    return y


class DINOHead(nn.Module):
  """Linear-GELU layers (`num_layers` linear layers before the bottleneck normalisation),
  l2-normalised bottleneck, weight-normalised last layer named `last_layer`."""
  output_dim: int = 65536
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  num_layers: int = 3
  norm_last_layer: bool = True
  dtype: Any = jnp.float32

  def bottleneck(self, x):
    """The head before its last layer: the Linear-GELU layers and the l2-normalised
    bottleneck [..., bottleneck_dim] (float32). Call it from a compact method (`__call__`, or
    a subclass's: iBOT's head runs it on every token); its layers are Dense_0, Dense_1, ..."""
    dense = lambda d: nn.Dense(d, dtype=self.dtype,  # noqa: E731
                               kernel_init=nn.initializers.truncated_normal(0.02),
                               bias_init=nn.initializers.zeros)
    x = x.astype(self.dtype)
    for _ in range(self.num_layers - 1):
      # torch's nn.GELU is the exact (erf) form.
      x = nn.gelu(dense(self.hidden_dim)(x), approximate=False)
    return l2_normalize(dense(self.bottleneck_dim)(x))  # in float32

  def output_layer(self, features: int, name: str = 'last_layer') -> WeightNormDense:
    """A weight-normalised last layer to `features` outputs (g fixed to 1 with
    `norm_last_layer`)."""
    return WeightNormDense(features, learn_scale=not self.norm_last_layer, dtype=self.dtype,
                           name=name)

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train  # No BatchNorm or dropout: the same in training and evaluation.
    x = self.output_layer(self.output_dim)(self.bottleneck(x))
    return precision.to_float32(x)
