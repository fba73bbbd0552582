"""The compiled train step: views, loss under shard_map, gradients, optimizer update.

The batch is sharded over every device of the mesh; the state is replicated, or with
`mesh.fsdp` > 1 its large leaves are split over the fsdp axis (`ssl_jax.sharding`) and
gathered inside the step. Augmentation and the method's loss run inside `shard_map`, each
device on its own rows; an example's augmentation key depends only on the step key and its
index in the *global* batch, so the views, and hence the whole step, are the same whatever the
number of devices and the mesh's shape (up to float rounding). The optimizer update runs
outside `shard_map`, on each device's slice of the parameters and optimizer state.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from ssl_jax import compiler_options, microbatch, parallel, sharding
from ssl_jax.data import augment


def _batch_rows(images) -> int:
  """Rows of a batch given as stored images or as one host-cropped array per view."""
  return jax.tree.leaves(images)[0].shape[0]


def make_train_step(method, tx: optax.GradientTransformation, mesh, augment_cfg,
                    schedule: optax.Schedule | None = None, probe=None, state_specs=None):
  """Returns `train_step(state, images, labels=None, paired=()) -> (state, metrics)`,
  jitted, donating the state. `images` is the uint8 batch as stored (views are cropped on the
  devices) or a tuple of uint8 views cropped on the host, one per view (`data.host_crop`).
  With an `OnlineProbe`, the labels train it on the encoder's frozen features. `paired`: the
  batch's arrays named by `method.paired_inputs` (the captions of image-text methods), in
  that order, appended to the views. `state_specs`: the TrainState's PartitionSpecs
  (`sharding.tree_specs`; None: all replicated).

  With `config.microbatches` = K > 1 the method's loss and its gradient are computed by the
  cached-embedding scheme (`microbatch.cached_loss`), K micro-batches of each device's rows
  at a time, and so are the probe's features."""
  axis = parallel.batch_axes(mesh)
  view_cfgs = augment.view_configs(augment_cfg, method.num_views)
  num_microbatches = method.config.get('microbatches', 1)
  method_loss = (method.loss if num_microbatches == 1
                 else microbatch.cached_loss(method, num_microbatches))

  def device_loss(specs, params, probe_params, batch_stats, target_params, method_state,
                  images, labels, paired, aug_rng, loss_rng, step):
    params, probe_params, batch_stats, target_params, method_state = sharding.gather(
        (params, probe_params, batch_stats, target_params, method_state), specs)
    first_row = parallel.global_row_offset(_batch_rows(images), axis)
    views = augment.augment_views(aug_rng, images, view_cfgs, first_row) + list(paired)
    loss, (metrics, new_stats, new_state) = method_loss(
        params, batch_stats, target_params, method_state, views, loss_rng, step, axis)
    metrics = dict(metrics, loss=loss)
    if probe is not None:
      # Inference-mode features of the first view: what the frozen encoder will give. No
      # gradient reaches the encoder through them (the probe stops it too).
      frozen = jax.lax.stop_gradient(params)
      features = microbatch.map_rows(lambda v: method.encode(frozen, batch_stats, v), views[0],
                                     num_microbatches)
      probe_loss, probe_acc = probe.loss(probe_params, features, labels, axis)
      metrics.update(online_probe_loss=jax.lax.stop_gradient(probe_loss),
                     online_probe_acc=probe_acc)
      # One backward pass for both: the probe's features are stop-gradient'ed, so the sum's
      # gradient is the method's for the encoder and the probe's for the classifier.
      loss = loss + probe_loss
    _, _, stats_specs, _, method_specs = specs
    metrics, loss = sharding.keep_own_slice((metrics, loss), sharding.replicated_specs(
        (metrics, loss)))
    new_stats = sharding.keep_own_slice(new_stats, stats_specs)
    new_state = sharding.keep_own_slice(new_state, method_specs)
    return loss, (metrics, new_stats, new_state)

  def sharded_loss(state, *args):
    if state_specs is None:
      specs = sharding.replicated_specs(
          (state.params, state.probe_params, state.batch_stats, state.target_params,
           state.method_state))
    else:
      specs = (state_specs.params, state_specs.probe_params, state_specs.batch_stats,
               state_specs.target_params, state_specs.method_state)
    _, _, stats_specs, _, method_specs = specs
    return jax.shard_map(
        functools.partial(device_loss, specs), mesh=mesh,
        in_specs=(*specs, P(axis), P(axis), P(axis), P(), P(), P()),
        out_specs=(P(), (P(), stats_specs, method_specs)))(*args)

  def train_step(state, images, labels, paired):
    step_rng = jax.random.fold_in(state.rng, state.step)
    aug_rng, loss_rng = jax.random.split(step_rng)

    def loss_fn(params, probe_params):
      return sharded_loss(state, params, probe_params, state.batch_stats, state.target_params,
                          state.method_state, images, labels, paired, aug_rng, loss_rng,
                          state.step)

    (_, (metrics, batch_stats, method_state)), (grads, probe_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(state.params, state.probe_params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = method.after_update(params)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    target_params = state.target_params
    if method.target_networks is not None:
      momentum = method.target_momentum(state.step)
      target_params = optax.incremental_update(method.target_of(params), target_params,
                                               step_size=1.0 - momentum)
      metrics['target_momentum'] = momentum
    if schedule is not None:
      metrics['learning_rate'] = schedule(state.step)
    probe_params, probe_opt_state = state.probe_params, state.probe_opt_state
    if probe is not None:
      probe_updates, probe_opt_state = probe.tx.update(probe_grads, probe_opt_state,
                                                       probe_params)
      probe_params = optax.apply_updates(probe_params, probe_updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state, target_params=target_params,
                              method_state=method_state, probe_params=probe_params,
                              probe_opt_state=probe_opt_state)
    return new_state, metrics

  replicated, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  state_sharding = replicated if state_specs is None else sharding.named(state_specs, mesh)
  compiled = jax.jit(train_step, donate_argnums=0,
                     in_shardings=(state_sharding, sharded, sharded, sharded),
                     out_shardings=(state_sharding, replicated),
                     compiler_options=compiler_options.for_train_step(method.config.model))

  def with_labels(images, labels):
    if labels is None:  # without a probe the labels are not read
      labels = jnp.zeros((_batch_rows(images),), jnp.int32, device=sharded)
    return labels

  def step_fn(state, images, labels=None, paired=()):
    return compiled(state, images, with_labels(images, labels), tuple(paired))

  # For ahead-of-time compilation and cost analysis (benchmarks).
  step_fn.lower = lambda state, images, labels=None, paired=(): compiled.lower(
      state, images, with_labels(images, labels), tuple(paired))
  return step_fn
