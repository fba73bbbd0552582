"""XLA options for compiling a train step: which ones depends on the backend and the model.

On the CPU, XLA (jaxlib 0.10) hands dots and reductions to YNNPACK by default. Train steps
of BatchNorm networks (the ConvNet, the ResNets) run faster with YNNPACK for dots only: the
convolutions of the ConvNet's smaller stages take about half the time, forward and backward,
and its first stage's weight gradient a third less, more than that stage's forward pass and
input gradient and BatchNorm (reducing in XLA's own loops) lose.
ViT steps run slower with it (LayerNorm and softmax reduce rows, which YNNPACK does well), so
they keep XLA's defaults. README ("Speed against PyTorch") and benchmarks/cpu_ops.py have
the measurements. Accelerator backends get no option of this kind. Evaluation's feature
extraction takes the same YNNPACK option (`for_encoder`): the ConvNet's forward pass on the
evaluation images is faster with it too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ssl_jax import models
from ssl_jax.models import remat

YNNPACK_DOTS_ONLY = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_DOT'}


@functools.cache
def _accepted(option: str, value: str) -> bool:
  """Whether this jaxlib's compiler knows `option`=`value`: it rejects unknown ones at compile
  time, and a future jaxlib may rename these experimental options; without them the step
  compiles as XLA's defaults have it, only slower."""
  try:
    jax.jit(jnp.sin, compiler_options={option: value}).lower(jnp.zeros(())).compile()
    return True
  except Exception:  # pylint: disable=broad-except
    return False


def for_encoder(model_cfg) -> dict:
  """Compiler options for running an encoder configured by `model_cfg` (`config.model`) on the
  default backend, forward only (feature extraction); {} for XLA's defaults."""
  if jax.default_backend() == 'cpu' and not models.is_vit(model_cfg.name):
    return {k: v for k, v in YNNPACK_DOTS_ONLY.items() if _accepted(k, v)}
  return {}


def for_train_step(model_cfg) -> dict | None:
  """Compiler options for a train step of an encoder configured by `model_cfg` (`config.model`)
  on the default backend; None for XLA's defaults."""
  options = dict(remat.compiler_options(model_cfg) or {})
  options.update(for_encoder(model_cfg))
  return options or None
