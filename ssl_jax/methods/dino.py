"""DINO (Caron et al. 2021, "Emerging properties in self-supervised vision transformers"):
self-distillation with no labels. A student network (encoder + DINO head) is trained to match
on every crop the centred, sharpened output of a teacher on the other global crops (eq. 3);
the teacher is an exponential moving average of the student (Sec. 3.1, "Teacher network"),
with momentum raised from 0.996 to 1 on a cosine schedule.

As in the reference implementation:
  * crops of one resolution go through the encoder together (the global crops, then the
    local crops), and the head sees all crops as one batch; the teacher sees only the global
    crops, in BatchNorm training mode, and keeps running statistics of its own
    (`method_state['teacher_batch_stats']`), which only its evaluation uses;
  * the centre c (`method_state['center']`, eq. 4) is updated after the loss with the
    teacher's outputs of this step: c <- m c + (1 - m) mean over the global batch;
  * the teacher temperature warms up linearly from `teacher_temperature_start` to
    `teacher_temperature` over `teacher_warmup_epochs` (per step here; the reference holds it
    constant within each epoch), then stays there;
  * the head's last layer is frozen during the first `freeze_last_layer_epochs`: the
    optimizer skips it (`frozen_steps`), as AdamW skips a parameter whose .grad is None.

Evaluation (kNN, diagnostics, `ssl_jax.evaluate`, `ssl_jax.pretrained`) scores the teacher's
backbone, as the paper does (its App. D finds the teacher better throughout training);
`evaluation_variables` names it. The online linear probe, trained inside the step, reads the
student.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ssl_jax.losses import dino as dino_loss
from ssl_jax.methods.base import Method
from ssl_jax.methods.common import forward_multi_crop, split_views
from ssl_jax.models import DTYPES, build_encoder
from ssl_jax.models.dino_head import DINOHead


class MultiCropNetwork(nn.Module):
  """Encoder per resolution group (global crops, then local crops), head on all crops."""
  encoder: nn.Module
  head: nn.Module

  def __call__(self, global_crops, local_crops=None, train: bool = True):
    features = [self.encoder(global_crops, train=train)]
    if local_crops is not None:
      features.append(self.encoder(local_crops, train=train))
    return self.head(jnp.concatenate(features, axis=0), train=train)

  def encode(self, x):
    return self.encoder(x, train=False)


@dataclasses.dataclass(frozen=True)
class DINO(Method):
  multi_crop = True
  # The teacher is a moving average of the whole student (Sec. 3.1) and starts as its copy.
  target_networks = ('encoder', 'head')

  def network(self, axis_name: str | None = None) -> MultiCropNetwork:
    m = self.config.method
    return MultiCropNetwork(
        encoder=build_encoder(self.config.model, axis_name),
        head=DINOHead(output_dim=m.num_prototypes, hidden_dim=m.projector_hidden_dim,
                      bottleneck_dim=m.projector_output_dim,
                      num_layers=m.projector_num_layers, norm_last_layer=m.norm_last_layer,
                      dtype=DTYPES[self.config.model.dtype]))

  @classmethod
  def method_problems(cls, config) -> list[str]:
    return dino_loss.config_problems(config.method)

  def init(self, rng, images):
    params, batch_stats = self.init_networks(rng, images)
    center = jnp.zeros((self.config.method.num_prototypes,), jnp.float32)
    return params, batch_stats, {
        'center': center, 'teacher_batch_stats': jax.tree.map(jnp.copy, batch_stats)}

  def frozen_steps(self) -> dict[tuple[str, ...], int]:
    """The head's last layer is frozen for the first `freeze_last_layer_epochs`.

    As the reference (`cancel_gradients_last_layer` sets its .grad to None, so AdamW skips
    it): no update, no weight decay and no optimizer-state change; it then starts as a fresh
    Adam at the global learning rate. `optim.make_optimizer` implements it."""
    m = self.config.method
    return {**super().frozen_steps(), ('head', 'last_layer'):
            round(m.freeze_last_layer_epochs * self.run_length.steps_per_epoch)}

  def teacher_temperature(self, step):
    m = self.config.method
    warmup = round(m.teacher_warmup_epochs * self.run_length.steps_per_epoch)
    if warmup <= 0:
      # optax.linear_schedule would hold init_value (the *start*) forever.
      return jnp.asarray(m.teacher_temperature, jnp.float32)
    return optax.linear_schedule(init_value=m.teacher_temperature_start,
                                 end_value=m.teacher_temperature,
                                 transition_steps=warmup)(step)

  def forward(self, params, batch_stats, views, rng, axis_name, first_row):
    # Drop path in the student only: the teacher gets no dropout rng (the reference's
    # teacher is built with drop_path_rate 0).
    student, batch_stats = forward_multi_crop(self.network(axis_name), params, batch_stats,
                                              views, self.num_views, rng, first_row)
    return {'student': student}, batch_stats

  def target_forward(self, target_params, batch_stats, method_state, views, rng, axis_name,
                     first_row):
    """The teacher on the global crops, with its own running statistics."""
    del batch_stats, rng, first_row
    g = self.num_views
    teacher, updates = self.network(axis_name).apply(
        {'params': target_params, 'batch_stats': method_state['teacher_batch_stats']},
        jnp.concatenate(views[:g], axis=0), train=True, mutable=['batch_stats'])
    return {'teacher': split_views(teacher, g)}, updates['batch_stats']

  def objective(self, params, method_state, outputs, targets, target_stats, rng, step,
                axis_name):
    del params, rng
    # The head's last layer is frozen in the optimizer (`frozen_steps`), not here.
    m = self.config.method
    student, teacher = outputs['student'], targets['teacher']
    center = method_state['center']
    tau_t = self.teacher_temperature(step)
    loss, metrics = dino_loss.self_distillation(student, teacher, center,
                                                m.student_temperature, tau_t, axis_name)
    new_center = dino_loss.update_center(center, teacher, m.center_momentum, axis_name)
    metrics = dict(metrics, teacher_temperature=tau_t)
    return loss, (metrics, {'center': new_center, 'teacher_batch_stats': target_stats})

  def evaluation_variables(self, params, batch_stats, target_params, method_state):
    del params, batch_stats  # the student's
    return target_params, method_state['teacher_batch_stats']
