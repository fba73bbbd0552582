"""Checkpoints: orbax's CheckpointManager over the train state and the grain iterator state.

Saves are asynchronous (training goes on while the state is written) and atomic: orbax writes
into a temporary directory and renames it once complete, so an interrupted save leaves the
previous checkpoints as they were and the unfinished one is never picked up for a restore.
Saving the iterator with the state makes a resumed run see exactly the batches that the
uninterrupted run would have seen. Restores lay every array out as the given state is laid out,
whatever the mesh it was saved from: a state saved with `mesh.fsdp=2` on 8 devices restores
replicated, or onto 4 devices.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be restored; the message says what to do."""


class Checkpointer:

  def __init__(self, directory: str, keep: int = 3, asynchronous: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=asynchronous)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_iterator) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator)))

  def restore_or_keep(self, state, data_iterator):
    """Restores the latest checkpoint into the structure of `state` and into the iterator.

    Returns (state, iterator, restored_step or None). Without a checkpoint, returns the
    arguments unchanged. A checkpoint that cannot be read is an error, never silently skipped:
    skipping it would start training over and, after `keep` saves, delete the good ones.
    """
    step = self.latest_step()
    if step is None:
      return state, data_iterator, None
    abstract_state = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=grain.checkpoint.CheckpointRestore(data_iterator)))
    except Exception as e:  # orbax raises many types; all mean the same to the user.
      older = [s for s in self._manager.all_steps() if s < step]
      hint = (f'move it aside (mv {self.directory}/{step} {self.directory}/{step}.bad) to '
              f'resume from step {max(older)}' if older else
              f'move it aside (mv {self.directory}/{step} {self.directory}/{step}.bad) to '
              'start from scratch')
      raise CheckpointError(
          f'Cannot restore checkpoint step {step} in {self.directory}: {type(e).__name__}: '
          f'{e}\nIf the config changed since it was written (model, optimizer, method), use a '
          f'new --workdir. If the checkpoint is damaged, {hint}. Nothing was deleted.') from e
    logging.info('Restored checkpoint at step %d from %s', step, self.directory)
    return restored['state'], restored['data'], step

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore_state(self, state, step: int | None = None):
    """The train state of checkpoint `step` (default the latest) in the structure of `state`,
    without the data iterator: for evaluation and downstream use."""
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f'No checkpoint in {self.directory}: train first (ssl-jax-train '
                            '--workdir=...), or pass the workdir of a run that saved one.')
    step = steps[-1] if step is None else step
    if step not in steps:
      raise CheckpointError(f'No checkpoint at step {step} in {self.directory}; it holds '
                            f'steps {steps}.')
    abstract_state = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:  # orbax raises many types; all mean the same to the user.
      raise CheckpointError(
          f'Cannot restore checkpoint step {step} in {self.directory}: {type(e).__name__}: '
          f'{e}\nIf the config.json beside it was edited, restore it; if the checkpoint is '
          f'damaged, pick another step (available: {steps}).') from e
    return restored['state']

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
