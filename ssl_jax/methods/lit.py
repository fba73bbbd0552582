"""LiT, "locked-image text tuning" (Zhai et al. 2022): a text tower trained to align with a
*locked* image tower, which here comes from any vision method of this library: the bridge
from self-supervised pre-training to zero-shot classification.

`method.image_tower` names the workdir of a vision run (README command 1's workdirs/simclr,
say); its evaluated encoder (what that run's evaluation scores: the online encoder, DINO's
teacher) is loaded when the method is built (`ssl_jax.pretrained`), and `configs/lit.py`
copies that run's model block so the network has its structure. The image tower runs in
inference mode and the optimizer never touches it (`frozen_steps`: `optim.FOREVER`, no
update, no weight decay, no optimizer state), so after training it is bit-identical to the
loaded one, BatchNorm statistics included. The image embedding is the tower's features
themselves, with no projection: only the text tower and its projection (into the features'
dimension) are trained, as the paper's locked setting ("Lu"). The loss is CLIP's softmax
InfoNCE (`method.loss='softmax'`, the paper's) or SigLIP's sigmoid (`'sigmoid'`).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp

from ssl_jax import optim
from ssl_jax.losses.image_text import (CLIP_MAX_SCALE, clamp_log_scale, clip_loss,
                                       siglip_loss)
from ssl_jax.methods.image_text import ImageTextMethod
from ssl_jax.models import build_encoder
from ssl_jax.models.image_text import ImageTextModel

LOSSES = ('softmax', 'sigmoid')


@functools.cache
def load_image_tower(workdir: str, step: int | None = None):
  """(encoder params, encoder batch_stats) as numpy trees: the encoder that `workdir`'s
  evaluation scores, at checkpoint `step` (None: the latest)."""
  from ssl_jax import methods, pretrained  # pretrained builds runs, which import methods
  model = pretrained.load(workdir, step)
  params, batch_stats = methods.evaluated_variables(model.method, model.state)
  return (jax.device_get(params['encoder']),
          jax.device_get(batch_stats.get('encoder', {})))


def feature_dim(model_config) -> int:
  """The dimension of the image tower's features (the text projection's output)."""
  encoder = build_encoder(model_config)
  sample = jnp.zeros((1, 32, 32, 3), jnp.float32)

  def features(rng):
    return encoder.apply(encoder.init(rng, sample, train=False), sample, train=False)

  return jax.eval_shape(features, jax.random.PRNGKey(0)).shape[-1]


@dataclasses.dataclass(frozen=True)
class LiT(ImageTextMethod):
  lock_image = True

  def __post_init__(self):
    # Loaded here, when the method is built, rather than in `init`, which runs traced.
    tower = None
    if self.config.method.get('image_tower'):
      tower = load_image_tower(self.config.method.image_tower,
                               self.config.method.get('image_tower_step') or None)
    object.__setattr__(self, '_tower', tower)
    # The text projection's width, traced once here rather than at every network build.
    object.__setattr__(self, '_feature_dim', feature_dim(self.config.model))

  @classmethod
  def method_problems(cls, config) -> list[str]:
    problems = super().method_problems(config)
    m = config.method
    workdir = m.get('image_tower', '')
    if not workdir:
      problems.append('LiT locks an image tower trained by this library: pass the workdir of '
                      'a vision run, e.g. --config=configs/lit.py:image_tower=workdirs/simclr '
                      '(README command 1 trains it).')
    elif not os.path.exists(os.path.join(workdir, 'config.json')):
      problems.append(f'method.image_tower={workdir!r} is not a workdir of a training run (no '
                      'config.json in it): train a vision method there first (README command '
                      '1: workdirs/simclr), or pass the --workdir of one.')
    if m.get('loss', 'softmax') not in LOSSES:
      problems.append(f'method.loss={m.get("loss")!r} is unknown; known: {LOSSES}.')
    return problems

  def init_bias(self):
    return self.config.method.init_bias if self.config.method.loss == 'sigmoid' else None

  def network(self, axis_name=None) -> ImageTextModel:
    return super().network(axis_name).clone(embed_dim=self._feature_dim)

  def init(self, rng, images):
    params, batch_stats, state = super().init(rng, images)
    if self._tower is None:
      raise ValueError('LiT has no image tower to lock: set method.image_tower.')
    tower_params, tower_stats = self._tower
    shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), tree)  # noqa: E731
    if shapes(tower_params) != shapes(params['encoder']) or (
        shapes(tower_stats) != shapes(batch_stats.get('encoder', {}))):
      raise ValueError(
          f'The image tower of {self.config.method.image_tower} does not fit this config\'s '
          'model: build the config with configs/lit.py:image_tower=<that workdir>, which '
          'copies its model block, instead of changing --config.model fields.')
    params = dict(params, encoder=jax.tree.map(jnp.asarray, tower_params))
    if tower_stats:
      batch_stats = dict(batch_stats, encoder=jax.tree.map(jnp.asarray, tower_stats))
    return params, batch_stats, state

  def frozen_steps(self):
    return {**super().frozen_steps(), ('encoder',): optim.FOREVER}

  def objective(self, params, method_state, outputs, targets, target_stats, rng, step,
                axis_name):
    del targets, target_stats, rng, step
    if self.config.method.loss == 'sigmoid':
      loss, metrics = siglip_loss(outputs['image'], outputs['text'], params['log_scale'],
                                  params['bias'], axis_name)
    else:
      loss, metrics = clip_loss(outputs['image'], outputs['text'], params['log_scale'],
                                axis_name)
    return loss, (metrics, method_state)

  def after_update(self, params):
    if self.config.method.loss == 'sigmoid':
      return params
    return dict(params, log_scale=clamp_log_scale(params['log_scale'], CLIP_MAX_SCALE))
