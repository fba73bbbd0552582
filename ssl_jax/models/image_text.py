"""Two towers into one embedding space: the network of CLIP, SigLIP and LiT.

An image tower (any encoder of `models.build_encoder`) and a text tower
(`text_transformer.TextTransformer`), each followed by a linear projection without bias into
the shared `embed_dim`-dimensional space (CLIP's `visual.proj` and `text_projection`), and the
loss's learnable scalars: the log of the logit scale (CLIP's `logit_scale`, SigLIP's t') and,
for SigLIP, the logit bias. The losses (`losses.image_text`) normalise the embeddings.

LiT (Zhai et al. 2022) locks the image tower: `lock_image=True` runs it in inference mode
(its BatchNorm statistics are never updated) and `project_image=False` takes its features as
the embedding, so that only the text tower and its projection are trained, into the space
that self-supervised pre-training made.

The parameters are {'encoder': image tower, 'text': text tower, 'image_projection',
'text_projection', 'log_scale', 'bias'}: the image tower is named 'encoder' as in every
method, so evaluation, `pretrained` and the frozen-parameter machinery find it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

# CLIP initialises both projections with std width^-0.5 (`proj = scale * randn(width,
# output_dim)`); flax's lecun_normal is the same scale for a [width, dim] kernel.
_projection_init = nn.initializers.lecun_normal()


class ImageTextModel(nn.Module):
  encoder: nn.Module
  text: nn.Module
  embed_dim: int
  init_log_scale: float
  init_bias: float | None = None  # None: no bias parameter (CLIP)
  project_image: bool = True
  lock_image: bool = False
  dtype: Any = jnp.float32

  def setup(self):
    if self.project_image:
      self.image_projection = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype,
                                       kernel_init=_projection_init)
    self.text_projection = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype,
                                    kernel_init=_projection_init)
    self.log_scale = self.param('log_scale', nn.initializers.constant(self.init_log_scale),
                                ())
    if self.init_bias is not None:
      self.bias = self.param('bias', nn.initializers.constant(self.init_bias), ())

  def embed_image(self, images, train: bool = True):
    """[B, embed_dim] float32, before normalisation."""
    features = self.encoder(images, train=train and not self.lock_image)
    if self.project_image:
      features = self.image_projection(features)
    return features.astype(jnp.float32)

  def embed_text(self, tokens, train: bool = True):
    """[B, embed_dim] float32 from int32 tokens [B, L], before normalisation."""
    del train  # the text tower has no dropout or batch statistics
    return self.text_projection(self.text(tokens)).astype(jnp.float32)

  def scalars(self):
    """The loss's learnable scalars: {'log_scale'} and, with a bias, {'bias'}."""
    out = {'log_scale': self.log_scale}
    if self.init_bias is not None:
      out['bias'] = self.bias
    return out

  def __call__(self, images, tokens, train: bool = True):
    return self.embed_image(images, train), self.embed_text(tokens, train), self.scalars()

  def encode(self, images):
    """The image tower's features, as every method's `encode`: what kNN and the linear
    probes score."""
    return self.encoder(images, train=False)
