"""AdCo (Hu et al. 2021): MoCo's query and momentum key encoders, contrasted against a bank of
K free negative vectors that are trained adversarially to maximise the contrastive loss.

What is implemented (the paper's single-crop AdCo, following their released code):

* Queries q = f(view) from the online encoder and projector, keys k from a momentum copy
  (`target_params`, momentum `method.target_momentum`), both l2-normalised. Each query's
  candidates are its key, the other keys of the global batch and the K bank vectors
  (l2-normalised): `losses/info_nce.info_nce_with_negatives` at temperature
  `method.temperature`. With `method.symmetric` both views serve as queries against the
  other view's keys and the two losses are averaged (the code's `--sym`).
* The encoder minimises that loss with the bank as it was at the start of the step.
* The bank maximises the same loss at its own temperature `method.memory_temperature`,
  with the queries and keys held fixed (their eq. 5-6; the gradient of the normalisation is
  included, as in their closed form). `jax.grad` of the global-batch loss gives the bank's
  gradient: under `shard_map` its transpose sums every device's contribution, so each device
  applies the same update. The step is SGD with momentum on -loss, with weight decay:
      v <- memory_momentum * v - dL/dbank + memory_weight_decay * bank
      bank <- bank - memory_lr * v
  `bank` and `v` live in `method_state` (`negatives`, `velocity`).
* Initialisation (their `ad_init`): the bank starts as Gaussian noise and, with
  `method.init_bank_from_keys`, the first ceil(K / N) steps fill it with the keys of view 2
  (gathered across devices, written in order from row `filled`), without adversarial
  updates; these steps also train the encoder (the paper runs them as a separate pass and
  then copies the query encoder into the key encoder; here the key encoder just keeps its
  momentum update).

Not implemented: multi-crop. The projector is SimCLR's MLP with synchronised BatchNorm in
its hidden layer (MoCo v2's has none; BatchNorm is global here, so there is no shuffle-BN).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ssl_jax import parallel
from ssl_jax.losses.info_nce import info_nce_with_negatives, l2_normalize
from ssl_jax.methods.base import Method
from ssl_jax.methods.common import (EncoderWithProjector, encoder_with_projector,
                                    forward_together, split_views)


@dataclasses.dataclass(frozen=True)
class AdCo(Method):
  # MoCo's key encoder: a moving average of the whole query network, constant momentum.
  target_networks = ('encoder', 'projector')
  target_momentum_schedule = 'constant'

  @classmethod
  def method_problems(cls, config) -> list[str]:
    m = config.method
    problems = []
    # The paper's ImageNet values, to name a sensible fix.
    for name, usual in (('temperature', 0.12), ('memory_temperature', 0.02),
                        ('memory_lr', 3.0)):
      if not m[name] > 0:
        problems.append(f'method.{name}={m[name]} must be positive ({usual} in the paper).')
    if not 0 <= m.memory_momentum < 1:
      problems.append(f'method.memory_momentum={m.memory_momentum} must be in [0, 1) (0.9 in '
                      'the paper).')
    if not m.queue_size > 0:
      problems.append(f'method.queue_size={m.queue_size} must be positive: the number of '
                      'adversarial negatives (65536 in the paper).')
    if not m.memory_weight_decay >= 0:
      problems.append(f'method.memory_weight_decay={m.memory_weight_decay} must be >= 0 '
                      '(1e-4 in the paper).')
    return problems

  def network(self, axis_name: str | None = None) -> EncoderWithProjector:
    return encoder_with_projector(self.config, axis_name)

  def init(self, rng, images):
    net_rng, bank_rng = jax.random.split(rng)
    params, batch_stats = self.init_networks(net_rng, images)
    m = self.config.method
    shape = (m.queue_size, m.projector_output_dim)
    state = {
        'negatives': jax.random.normal(bank_rng, shape, jnp.float32),
        'velocity': jnp.zeros(shape, jnp.float32),
        # Rows [0, filled) hold keys; adversarial updates start once the bank is full.
        'filled': jnp.asarray(0 if m.init_bank_from_keys else m.queue_size, jnp.int32),
    }
    return params, batch_stats, state

  def _views(self, views, queries: bool) -> list:
    """The views the query (or key) encoder sees: both if symmetric, else view 1 (view 2)."""
    if self.config.method.symmetric:
      return list(views[:2])
    return [views[0] if queries else views[1]]

  def forward(self, params, batch_stats, views, rng, axis_name, first_row):
    (_, zq), batch_stats = forward_together(self.network(axis_name), params, batch_stats,
                                            self._views(views, queries=True), rng, first_row)
    return {'q': [l2_normalize(z) for z in zq]}, batch_stats

  def target_forward(self, target_params, batch_stats, method_state, views, rng, axis_name,
                     first_row):
    del method_state, rng, first_row  # no drop path in the key encoder
    key_views = self._views(views, queries=False)
    # The key encoder's BatchNorm uses this batch's statistics; its running averages are
    # never used (only the query encoder is evaluated), so its updates are dropped.
    (_, zk), _ = self.network(axis_name).apply(
        {'params': target_params, 'batch_stats': batch_stats},
        jnp.concatenate(key_views, axis=0), train=True, mutable=['batch_stats'])
    return {'k': split_views(l2_normalize(zk), len(key_views))}, {}

  def objective(self, params, method_state, outputs, targets, target_stats, rng, step,
                axis_name):
    del params, target_stats, rng, step
    m = self.config.method
    q, k = outputs['q'], targets['k']
    if m.symmetric:
      pairs = [(q[0], k[1]), (q[1], k[0])]
      view2_keys = k[1]
    else:
      pairs = [(q[0], k[0])]
      view2_keys = k[0]

    def contrastive(bank, pairs, temperature):
      results = [info_nce_with_negatives(qi, ki, bank, temperature, axis_name)
                 for qi, ki in pairs]
      return jax.tree.map(lambda *xs: sum(xs) / len(xs), *results)

    bank = method_state['negatives']
    loss, metrics = contrastive(bank, pairs, m.temperature)

    fixed_pairs = jax.lax.stop_gradient(pairs)
    memory_loss, bank_grad = jax.value_and_grad(
        lambda b: contrastive(b, fixed_pairs, m.memory_temperature)[0])(bank)
    new_state = self._update_bank(method_state, bank_grad,
                                  parallel.gather_rows_replicated(view2_keys, axis_name))
    metrics = dict(metrics, memory_loss=jax.lax.stop_gradient(memory_loss),
                   bank_filled=method_state['filled'] / m.queue_size)
    return loss, (metrics, new_state)

  def _update_bank(self, state, bank_grad, keys):
    """One adversarial step once the bank is full; until then, appends `keys` [N, d]."""
    m = self.config.method
    bank, velocity, filled = state['negatives'], state['velocity'], state['filled']
    ascent_velocity = (m.memory_momentum * velocity - bank_grad
                       + m.memory_weight_decay * bank)
    ascended = bank - m.memory_lr * ascent_velocity
    rows = filled + jnp.arange(keys.shape[0])
    appended = bank.at[rows].set(keys, mode='drop')  # rows past the end are dropped
    full = filled >= m.queue_size
    return {
        'negatives': jnp.where(full, ascended, appended),
        'velocity': jnp.where(full, ascent_velocity, velocity),
        'filled': jnp.minimum(filled + keys.shape[0], m.queue_size).astype(jnp.int32),
    }
