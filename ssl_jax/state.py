"""The train state: one explicit pytree holding everything a step reads and writes."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray           # int32 scalar: optimizer steps taken
  params: Any                 # online networks
  batch_stats: Any            # BatchNorm running statistics ({} if none)
  opt_state: optax.OptState
  target_params: Any          # momentum (target) networks; {} for methods without one
  method_state: Any           # queues, centres... ({} if none)
  rng: jnp.ndarray            # base key: step keys are fold_in(rng, step), so resume is exact
  probe_params: Any = None    # online linear probe ({} when disabled) and its optimizer state
  probe_opt_state: Any = None


def create_train_state(method, tx: optax.GradientTransformation, rng, sample_images,
                       probe=None):
  """Initialises networks, optimizer, method state and the optional online probe from a
  sample batch of float images."""
  init_rng, state_rng = jax.random.split(rng)
  params, batch_stats, method_state = method.init(init_rng, sample_images)
  target_params = method.init_target(params)
  probe_params, probe_opt_state = {}, {}
  if probe is not None:
    feature_dim = jax.eval_shape(method.encode, params, batch_stats, sample_images).shape[-1]
    # Its own key, so enabling the probe leaves the networks' initialisation unchanged.
    probe_params = probe.init(jax.random.fold_in(rng, 1), feature_dim)
    probe_opt_state = probe.tx.init(probe_params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params), target_params=target_params,
                    method_state=method_state, rng=state_rng, probe_params=probe_params,
                    probe_opt_state=probe_opt_state)
