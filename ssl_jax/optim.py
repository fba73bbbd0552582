"""Optimizers and schedules, all from optax; this module only chooses and masks them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


# `frozen_steps` value of a subtree that the optimizer never updates (`make_optimizer`).
FOREVER = math.inf


def scaled_learning_rate(opt_cfg, global_batch_size: int) -> float:
  """Base LR scaled with the batch, as SimCLR does: linear (lr * B / 256) or square root
  (lr * sqrt(B)), the latter being better for small batches and long schedules."""
  scaling = opt_cfg.lr_scaling
  if scaling == 'linear':
    return opt_cfg.base_lr * global_batch_size / 256
  if scaling == 'sqrt':
    return opt_cfg.base_lr * math.sqrt(global_batch_size)
  if scaling == 'none':
    return opt_cfg.base_lr
  raise ValueError(f"optimizer.lr_scaling must be 'linear', 'sqrt' or 'none', got {scaling!r}.")


def learning_rate_schedule(opt_cfg, global_batch_size: int, total_steps: int,
                           warmup_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to the scaled peak, then cosine decay to 0 at `total_steps`."""
  peak = scaled_learning_rate(opt_cfg, global_batch_size)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=0.0)


def weight_decay_schedule(opt_cfg, total_steps: int) -> float | optax.Schedule:
  """`optimizer.weight_decay`, or, when `optimizer.weight_decay_end` is set, a cosine from it
  at step 0 to that value at `total_steps`: DINO's and iBOT's rise 0.04 -> 0.4 (their
  `cosine_scheduler(weight_decay, weight_decay_end, epochs, niter_per_ep)`, one value per
  iteration, the same formula)."""
  end = opt_cfg.get('weight_decay_end')  # configs saved before it existed: constant
  if end is None or end == opt_cfg.weight_decay:
    return opt_cfg.weight_decay
  start, total = opt_cfg.weight_decay, max(int(total_steps), 1)
  return lambda count: end + 0.5 * (start - end) * (
      1 + jnp.cos(jnp.pi * jnp.minimum(count, total) / total))


def decay_mask(params):
  """True for weight matrices and conv kernels; False for biases and normalisation scales.

  SimCLR/BYOL exclude the 1-D parameters from weight decay and from LARS's trust ratio:
  adapting their step size to their norm destabilises training.
  """
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(opt_cfg, schedule: optax.ScalarOrSchedule,
                   frozen_steps: Mapping[tuple[str, ...], int | float] | None = None,
                   weight_decay: float | optax.Schedule | None = None,
                   ) -> optax.GradientTransformation:
  """The configured optimizer over `schedule` (the learning rate: a function of the optimizer
  step, or a constant), with `weight_decay` (a rate or a schedule, `weight_decay_schedule`;
  None: the config's rate).

  `frozen_steps` maps parameter subtrees, as key paths into the params (e.g.
  `('head', 'last_layer')`), to a number of initial optimizer steps N during which they are
  frozen: no update at all (weight decay included) and an untouched optimizer state. At step
  N the subtree starts as a freshly initialised optimizer would (Adam's moments at zero and its
  own bias-correction count at 0) at the global learning rate schedule(N), schedule(N + 1),
  ... : what PyTorch does for a parameter whose `.grad` is None (DINO's
  `cancel_gradients_last_layer`). Entries with N = 0 are ignored; methods declare them with
  their optional `frozen_steps()` hook.

  N = `FOREVER` freezes a subtree for the whole run (MoCo v3's random patch projection): its
  updates are zero (`optax.set_to_zero`), so weight decay never shrinks it, and the optimizer
  keeps no state for it (no Adam moments, no momentum).

  With `optimizer.clip_grad_norm` set the gradients are clipped first (`gradient_clipping`).
  """
  tx = _frozen_aware_optimizer(opt_cfg, schedule, frozen_steps, weight_decay)
  clip = gradient_clipping(opt_cfg)
  return tx if clip is None else optax.chain(clip, tx)


def gradient_clipping(opt_cfg) -> optax.GradientTransformation | None:
  """`optimizer.clip_grad_norm` (unset: None, no clipping): the gradients' global norm capped
  at it (PyTorch's `clip_grad_norm_`: hyperbolic ViT's train.py), or with
  `optimizer.clip_per_parameter` each parameter's norm capped separately (DINO's and iBOT's
  `utils.clip_gradients`). Applied to the whole gradient before the optimizer, as there."""
  max_norm = opt_cfg.get('clip_grad_norm')  # configs saved before it existed: none
  if max_norm is None:
    return None
  if not opt_cfg.get('clip_per_parameter', False):
    return optax.clip_by_global_norm(max_norm)

  def clip_each(updates, state, params=None):
    del params

    def clip(g):
      norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
      # DINO's rule: scale by max_norm / (norm + 1e-6) where that is below 1.
      return g * jnp.minimum(1.0, max_norm / (norm + 1e-6)).astype(g.dtype)
    return jax.tree.map(clip, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), clip_each)


def _frozen_aware_optimizer(opt_cfg, schedule, frozen_steps, weight_decay):
  """`make_optimizer` without the clipping."""
  if weight_decay is None:
    weight_decay = opt_cfg.weight_decay
  frozen = {tuple(path): n if n == FOREVER else int(n)
            for path, n in (frozen_steps or {}).items() if n > 0}
  if not frozen:
    return _make_optimizer(opt_cfg, schedule, weight_decay)
  transforms = {'trained': _make_optimizer(opt_cfg, schedule, weight_decay)}
  if FOREVER in frozen.values():
    transforms[_label(FOREVER)] = optax.set_to_zero()
  for n in sorted(set(frozen.values()) - {FOREVER}):
    # The branch's own step count restarts at 0 when it unfreezes at global step n; its
    # schedules are shifted so that it reads the global learning rate and decay there.
    shifted = schedule
    if callable(schedule):
      shifted = lambda count, n=n: schedule(count + n)  # noqa: E731
    decay = weight_decay
    if callable(weight_decay):
      decay = lambda count, n=n: weight_decay(count + n)  # noqa: E731
    transforms[_label(n)] = skip_first_steps(_make_optimizer(opt_cfg, shifted, decay), n)

  def labels(params):
    used = set()

    def label(path, _):
      keys = tuple(_key_name(k) for k in path)
      matches = [prefix for prefix in frozen if keys[:len(prefix)] == prefix]
      if not matches:
        return 'trained'
      prefix = max(matches, key=len)  # the innermost declaration wins
      used.add(prefix)
      return _label(frozen[prefix])

    tree = jax.tree_util.tree_map_with_path(label, params)
    if unknown := set(frozen) - used:
      raise ValueError(f'frozen_steps names parameters that do not exist: {sorted(unknown)}.')
    return tree

  return optax.multi_transform(transforms, labels)


def _label(num_steps) -> str:
  """The multi_transform label of the subtrees frozen for `num_steps` steps."""
  return 'frozen' if num_steps == FOREVER else f'frozen_{num_steps}'


def _key_name(key) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


class SkipFirstStepsState(NamedTuple):
  count: jax.Array  # optimizer steps seen, frozen ones included
  inner_state: optax.OptState


def skip_first_steps(inner: optax.GradientTransformation,
                     num_steps: int) -> optax.GradientTransformation:
  """`inner`, except that its first `num_steps` calls return zero updates and leave its state
  untouched, so that `inner` starts from its initial state (count 0) at step `num_steps`."""

  def init_fn(params):
    return SkipFirstStepsState(jnp.zeros([], jnp.int32), inner.init(params))

  def update_fn(updates, state, params=None):
    def skip(updates, inner_state, params):
      del params
      return jax.tree.map(jnp.zeros_like, updates), inner_state

    def run(updates, inner_state, params):
      return inner.update(updates, inner_state, params)

    updates, inner_state = jax.lax.cond(state.count < num_steps, skip, run, updates,
                                        state.inner_state, params)
    return updates, SkipFirstStepsState(optax.safe_increment(state.count), inner_state)

  return optax.GradientTransformation(init_fn, update_fn)


def _make_optimizer(opt_cfg, schedule: optax.ScalarOrSchedule,
                    weight_decay: float | optax.Schedule) -> optax.GradientTransformation:
  name = opt_cfg.name
  if name == 'lars':
    return optax.lars(schedule, weight_decay=weight_decay,
                      weight_decay_mask=decay_mask, trust_coefficient=opt_cfg.trust_coefficient,
                      trust_ratio_mask=decay_mask, momentum=opt_cfg.momentum, eps=0.0,
                      nesterov=opt_cfg.nesterov)
  if name == 'sgd':
    return optax.chain(optax.add_decayed_weights(weight_decay, mask=decay_mask),
                       optax.sgd(schedule, momentum=opt_cfg.momentum, nesterov=opt_cfg.nesterov))
  if name == 'adamw':
    # `.get`: configs saved before `eps` existed used optax's default (CLIP sets 1e-6).
    return optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.get('eps', 1e-8),
                       weight_decay=weight_decay, mask=decay_mask)
  raise ValueError(f"optimizer.name must be one of {OPTIMIZERS}, got {name!r}.")


OPTIMIZERS = ('lars', 'sgd', 'adamw')
