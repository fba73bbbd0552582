"""Optimizers and schedules, all from optax; this module only chooses and masks them."""

from __future__ import annotations

import math

import jax
import optax


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


def decay_mask(params):
  """True for weight matrices and conv kernels; False for biases and normalisation scales.

  SimCLR/BYOL exclude the 1-D parameters from weight decay and from LARS's trust ratio:
  adapting their step size to their norm destabilises training.
  """
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(opt_cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
  name = opt_cfg.name
  if name == 'lars':
    return optax.lars(schedule, weight_decay=opt_cfg.weight_decay,
                      weight_decay_mask=decay_mask, trust_coefficient=opt_cfg.trust_coefficient,
                      trust_ratio_mask=decay_mask, momentum=opt_cfg.momentum, eps=0.0,
                      nesterov=opt_cfg.nesterov)
  if name == 'sgd':
    return optax.chain(optax.add_decayed_weights(opt_cfg.weight_decay, mask=decay_mask),
                       optax.sgd(schedule, momentum=opt_cfg.momentum, nesterov=opt_cfg.nesterov))
  if name == 'adamw':
    return optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2,
                       weight_decay=opt_cfg.weight_decay, mask=decay_mask)
  raise ValueError(f"optimizer.name must be one of {OPTIMIZERS}, got {name!r}.")


OPTIMIZERS = ('lars', 'sgd', 'adamw')
