"""Weighted k-nearest-neighbour classification of frozen features (Wu et al. 2018, sec. 3.4).

Each test example votes with its k most cosine-similar training examples, each weighted by
exp(similarity / T). Test rows are processed in chunks so that memory grows with
chunk x bank size, never with the square of the dataset.

With a `mesh`, the memory bank is split over all its devices (`parallel.batch_axes`): for each
chunk of queries every device finds the top-k of its own bank shard, the k candidates of all
devices are gathered and merged into the global top-k, and the vote is taken from those.
Per-device memory is then chunk x bank / devices, and the result equals the one-device
computation, which is the same code with `axis_name=None`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ssl_jax import parallel


def l2_normalize(x, eps=1e-12):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def _top_k_then_vote(queries, bank, bank_labels, bank_valid, k, temperature, num_classes,
                     axis_name):
  """Predicted class of each query; `bank` is this device's shard, `bank_valid` marks the
  rows that are real (padding rows can never be selected)."""
  sims = queries @ bank.T                                        # [chunk, shard]
  sims = jnp.where(bank_valid[None, :], sims, -jnp.inf)
  local_k = min(k, bank.shape[0])
  top_sims, top_idx = jax.lax.top_k(sims, local_k)               # [chunk, local_k]
  top_labels = bank_labels[top_idx]
  # Every global top-k neighbour is among the top-k of its own shard, so the union of the
  # shards' candidates holds the global top-k. gather_rows concatenates along axis 0, hence
  # the transposes: candidates become rows.
  cand_sims = parallel.gather_rows(top_sims.T, axis_name).T      # [chunk, devices * local_k]
  cand_labels = parallel.gather_rows(top_labels.T, axis_name).T
  top_sims, pick = jax.lax.top_k(cand_sims, k)
  top_labels = jnp.take_along_axis(cand_labels, pick, axis=1)
  # Subtracting each row's best similarity leaves the argmax unchanged and keeps
  # exp(sim / T) finite for small T (float32 overflows past exp(88)).
  weights = jnp.exp((top_sims - top_sims[:, :1]) / temperature)
  votes = jnp.sum(jax.nn.one_hot(top_labels, num_classes) * weights[..., None], axis=1)
  return jnp.argmax(votes, axis=-1)


@functools.partial(jax.jit, static_argnames=('k', 'num_classes'))
def _knn_chunk(queries, bank, bank_labels, bank_valid, k, temperature, num_classes):
  return _top_k_then_vote(queries, bank, bank_labels, bank_valid, k, temperature,
                          num_classes, axis_name=None)


@functools.partial(jax.jit, static_argnames=('k', 'num_classes', 'mesh'))
def _knn_chunk_sharded(queries, bank, bank_labels, bank_valid, k, temperature, num_classes,
                       mesh):
  axes = parallel.batch_axes(mesh)
  shard = P(axes)

  def vote(*args):
    pred = _top_k_then_vote(*args, k=k, temperature=temperature, num_classes=num_classes,
                            axis_name=axes)
    # Every device holds the same predictions, but shard_map cannot prove that an
    # all_gather's output is replicated, so each returns its copy as one row.
    return pred[None]

  per_device = jax.shard_map(vote, mesh=mesh, in_specs=(P(), shard, shard, shard),
                             out_specs=shard)(queries, bank, bank_labels, bank_valid)
  return per_device[0]


def _shard_rows(x: np.ndarray, mesh: Mesh):
  """`x` (the same on every host) split by rows over the mesh."""
  sharding = NamedSharding(mesh, P(parallel.batch_axes(mesh)))
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def knn_predict(bank_features, bank_labels, test_features, *, k=200, temperature=0.07,
                num_classes=None, chunk_size=256, mesh: Mesh | None = None) -> np.ndarray:
  """Predicted labels for `test_features`; features need not be normalised.

  `mesh`: shard the memory bank over this mesh's devices (see the module docstring); None
  computes on one device.
  """
  num_classes = int(num_classes or (np.max(bank_labels) + 1))
  k = min(k, len(bank_features))
  bank = l2_normalize(np.asarray(bank_features, np.float32))
  labels = np.asarray(bank_labels, np.int32)
  num_devices = 1 if mesh is None else mesh.devices.size
  # Padding makes the bank split evenly; its rows are masked out of every top-k.
  pad = -len(bank) % num_devices
  valid = np.arange(len(bank) + pad) < len(bank)
  bank = np.pad(bank, ((0, pad), (0, 0)))
  labels = np.pad(labels, (0, pad))
  if mesh is None:
    arrays = tuple(jnp.asarray(a) for a in (bank, labels, valid))
    chunk_fn = functools.partial(_knn_chunk, k=k, temperature=temperature,
                                 num_classes=num_classes)
  else:
    arrays = tuple(_shard_rows(a, mesh) for a in (bank, labels, valid))
    chunk_fn = functools.partial(_knn_chunk_sharded, k=k, temperature=temperature,
                                 num_classes=num_classes, mesh=mesh)

  test = l2_normalize(np.asarray(test_features, np.float32))
  predictions = []
  for start in range(0, len(test), chunk_size):
    chunk = test[start:start + chunk_size]
    pad = chunk_size - len(chunk)  # pad the last chunk: one compiled shape for all chunks
    chunk = np.pad(chunk, ((0, pad), (0, 0)))
    pred = chunk_fn(jnp.asarray(chunk), *arrays)
    predictions.append(np.asarray(pred)[:chunk_size - pad])
  return np.concatenate(predictions)


def knn_accuracy(bank_features, bank_labels, test_features, test_labels, **kwargs) -> float:
  pred = knn_predict(bank_features, bank_labels, test_features, **kwargs)
  return float(np.mean(pred == np.asarray(test_labels)))
