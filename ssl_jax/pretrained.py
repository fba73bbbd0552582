"""Loading a trained encoder from a workdir, for evaluation and downstream use.

    from ssl_jax import pretrained
    model = pretrained.load('workdirs/simclr')          # latest checkpoint
    features = model.encode(images)                       # float [B, H, W, C] in [0, 1]
    params, batch_stats = model.state.params, model.state.batch_stats

The workdir holds the run's config (config.json) and its checkpoints; the network is rebuilt
from the config by the same code that trained it, so the checkpoint restores into exactly
the structure it was saved from.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import ml_collections

from ssl_jax import checkpoint, config_lib
from ssl_jax.methods import frozen_encoder


@dataclasses.dataclass
class Pretrained:
  config: ml_collections.ConfigDict
  method: Any           # the `ssl_jax.methods` object: networks, loss, `encode`
  state: Any            # the full TrainState (params, batch_stats, target_params, ...)
  step: int
  setup: Any            # experiment.Experiment: mesh, init_fn, ...

  def encode(self, images):
    """Frozen-encoder features [B, D] (no projection head, inference BatchNorm) of float
    images in [0, 1] at the evaluation resolution (`config.eval.image_size`, if set)."""
    return frozen_encoder(self.method, self.state)(images)

  def initial_state(self):
    """The same networks at their random initialisation (the run's seed): the baseline the
    trained encoder should beat."""
    return self.setup.init_state()


def load(workdir: str, step: int | None = None) -> Pretrained:
  """The encoder of `workdir` at checkpoint `step` (default: the latest)."""
  from ssl_jax import train  # imported here: train pulls in the data pipeline and writers

  config = config_lib.load_json(os.path.join(workdir, train.CONFIG_FILE))
  if 'mesh' in config:
    # Checkpoints restore onto any mesh: split the state over as many of this machine's
    # devices as the training run did, or fewer where they are fewer.
    config.mesh.fsdp = math.gcd(config.mesh.fsdp, jax.device_count())
  setup, _ = train.build(config)
  template = jax.eval_shape(setup.init_fn, jax.random.PRNGKey(config.seed))
  template = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), template)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), asynchronous=False)
  try:
    state = ckpt.restore_state(template, step)
  finally:
    ckpt.close()
  return Pretrained(config, setup.method, state, int(jax.device_get(state.step)), setup)
