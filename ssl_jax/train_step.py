"""The compiled train step: views, loss under shard_map, gradients, optimizer update.

The state is replicated and the batch sharded over the mesh's data axis. Augmentation and the
method's loss run inside `shard_map`, each device on its own rows; an example's augmentation
key depends only on the step key and its index in the *global* batch, so the views, and hence
the whole step, are the same whatever the number of devices (up to float rounding).
"""

from __future__ import annotations

import jax
import optax
from jax.sharding import PartitionSpec as P

from ssl_jax import parallel
from ssl_jax.data import augment


def make_train_step(method, tx: optax.GradientTransformation, mesh, augment_cfg,
                    schedule: optax.Schedule | None = None):
  """Returns `train_step(state, images) -> (state, metrics)`, jitted, donating the state."""
  axis = parallel.DATA_AXIS
  view_cfgs = augment.view_configs(augment_cfg, method.num_views)

  def device_loss(params, batch_stats, target_params, method_state, images, aug_rng, loss_rng,
                  step):
    first_row = parallel.global_row_offset(images.shape[0], axis)
    views = augment.augment_views(aug_rng, images, view_cfgs, first_row)
    return method.loss(params, batch_stats, target_params, method_state, views, loss_rng, step,
                       axis)

  sharded_loss = jax.shard_map(
      device_loss, mesh=mesh,
      in_specs=(P(), P(), P(), P(), P(axis), P(), P(), P()),
      out_specs=(P(), (P(), P(), P())))

  def train_step(state, images):
    step_rng = jax.random.fold_in(state.rng, state.step)
    aug_rng, loss_rng = jax.random.split(step_rng)

    def loss_fn(params):
      return sharded_loss(params, state.batch_stats, state.target_params, state.method_state,
                          images, aug_rng, loss_rng, state.step)

    (loss, (metrics, batch_stats, method_state)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if hasattr(method, 'after_update'):
      params = method.after_update(params)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    target_params = state.target_params
    if hasattr(method, 'target_momentum'):
      momentum = method.target_momentum(state.step)
      target_params = optax.incremental_update(params, target_params, step_size=1.0 - momentum)
      metrics['target_momentum'] = momentum
    if schedule is not None:
      metrics['learning_rate'] = schedule(state.step)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state, target_params=target_params,
                              method_state=method_state)
    return new_state, metrics

  return jax.jit(train_step, donate_argnums=0,
                 in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
                 out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)))
