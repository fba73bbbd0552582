"""The cached-embedding gradient: the exact gradient of a method's whole-batch loss with one
micro-batch's activations in memory at a time (Gao et al. 2021, "Scaling Deep Contrastive
Learning Batch Size under Memory Limited Setup").

A contrastive loss couples the examples of the global batch (every other image is a
negative, statistics are taken over the batch), so plain gradient accumulation
(`optax.MultiSteps`) would give each micro-batch only its own negatives: a different, weaker
objective. With `config.microbatches` = K the step instead, on each device's rows:
  1. runs the networks (`Method.forward`, `Method.target_forward`) on K micro-batches of the
     rows in turn (`sequential`), keeping only their per-example outputs;
  2. evaluates the method's objective once, on the whole global batch from those outputs
     (gathering across devices as with K = 1), and its gradient with respect to them;
  3. runs each micro-batch's online forward again under `jax.vjp`, pulling that gradient
     back to the parameters, and sums over micro-batches.
Steps 1-2 are the forward of a `jax.custom_vjp`, step 3 its backward, so the train step
differentiates it as it differentiates `Method.loss`. The cost is one more forward pass of
the online network; the memory is one micro-batch's activations plus the outputs of all.

What K changes: BatchNorm normalises each micro-batch with its own statistics (over the same
micro-batch of every device): a "ghost batch" of B / K examples. The running averages take
the mean of the K micro-batches' updates, whose mean statistic is the whole batch's. Without
BatchNorm (a ViT) the result is K = 1's up to float rounding. Views are augmented before the
split and drop-path masks follow each example's global index (`first_row`), so the
micro-batches see what the whole batch would. Method state (queues, centres, prototypes) is
updated once, by the objective, from the whole batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax import parallel, sharding


def split_rows(x, num_microbatches: int):
  """[rows, ...] -> [K, rows / K, ...]: micro-batch i is rows i * rows / K, ... ."""
  return x.reshape((num_microbatches, x.shape[0] // num_microbatches) + x.shape[1:])


def merge_rows(x):
  """The inverse of `split_rows`: [K, m, ...] -> [K * m, ...]."""
  return x.reshape((-1,) + x.shape[2:])


def unrolled() -> bool:
  """Whether `sequential` unrolls its loop: on the CPU. XLA:CPU rewrites convolutions into the
  layout of its fast kernels only in a program's top level, so inside a loop (a scan is a
  while loop) they fall back to naive code, 20-40 times slower (benchmarks/
  large_batch_results.md has the measurement); accelerator compilers have no such limit, and
  a rolled loop compiles once whatever K."""
  return jax.default_backend() == 'cpu'


def sequential(body, carry, xs):
  """`jax.lax.scan(body, carry, xs)`, one iteration after the other with only one iteration's
  intermediates alive at a time. Unrolled (`unrolled`), each iteration's inputs first pass
  through an optimization barrier together with the previous iteration's results: the
  compiler can then neither start an iteration early (holding its activations while waiting)
  nor merge a recomputed forward pass with an earlier identical one (common-subexpression
  elimination would keep that one's activations alive instead)."""
  if not unrolled():
    return jax.lax.scan(body, carry, xs)
  ys = []
  for i in range(jax.tree.leaves(xs)[0].shape[0]):
    x = jax.tree.map(lambda a: a[i], xs)  # pylint: disable=cell-var-from-loop
    x, carry, _ = jax.lax.optimization_barrier((x, carry, ys[-1] if ys else None))
    carry, y = body(carry, x)
    ys.append(y)
  return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def map_rows(fn, x, num_microbatches: int):
  """fn(x) computed on K micro-batches of x's rows one after the other (only one micro-batch's
  intermediates alive at a time), the per-row results concatenated as fn(x) would give them."""
  if num_microbatches == 1:
    return fn(x)
  _, out = sequential(lambda carry, chunk: (carry, fn(chunk)), (),
                      jax.tree.map(lambda a: split_rows(a, num_microbatches), x))
  return jax.tree.map(merge_rows, out)


def _mean_over_microbatches(tree):
  return jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)


def _zero_cotangent(x):
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(np.shape(x), jax.dtypes.float0)  # integers and PRNG keys


def _varying(tree, axis_name):
  """`tree` typed as varying over every batch axis: each device's cotangent is then its own
  rows' contribution, and autodiff sums them over devices once (pcast's transpose) instead of
  once per micro-batch (as `jax.vjp` of a replicated input would)."""
  if axis_name is None:
    return tree
  axes = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)

  def cast(x):
    missing = tuple(a for a in axes if a not in sharding.varying_axes(x))
    return jax.lax.pcast(x, missing, to='varying') if missing else x
  return jax.tree.map(cast, tree)


def check_rows(rows: int, num_microbatches: int):
  if rows % num_microbatches:
    raise ValueError(f'A device holds {rows} rows of each view, which microbatches='
                     f'{num_microbatches} does not divide: make batch_size / devices a multiple '
                     'of microbatches.')


def cached_loss(method, num_microbatches: int):
  """A function with `method.loss`'s signature and value whose gradient with respect to
  `params` is computed by the cached-embedding scheme over `num_microbatches` micro-batches
  of each device's rows (the module docstring). The method must split its loss
  (`Method.splits_its_loss`)."""
  k = num_microbatches

  def microbatches(inputs, axis_name):
    """Each view's rows as [K, m, ...] and the global index of each micro-batch's first row."""
    views = inputs['views']
    rows = views[0].shape[0]
    check_rows(rows, k)
    first_row = parallel.global_row_offset(rows, axis_name) + (rows // k) * jnp.arange(k)
    return [split_rows(v, k) for v in views], first_row

  def online(params, inputs, views, first_row, axis_name):
    return method.forward(params, inputs['batch_stats'], list(views), inputs['rng'], axis_name,
                          first_row)

  def forward(axis_name, network_params, params, inputs):
    chunks, first_rows = microbatches(inputs, axis_name)

    def embed(carry, chunk):
      views, first_row = chunk
      outputs, stats = online(network_params, inputs, views, first_row, axis_name)
      targets, target_stats = method.target_forward(
          inputs['target_params'], inputs['batch_stats'], inputs['method_state'], list(views),
          inputs['rng'], axis_name, first_row)
      return carry, (outputs, stats, targets, target_stats)

    _, (outputs, stats, targets, target_stats) = sequential(embed, (), (chunks, first_rows))
    outputs, targets = jax.tree.map(merge_rows, (outputs, targets))
    target_stats = _mean_over_microbatches(target_stats)

    def objective(outputs, params):
      return method.objective(params, inputs['method_state'], outputs,
                              jax.lax.stop_gradient(targets), target_stats, inputs['rng'],
                              inputs['step'], axis_name)

    (loss, (metrics, new_state)), (grad_outputs, grad_params) = jax.value_and_grad(
        objective, argnums=(0, 1), has_aux=True)(outputs, params)
    result = loss, (metrics, _mean_over_microbatches(stats), new_state)
    return result, (network_params, inputs, grad_outputs, grad_params)

  def backward(axis_name, residuals, cotangents):
    network_params, inputs, grad_outputs, grad_params = residuals
    chunks, first_rows = microbatches(inputs, axis_name)
    grad_chunks = jax.tree.map(lambda g: split_rows(g, k), grad_outputs)

    def pull_back(total, chunk):
      views, first_row, grad = chunk
      _, vjp, _ = jax.vjp(lambda p: online(p, inputs, views, first_row, axis_name),
                          network_params, has_aux=True)
      return jax.tree.map(jnp.add, total, vjp(grad)[0]), None

    zeros = jax.tree.map(jnp.zeros_like, network_params)
    # Each micro-batch's views pass the barrier with its output gradients: its forward pass
    # cannot start before the objective's gradient exists.
    total, _ = sequential(pull_back, zeros, (chunks, first_rows, grad_chunks))
    scale = lambda tree: jax.tree.map(lambda g: cotangents[0] * g, tree)  # noqa: E731
    return scale(total), scale(grad_params), jax.tree.map(_zero_cotangent, inputs)

  # The mesh axis name is static; everything else goes in as arguments, since a custom_vjp
  # may not close over traced values. The parameters go in twice: typed varying for the
  # networks, whose cotangents are each device's own rows' contribution (summed over devices
  # once, by pcast's transpose), and as they are for the objective, whose value is the same
  # on every device and whose gradient is the whole batch's already.
  loss_of = jax.custom_vjp(lambda axis_name, *args: forward(axis_name, *args)[0],
                           nondiff_argnums=(0,))
  loss_of.defvjp(forward, backward)

  def loss(params, batch_stats, target_params, method_state, views, rng, step, axis_name):
    inputs = dict(batch_stats=batch_stats, target_params=target_params,
                  method_state=method_state, views=list(views), rng=rng, step=step)
    return loss_of(axis_name, _varying(params, axis_name), params, inputs)

  return loss
