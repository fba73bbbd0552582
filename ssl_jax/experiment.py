"""The one builder of what a run is made of: from a config, the mesh, the run length, the
learning-rate schedule and optimizer, the method, the initial train state and the compiled
step. The trainer, `pretrained`, the benchmarks and the tests all build through it, so they
run the same structure (a workdir is restored into exactly the tree that was trained)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ssl_jax import config_lib, optim, parallel, sharding
from ssl_jax.data import sources
from ssl_jax.evaluation.online_probe import OnlineProbe
from ssl_jax.methods import RunLength, build_method
from ssl_jax.state import create_train_state
from ssl_jax.train_step import make_train_step


def steps_per_epoch(config, num_train_examples: int) -> int:
  return max(1, num_train_examples // config.batch_size)


def schedule_steps(config, num_train_examples: int) -> tuple[int, int]:
  """(total_steps, warmup_steps) from epochs, unless total_steps is set."""
  per_epoch = steps_per_epoch(config, num_train_examples)
  total = config.total_steps or math.ceil(config.num_epochs * per_epoch)
  warmup = min(round(config.optimizer.warmup_epochs * per_epoch), total)
  return total, warmup


@dataclasses.dataclass(frozen=True)
class Experiment:
  config: Any
  mesh: Any
  total_steps: int
  warmup_steps: int
  schedule: Any
  tx: Any
  method: Any
  probe: Any            # OnlineProbe, or None
  init_fn: Callable     # PRNG key -> TrainState, laid out over the mesh by state_specs
  state_specs: Any      # the TrainState's PartitionSpecs (`ssl_jax.sharding`)

  def init_state(self, seed: int | None = None):
    """The initial TrainState from `seed` (default: the config's)."""
    return self.init_fn(jax.random.PRNGKey(self.config.seed if seed is None else seed))

  def make_train_step(self):
    """The jitted step `(state, images, labels=None) -> (state, metrics)`."""
    return make_train_step(self.method, self.tx, self.mesh, self.config.augment,
                           self.schedule, self.probe, self.state_specs)

  def state_sharding(self):
    """The TrainState's NamedShardings on the mesh."""
    return sharding.named(self.state_specs, self.mesh)


def mesh_for(config):
  """The mesh of all devices with `config.mesh.fsdp` (configs saved before it: 1)."""
  return parallel.make_mesh(fsdp=config.get('mesh', {}).get('fsdp', 1))


def build(config, *, num_train_examples: int, image_channels: int, mesh=None) -> Experiment:
  """Validates `config` (for the mesh's device count) and builds its experiment.

  `num_train_examples` sets the epoch length (schedules in epochs are converted to steps);
  `image_channels` the shape of the sample batch that initialises the networks.
  """
  mesh = mesh or mesh_for(config)
  config_lib.validate(config, mesh.devices.size, jax.process_count())
  total_steps, warmup_steps = schedule_steps(config, num_train_examples)
  schedule = optim.learning_rate_schedule(config.optimizer, config.batch_size, total_steps,
                                          warmup_steps)
  method = build_method(config, RunLength(total_steps,
                                          steps_per_epoch(config, num_train_examples),
                                          num_train_examples))
  tx = optim.make_optimizer(config.optimizer, schedule, method.frozen_steps(),
                            optim.weight_decay_schedule(config.optimizer, total_steps))
  probe = None
  if config.eval.online_probe:
    num_classes = sources.source_info(config.data.name, config.data.data_dir,
                                      split=config.data.train_split).num_classes
    probe = OnlineProbe(num_classes, config.eval.online_probe_lr)
  size = config.augment.crop_size
  sample = jnp.zeros((2, size, size, image_channels), jnp.float32)
  create = lambda rng: create_train_state(method, tx, rng, sample, probe)  # noqa: E731
  state_specs = sharding.tree_specs(jax.eval_shape(create, jax.random.PRNGKey(0)), mesh)
  init_fn = jax.jit(create, out_shardings=sharding.named(state_specs, mesh))
  return Experiment(config, mesh, total_steps, warmup_steps, schedule, tx, method, probe,
                    init_fn, state_specs)
