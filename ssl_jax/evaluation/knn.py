"""Weighted k-nearest-neighbour classification of frozen features (Wu et al. 2018).

Each test example votes with its k most cosine-similar training examples, each weighted by
exp(similarity / T). Test rows are processed in chunks so that memory grows with
chunk x bank size, never with the square of the dataset.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def l2_normalize(x, eps=1e-12):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


@functools.partial(jax.jit, static_argnames=('k', 'num_classes'))
def _knn_chunk(test, bank, bank_labels, k, temperature, num_classes):
  sims = test @ bank.T                                   # [chunk, bank]
  top_sims, top_idx = jax.lax.top_k(sims, k)
  weights = jnp.exp(top_sims / temperature)
  votes = jax.nn.one_hot(bank_labels[top_idx], num_classes) * weights[..., None]
  return jnp.argmax(votes.sum(axis=1), axis=-1)


def knn_predict(bank_features, bank_labels, test_features, *, k=200, temperature=0.07,
                num_classes=None, chunk_size=256) -> np.ndarray:
  """Predicted labels for `test_features`; features need not be normalised."""
  num_classes = int(num_classes or (np.max(bank_labels) + 1))
  k = min(k, len(bank_features))
  bank = jnp.asarray(l2_normalize(np.asarray(bank_features, np.float32)))
  labels = jnp.asarray(bank_labels, jnp.int32)
  test = l2_normalize(np.asarray(test_features, np.float32))
  predictions = []
  for start in range(0, len(test), chunk_size):
    chunk = test[start:start + chunk_size]
    pad = chunk_size - len(chunk)  # pad the last chunk: one compiled shape for all chunks
    chunk = np.pad(chunk, ((0, pad), (0, 0)))
    pred = _knn_chunk(jnp.asarray(chunk), bank, labels, k, temperature, num_classes)
    predictions.append(np.asarray(pred)[:chunk_size - pad])
  return np.concatenate(predictions)


def knn_accuracy(bank_features, bank_labels, test_features, test_labels, **kwargs) -> float:
  pred = knn_predict(bank_features, bank_labels, test_features, **kwargs)
  return float(np.mean(pred == np.asarray(test_labels)))
