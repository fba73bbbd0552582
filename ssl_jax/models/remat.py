"""Rematerialisation of an encoder's blocks (`jax.checkpoint`, through `flax.linen.remat`).

With `model.remat`, each block (a ResNet basic or bottleneck block, a ViT `Block`, a ConvNet
stage) keeps for the backward pass only its input and what the saving policy names; the rest
of its activations are recomputed from that input when the gradient reaches the block. The
activation memory of the network becomes that of the block inputs plus one block's
internals, for at most one more forward pass through the blocks.

Saving policies (`model.remat_policy`), jax's `jax.checkpoint_policies` by name:
- 'nothing_saveable': recompute the whole block (the least memory, the most compute).
- 'dots_saveable': keep the outputs of matmuls and convolutions, recompute the elementwise
  work (normalisations, activations, softmax).
- 'dots_with_no_batch_dims_saveable': keep the outputs of matmuls without batch dimensions,
  i.e. the Dense layers' but neither attention's (the scores and their product with the
  values, batched over examples and heads) nor convolutions'.
- 'everything_saveable': keep everything, the same as no remat; a control for measurements.
'' is `DEFAULT_POLICY`, chosen by measuring ResNet-50 and ViT-S/16 train steps in float32 and
bfloat16: of the policies that add at most 5 % to the step's FLOPs on both, the one that saves
the most memory (benchmarks/memory_results.md has the figures, from
`benchmarks/memory.py --remat=off,nothing_saveable,...`). 'nothing_saveable' saves more, for
a quarter to a third more FLOPs.

The blocks are not inside a `scan`, so `prevent_cse` stays on: without it XLA's common
subexpression elimination may merge the backward pass's recomputation with the forward pass
and keep the activations after all.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax

POLICIES: dict[str, Callable[..., bool]] = {
    'nothing_saveable': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'dots_with_no_batch_dims_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'everything_saveable': jax.checkpoint_policies.everything_saveable,
}
DEFAULT_POLICY = 'dots_saveable'

# XLA:CPU undoes rematerialisation by default: it drops the optimization barriers that
# `prevent_cse` places right after its first CSE pass, so its later CSE, fusion and scheduling
# are free to merge the backward pass's recomputation into the forward pass, or fuse the
# residual stream's cotangent sums across all blocks, which keeps every block's recomputed
# activations alive together. Keeping the barriers to the end, as the accelerator compilers
# do, gives the saving: compile a CPU program with these options (`jax.jit(...,
# compiler_options=...)` or `Lowered.compile(compiler_options=...)`) to train on a CPU with
# remat or to see remat's saving in its memory analysis.
CPU_COMPILER_OPTIONS = {'xla_disable_hlo_passes': 'cse_barrier_expander'}


def compiler_options(model_cfg) -> dict | None:
  """XLA options for a train step of `model_cfg`: `CPU_COMPILER_OPTIONS` where remat is on
  and the backend is the CPU (without them XLA:CPU stores what remat recomputes)."""
  if model_cfg.get('remat', False) and jax.default_backend() == 'cpu':
    return dict(CPU_COMPILER_OPTIONS)
  return None


def policy_name(name: str) -> str:
  """The policy that `model.remat_policy` = `name` selects ('' selects the default)."""
  return name or DEFAULT_POLICY


def validate(model_cfg) -> list[str]:
  """Problems with the rematerialisation fields of `config.model` (none: an empty list).
  Configs saved before the fields existed lack them: no remat."""
  name = model_cfg.get('remat_policy', '')
  if name and name not in POLICIES:
    return [f"model.remat_policy={name!r} is unknown; known: {sorted(POLICIES)} ('' for the "
            f'default, {DEFAULT_POLICY!r}).']
  return []


def remat(target: Any, policy: str = '', static_argnums: tuple[int, ...] = ()):
  """`target` (a Module class, or a function whose first argument is a Module) rematerialised
  with the named saving policy.

  `static_argnums` counts `self` (or the function's Module) as 0, as `nn.remat` does: the
  indices of Python values the block branches on (a `train` flag), which must be passed
  positionally. jax.checkpoint traces every other argument, so a `bool` among them would
  become an abstract value and `if train:` would fail.
  """
  name = policy_name(policy)
  if name not in POLICIES:
    raise ValueError(f"Unknown remat policy {policy!r}; known: {sorted(POLICIES)} ('' for "
                     f'{DEFAULT_POLICY!r}).')
  return nn.remat(target, policy=POLICIES[name], prevent_cse=True,
                  static_argnums=static_argnums)
