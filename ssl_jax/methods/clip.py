"""CLIP (Radford et al. 2021): an image tower and a text tower trained with the symmetric
InfoNCE between each image and its caption, every other caption of the global batch a
negative, with a learnable temperature.

The temperature is parameterised as the log of the logit scale, initialised at log(1 / 0.07)
and clamped to at most log(100) after every optimizer step, as the paper ("clipped to prevent
scaling the logits by more than 100") and OpenCLIP (`logit_scale.clamp_(0, ln 100)`) do;
clamping the parameter rather than the loss's input keeps its gradient below the bound.
Each device computes its images against the texts gathered from all devices and its texts
against all images (`losses.image_text.clip_loss`).
"""

from __future__ import annotations

import dataclasses

from ssl_jax.losses.image_text import CLIP_MAX_SCALE, clamp_log_scale, clip_loss
from ssl_jax.methods.image_text import ImageTextMethod


@dataclasses.dataclass(frozen=True)
class CLIP(ImageTextMethod):

  def objective(self, params, method_state, outputs, targets, target_stats, rng, step,
                axis_name):
    del targets, target_stats, rng, step
    loss, metrics = clip_loss(outputs['image'], outputs['text'], params['log_scale'],
                              axis_name)
    return loss, (metrics, method_state)

  def after_update(self, params):
    return dict(params, log_scale=clamp_log_scale(params['log_scale'], CLIP_MAX_SCALE))
