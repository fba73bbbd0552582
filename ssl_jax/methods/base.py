"""The method interface: the seam that keeps the trainer generic.

A method owns its networks, its loss and any state it keeps between steps; the trainer owns
the mesh, the views, the optimizer, checkpoints and logging. Adding a method is one file in
this package, registered in `methods/__init__.py`, plus one config: never a trainer change.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax.numpy as jnp

Params = Any
Metrics = dict[str, jnp.ndarray]


@dataclasses.dataclass(frozen=True)
class RunLength:
  """How long the run is, for methods whose schedules span it (momentum, temperatures)."""
  total_steps: int
  steps_per_epoch: int


class Method(Protocol):
  """What the trainer calls. All functions are pure and jit-able.

  A method class is constructed as `cls(config, run_length)`: the whole experiment config
  (it reads `config.model` and `config.method`) and a `RunLength`.
  """

  # How many global views of each image the loss wants; `config.augment.num_local_crops`
  # adds multi-crop local views after them.
  num_views: int

  def init(self, rng, images: jnp.ndarray) -> tuple[Params, Params, Any]:
    """Returns (params, batch_stats, method_state) for a sample batch of float images."""

  def loss(self, params, batch_stats, target_params, method_state, views: list[jnp.ndarray],
           rng, step, axis_name: str | None) -> tuple[jnp.ndarray, tuple[Metrics, Params, Any]]:
    """Runs inside `shard_map` on this device's rows of every view.

    `views` holds the global views, then the local crops; `step` is the optimizer step
    (a traced int32) for schedules inside the loss. Returns the global-batch loss (identical
    on every device) and (metrics, new batch_stats, new method_state); every cross-device
    reduction names `axis_name`, and the new method_state must be identical on every device.
    """

  def encode(self, params, batch_stats, images: jnp.ndarray) -> jnp.ndarray:
    """Frozen-encoder features [B, D] for evaluation (no projection head, inference BN)."""

  # Optional:
  #   init_target(params) -> target_params, for methods with a momentum (target) network;
  #   target_momentum(step) -> tau: the trainer sets target <- tau * target + (1 - tau) *
  #     online through optax.incremental_update after each optimizer step;
  #   after_update(params) -> params: a projection applied after each optimizer step (SwAV
  #     normalises its prototypes);
  #   evaluation_variables(params, batch_stats, target_params, method_state)
  #     -> (params, batch_stats): the networks that evaluation passes to `encode`, when the
  #     paper evaluates another network than the online one (DINO: the teacher);
  #   config_problems(config) -> list[str] (a classmethod): config errors, each naming its fix.
