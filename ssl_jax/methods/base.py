"""The method interface: the seam that keeps the trainer generic.

A method owns its networks, its loss and any state it keeps between steps; the trainer owns
the mesh, the views, the optimizer, checkpoints and logging. Adding a method is one file in
this package, registered in `methods/__init__.py`, plus one config: never a trainer change.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax.numpy as jnp

Params = Any
Metrics = dict[str, jnp.ndarray]


class Method(Protocol):
  """What the trainer calls. All functions are pure and jit-able."""

  # How many augmented views of each image the loss wants.
  num_views: int

  def init(self, rng, images: jnp.ndarray) -> tuple[Params, Params, Any]:
    """Returns (params, batch_stats, method_state) for a sample batch of float images."""

  def loss(self, params, batch_stats, target_params, method_state, views: list[jnp.ndarray],
           rng, axis_name: str | None) -> tuple[jnp.ndarray, tuple[Metrics, Params, Any]]:
    """Runs inside `shard_map` on this device's rows of every view.

    Returns the global-batch loss (identical on every device) and (metrics, new batch_stats,
    new method_state); every cross-device reduction names `axis_name`.
    """

  def encode(self, params, batch_stats, images: jnp.ndarray) -> jnp.ndarray:
    """Frozen-encoder features [B, D] for evaluation (no projection head, inference BN)."""

  # Optional, for methods with a momentum (target) network:
  #   init_target(params) -> target_params
  #   target_momentum(step) -> tau; the trainer sets target <- tau * target + (1 - tau) * online
  #   through optax.incremental_update after each optimizer step.
