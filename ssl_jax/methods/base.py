"""The method interface: the seam that keeps the trainer generic.

A method owns its networks, its loss and any state it keeps between steps; the trainer owns
the mesh, the views, the optimizer, checkpoints and logging. Adding a method is one file in
this package (a subclass of `Method`), registered in `methods/__init__.py`, plus one config:
never a trainer change.

`Method` holds the defaults that most methods share, so a method file writes only what is its
own: `network` and `loss`, and whichever optional hooks it needs. Every hook has a default
here; the trainer calls them unconditionally, never probing with `hasattr`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ssl_jax import models, optim, parallel

Params = Any
Metrics = dict[str, jnp.ndarray]
# fold_in tag ('drop') that keeps the dropout keys apart from what a loss draws from its rng.
_DROPOUT_STREAM = 0x64726F70


@dataclasses.dataclass(frozen=True)
class RunLength:
  """How long the run is, for methods whose schedules span it (momentum, temperatures), and
  the training set's size, for methods that keep a state per example (None: not known)."""
  total_steps: int
  steps_per_epoch: int
  num_examples: int | None = None


def cosine_momentum(base: float, step, total_steps: int):
  """m(k) = 1 - (1 - m_0) (cos(pi k / K) + 1) / 2: from m_0 at step 0 to 1 at step K.

  The target-momentum schedule of BYOL (Grill et al. 2020, Sec. 3.2), which MoCo v3 and DINO
  adopt."""
  one_minus = optax.cosine_decay_schedule(init_value=1.0 - base, decay_steps=total_steps)
  return 1.0 - one_minus(step)


@dataclasses.dataclass(frozen=True)
class Method:
  """What the trainer calls. All functions are pure and jit-able.

  A method is constructed as `cls(config, run_length)`: the whole experiment config (it reads
  `config.model` and `config.method`) and a `RunLength`.
  """
  config: Any
  run_length: RunLength | None = None

  # How many global views of each image the loss wants; `config.augment.num_local_crops`
  # adds multi-crop local views after them, for methods that set `multi_crop`.
  num_views: ClassVar[int] = 2
  multi_crop: ClassVar[bool] = False
  # A momentum (target) network: the top-level networks of `params` that it averages (None:
  # the method has none). The trainer sets target <- m target + (1 - m) online on exactly
  # these subtrees after each optimizer step (optax.incremental_update), with m from
  # `target_momentum`; a network the target does not use (BYOL's predictor) is left out.
  target_networks: ClassVar[tuple[str, ...] | None] = None
  # 'cosine' (`cosine_momentum`, from method.target_momentum to 1) or 'constant'.
  target_momentum_schedule: ClassVar[str] = 'cosine'
  # Per-example inputs of another modality that the method reads from the batch beside the
  # image (image-text methods: 'texts', the tokenized captions). The trainer shards them as
  # it shards the images and appends them to `views`, after the image views and local crops,
  # in this order; the data source must provide every one of them (checked before training).
  # 'index' (int32, each row's record index in the training source) comes with every batch.
  paired_inputs: ClassVar[tuple[str, ...]] = ()

  @functools.cached_property
  def frozen_apply(self):
    """`encode` as `apply(variables, images)`, variables = (params, batch_stats): the apply
    of the method's `features.FrozenEncoder`s. One function object per method, so that
    evaluation's jitted extraction, cached on it (`features.jitted_encoder`), compiles once
    per run instead of at every periodic evaluation."""
    return lambda variables, images: self.encode(*variables, images)

  # --- What every method writes. ---
  #
  # The loss comes in two parts, the networks (`forward`, `target_forward`) and the objective
  # on their per-example outputs (`objective`): `loss` composes them, and the cached-embedding
  # gradient (`ssl_jax.microbatch`, `config.microbatches`) runs the networks one micro-batch
  # at a time and the objective once on the whole batch.

  def network(self, axis_name: str | None = None) -> nn.Module:
    """The online network. Its `encode(x)` method gives the frozen-encoder features;
    BatchNorm layers synchronise over `axis_name` (None: local)."""
    raise NotImplementedError

  def forward(self, params, batch_stats, views: list[jnp.ndarray], rng, axis_name,
              first_row) -> tuple[Params, Params]:
    """The online network in training mode on this device's rows of every view: (outputs,
    new batch_stats). `outputs` is a pytree of per-example arrays, each with the rows of one
    view as its leading axis (a method that forwards views concatenated splits them again),
    so that the outputs of consecutive row blocks concatenate into those of the whole batch.
    `first_row` is the index in the global batch of these rows' first example (each view
    holds the same examples): drop-path masks and other per-example randomness are keyed by
    it (`concatenated_views`, `forward_views`). `rng` is the loss's (`dropout_rngs`)."""
    raise NotImplementedError

  def target_forward(self, target_params, batch_stats, method_state, views, rng, axis_name,
                     first_row) -> tuple[Params, Params]:
    """The networks that get no gradient (momentum encoders, teachers) on the same rows:
    (per-example outputs as `forward`'s, running statistics they update, {} for none; DINO's
    teacher keeps its own). The outputs reach `objective` through a stop-gradient. Default:
    none."""
    del target_params, batch_stats, method_state, views, rng, axis_name, first_row
    return {}, {}

  def objective(self, params, method_state, outputs, targets, target_stats, rng, step,
                axis_name) -> tuple[jnp.ndarray, tuple[Metrics, Any]]:
    """The loss of the whole global batch from the per-example outputs of this device's rows
    (`forward`'s and `target_forward`'s, and the latter's running statistics): (loss, (metrics,
    new method_state)), the loss identical on every device, every cross-device reduction
    naming `axis_name`, the new method_state identical on every device. It reads `params`
    only for what is not per-example (SwAV's prototypes); `step` is the optimizer step (a
    traced int32) for schedules."""
    raise NotImplementedError

  def loss(self, params, batch_stats, target_params, method_state, views: list[jnp.ndarray],
           rng, step, axis_name: str | None) -> tuple[jnp.ndarray, tuple[Metrics, Params, Any]]:
    """Runs inside `shard_map` on this device's rows of every view.

    `views` holds the global views, then the local crops, then the `paired_inputs` (rows as
    the views'); `step` is the optimizer step
    (a traced int32) for schedules inside the loss. Returns the global-batch loss (identical
    on every device) and (metrics, new batch_stats, new method_state); every cross-device
    reduction names `axis_name`, and the new method_state must be identical on every device.
    """
    first_row = parallel.global_row_offset(views[0].shape[0], axis_name)
    outputs, new_batch_stats = self.forward(params, batch_stats, views, rng, axis_name,
                                            first_row)
    targets, target_stats = self.target_forward(target_params, batch_stats, method_state,
                                                views, rng, axis_name, first_row)
    loss, (metrics, new_state) = self.objective(
        params, method_state, outputs, jax.lax.stop_gradient(targets), target_stats, rng, step,
        axis_name)
    return loss, (metrics, new_batch_stats, new_state)

  @classmethod
  def splits_its_loss(cls) -> bool:
    """Whether the loss is written as networks and objective (`forward`, `objective`), which
    the cached-embedding gradient needs; a method that overrides `loss` alone is not."""
    return cls.forward is not Method.forward and cls.objective is not Method.objective

  # --- Defaults, overridden where a method differs. ---

  @classmethod
  def config_problems(cls, config) -> list[str]:
    """Config errors of this method, each naming its fix; `method_problems` adds the
    method's own checks to the ones every method shares."""
    problems = []
    if config.augment.num_local_crops and not cls.multi_crop:
      problems.append(f'{config.method.name} uses {cls.num_views} global views and no '
                      'multi-crop: set augment.num_local_crops = 0.')
    if cls.target_networks is not None:
      m = config.method.get('target_momentum')
      if m is None or not 0.0 <= m <= 1.0:
        problems.append(f'method.target_momentum={m} must be in [0, 1] (the momentum of the '
                        'target network; 1 freezes it).')
    if config.get('microbatches', 1) > 1 and not cls.splits_its_loss():
      problems.append(f'{config.method.name} computes its loss in one piece (it overrides '
                      '`loss` only), so it cannot run micro-batched: set microbatches = 1, or '
                      'write its loss as `forward` and `objective` (methods/base.py).')
    return problems + cls.method_problems(config)

  @classmethod
  def method_problems(cls, config) -> list[str]:
    del config
    return []

  @staticmethod
  def dropout_rngs(rng, call: int) -> dict[str, jax.Array] | None:
    """The `rngs` of the online network's training-mode forward number `call` (0, 1, ...)
    of a loss evaluation, from the loss's `rng`: a 'dropout' key for stochastic depth
    (`model.drop_path_rate`), the same on every device, as `models.vit.drop_path_mask`
    needs for the step to be the same on any number of devices. Each call gets its own
    key, so views forwarded one at a time get different masks (and views concatenated into
    one call get theirs from `drop_path_mask`). Target and teacher networks get none: they
    run without drop path, as DINO's teacher (drop_path_rate 0). `rng` None (a loss
    evaluated without one, as tests of deterministic losses do): None, no drop path."""
    if rng is None:
      return None
    stream = jax.random.fold_in(rng, _DROPOUT_STREAM)
    return {'dropout': jax.random.fold_in(stream, call)}

  def init_networks(self, rng, images) -> tuple[Params, Params]:
    """(params, batch_stats) of the online network for a sample batch of float images."""
    variables = self.network().init(rng, images, train=False)
    return variables['params'], variables.get('batch_stats', {})

  def init(self, rng, images: jnp.ndarray) -> tuple[Params, Params, Any]:
    """Returns (params, batch_stats, method_state); methods with state override this."""
    params, batch_stats = self.init_networks(rng, images)
    return params, batch_stats, {}

  def encode(self, params, batch_stats, images: jnp.ndarray) -> jnp.ndarray:
    """Frozen-encoder features [B, D] for evaluation (no projection head, inference BN)."""
    return self.network().apply({'params': params, 'batch_stats': batch_stats}, images,
                                method='encode')

  def target_of(self, params) -> Params:
    """The online subtrees that the target network averages."""
    return {name: params[name] for name in self.target_networks}

  def init_target(self, params) -> Params:
    """The target starts as a copy of the online networks it averages ({} without one)."""
    if self.target_networks is None:
      return {}
    return jax.tree.map(jnp.copy, self.target_of(params))

  def target_momentum(self, step):
    """m at optimizer step `step`, from `method.target_momentum`."""
    base = self.config.method.target_momentum
    if self.target_momentum_schedule == 'constant':
      return jnp.asarray(base, jnp.float32)
    return cosine_momentum(base, step, self.run_length.total_steps)

  def frozen_steps(self) -> dict[tuple[str, ...], int | float]:
    """Subtrees of `params` (key paths) that the optimizer leaves untouched for their first
    N steps, as PyTorch's optimizers skip a parameter whose .grad is None: no update, no
    weight decay, no optimizer-state change; then they start as a fresh optimizer at the
    global learning rate (`optim.make_optimizer`). DINO freezes its last layer, SwAV its
    prototypes; a method that overrides this adds its entries to these.

    Here: the encoder's parameters that its model never trains (`models.frozen_parameters`:
    MoCo v3's random patch projection), frozen for the whole run (`optim.FOREVER`). Every
    method's network names its encoder 'encoder'."""
    return {('encoder',) + path: optim.FOREVER
            for path in models.frozen_parameters(self.config.model)}

  def after_update(self, params) -> Params:
    """A projection applied after each optimizer step (SwAV normalises its prototypes)."""
    return params

  def evaluation_variables(self, params, batch_stats, target_params, method_state):
    """(params, batch_stats) that evaluation passes to `encode`: the online networks, unless
    the paper evaluates another network (DINO: the teacher)."""
    del target_params, method_state
    return params, batch_stats
