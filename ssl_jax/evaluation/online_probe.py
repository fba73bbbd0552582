"""Online linear probe: a softmax classifier trained during pre-training on stop-gradient
features of the first augmented view (as solo-learn does), so label accuracy can be watched
live at almost no cost. The labels never reach the encoder: its features are stop-gradient'ed,
so the probe's gradient is zero for every encoder parameter."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ssl_jax import parallel


@dataclasses.dataclass(frozen=True)
class OnlineProbe:
  num_classes: int
  learning_rate: float = 1e-2

  @property
  def classifier(self) -> nn.Module:
    return nn.Dense(self.num_classes, name='online_probe')

  @property
  def tx(self) -> optax.GradientTransformation:
    # Adam: features of a changing encoder have a changing scale, which SGD's fixed step
    # would follow poorly.
    return optax.adam(self.learning_rate)

  def init(self, rng, feature_dim: int):
    return self.classifier.init(rng, jnp.zeros((1, feature_dim)))['params']

  def loss(self, params, features, labels, axis_name):
    """Cross-entropy averaged over the global batch, and the batch's top-1 accuracy."""
    total = parallel.psum(jnp.asarray(labels.shape[0], jnp.float32), axis_name)
    features = jax.lax.stop_gradient(features)
    # Standardised with the global batch's statistics (BatchNorm without affine, as MAE's
    # linear probe): raw features of small encoders have tiny, drifting scales that a fixed
    # learning rate cannot follow.
    mean = parallel.psum(jnp.sum(features, 0), axis_name) / total
    var = parallel.psum(jnp.sum(jnp.square(features - mean), 0), axis_name) / total
    features = (features - mean) * jax.lax.rsqrt(var + 1e-6)
    logits = self.classifier.apply({'params': params}, features)
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    loss = parallel.psum(jnp.sum(per_example), axis_name) / total
    correct = parallel.psum(jnp.sum(jnp.argmax(logits, -1) == labels), axis_name)
    return loss, jax.lax.stop_gradient(correct / total)
