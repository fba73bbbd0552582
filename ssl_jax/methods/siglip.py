"""SigLIP (Zhai et al. 2023): CLIP's two towers trained with a pairwise sigmoid loss, each
image-text pair of the global batch a binary classification (positive for an image and its
own caption), with a learnable temperature t = exp(t') and bias b, initialised at t' =
log 10 and b = -10 (the paper's, which start the many negatives near their target).

No softmax couples a row to the whole batch, so no device needs the global similarity
matrix: `method.chunked` (default) scores this device's images against its own captions,
then against each other device's in turn, passed around the devices by collective permutes
(the paper's Sec. 3.3); False gathers all captions first. Both give the same loss and
gradients (`losses.image_text.siglip_loss`; tested).
"""

from __future__ import annotations

import dataclasses

from ssl_jax.losses.image_text import siglip_loss
from ssl_jax.methods.image_text import ImageTextMethod


@dataclasses.dataclass(frozen=True)
class SigLIP(ImageTextMethod):

  def init_bias(self) -> float:
    return self.config.method.init_bias

  def objective(self, params, method_state, outputs, targets, target_stats, rng, step,
                axis_name):
    del targets, target_stats, rng, step
    loss, metrics = siglip_loss(outputs['image'], outputs['text'], params['log_scale'],
                                params['bias'], axis_name,
                                chunked=self.config.method.get('chunked', True))
    return loss, (metrics, method_state)
