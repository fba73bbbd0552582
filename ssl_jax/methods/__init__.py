"""Method registry: config.method.name -> the class implementing `base.Method`.

Entries are import paths, loaded on first use, so that a method's module (and its heads)
is imported only by runs that use it.
"""

from __future__ import annotations

import importlib

from ssl_jax.methods.base import Method, RunLength

METHODS = {
    'simclr': 'ssl_jax.methods.simclr:SimCLR',
    'moco_v2': 'ssl_jax.methods.moco_v2:MoCoV2',
    'moco_v3': 'ssl_jax.methods.moco_v3:MoCoV3',
    'byol': 'ssl_jax.methods.byol:BYOL',
    'simsiam': 'ssl_jax.methods.simsiam:SimSiam',
    'swav': 'ssl_jax.methods.swav:SwAV',
    'dino': 'ssl_jax.methods.dino:DINO',
    'barlow_twins': 'ssl_jax.methods.barlow_twins:BarlowTwins',
    'vicreg': 'ssl_jax.methods.vicreg:VICReg',
    'nnclr': 'ssl_jax.methods.nnclr:NNCLR',
    'adco': 'ssl_jax.methods.adco:AdCo',
    'triplet': 'ssl_jax.methods.triplet:Triplet',
    'clip': 'ssl_jax.methods.clip:CLIP',
    'siglip': 'ssl_jax.methods.siglip:SigLIP',
    'lit': 'ssl_jax.methods.lit:LiT',
    'mae': 'ssl_jax.methods.mae:MAE',
    'hyperbolic': 'ssl_jax.methods.hyperbolic:HyperbolicContrastive',
    'deepcluster_v2': 'ssl_jax.methods.deepcluster_v2:DeepClusterV2',
    'ibot': 'ssl_jax.methods.ibot:IBOT',
    'pcl': 'ssl_jax.methods.pcl:PCL',
}


def method_class(name: str):
  if name not in METHODS:
    raise ValueError(f'Unknown method.name {name!r}; known: {sorted(METHODS)}.')
  module, cls = METHODS[name].split(':')
  return getattr(importlib.import_module(module), cls)


def evaluated_variables(method, state):
  """(params, batch_stats) of the TrainState `state` that evaluation scores: the online
  networks, or those that the method's `evaluation_variables` names (DINO evaluates its
  teacher, as the paper does)."""
  return method.evaluation_variables(state.params, state.batch_stats, state.target_params,
                                     state.method_state)


def frozen_encoder(method, state):
  """The encoder that evaluation scores (`features.FrozenEncoder`: callable on float
  images)."""
  from ssl_jax.evaluation.features import FrozenEncoder  # evaluation imports the methods
  return FrozenEncoder.of_method(method, evaluated_variables(method, state))


def build_method(config, run_length: RunLength | None = None):
  """The method of `config`; `run_length` defaults to `config.total_steps` one-step epochs."""
  if run_length is None:
    run_length = RunLength(total_steps=max(1, config.total_steps), steps_per_epoch=1)
  return method_class(config.method.name)(config, run_length)
