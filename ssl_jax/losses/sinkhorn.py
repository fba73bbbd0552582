"""SwAV's online clustering (Caron et al. 2020, Sec. 3.1): codes by Sinkhorn-Knopp, and the
swapped-prediction loss that trains every crop to predict them.

`sinkhorn_knopp` computes the codes Q of eq. 3 for a batch of prototype scores C^T Z: the
entropy-regularised transport plan Q = Diag(u) exp(C^T Z / epsilon) Diag(v) whose marginals
are uniform over the K prototypes (each takes 1/K of the mass) and over the B samples (1/B
each), approximated by a few alternating normalisations (Cuturi 2013). Only the per-prototype
sums span the batch; under `shard_map` they are psum'd, so each device computes the codes of
its own rows exactly as one device holding the whole global batch would.

`swapped_prediction` is eq. 1-2 with multi-crop (Sec. 3.2): each crop's softmax over
prototype scores predicts the codes of every other crop the codes were computed for.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_jax import parallel, precision


def sinkhorn_knopp(scores: jnp.ndarray, epsilon: float = 0.05, num_iters: int = 3,
                   axis_name: str | None = None, extra_scores: jnp.ndarray | None = None,
                   use_extra: bool | jnp.ndarray = True) -> jnp.ndarray:
  """Soft codes for this device's rows of `scores` (Caron et al. 2020, eq. 3 and App. A.1).

  The iteration is the reference implementation's `distributed_sinkhorn`: normalise the
  whole matrix to sum 1, then `num_iters` times make every prototype's total 1/K and every
  sample's total 1/B; the returned codes are the last plan times B, so each row sums to 1.

  Args:
    scores: [n, K] this device's scores z_b . c_k (cosines: embeddings and prototypes are
      unit vectors); the global batch is the rows of all devices.
    epsilon: entropy regularisation; smaller gives sharper codes.
    num_iters: normalisation rounds (the paper: 3).
    axis_name: mesh axis the batch is split over; None for one device.
    extra_scores: [L, K] rows held identically by every device (SwAV's queue of past
      embeddings). They join the transport problem once, not once per device, and their
      codes are not returned.
    use_extra: a (traced) bool; when False the extra rows are left out, as if absent.

  Returns:
    [n, K] codes, each row a distribution over prototypes; no gradient flows through them.
  """
  scores = jax.lax.stop_gradient(precision.to_float32(scores))
  num_prototypes = scores.shape[1]
  blocks = [scores]
  if extra_scores is not None:
    blocks.append(jax.lax.stop_gradient(precision.to_float32(extra_scores)))
  # exp(s / eps) overflows float32 once s / eps > 88. Subtracting the global maximum
  # changes the matrix by one scalar factor, which the first normalisation removes exactly.
  local_max = jnp.max(jnp.stack([jnp.max(b) for b in blocks]))
  shift = jnp.max(parallel.gather_rows(local_max[None], axis_name))
  q = jnp.exp((scores - shift) / epsilon)
  num_samples = parallel.psum(jnp.float32(scores.shape[0]), axis_name)
  if extra_scores is None:
    q_extra = None
  else:
    weight = jnp.asarray(use_extra, jnp.float32)
    q_extra = weight * jnp.exp((blocks[1] - shift) / epsilon)
    num_samples = num_samples + weight * extra_scores.shape[0]

  def batch_sum(local, extra, axis):
    # Sums over samples span every device's rows, plus the replicated rows counted once.
    total = parallel.psum(jnp.sum(local, axis=axis), axis_name)
    return total if extra is None else total + jnp.sum(extra, axis=axis)

  def normalise_samples(x):
    # Rows of zeros (dropped extra rows) stay zero instead of becoming 0 / 0.
    sums = jnp.sum(x, axis=1, keepdims=True)
    return x / jnp.where(sums > 0, sums, 1.0) / num_samples

  total = batch_sum(q, q_extra, None)
  q = q / total
  q_extra = None if q_extra is None else q_extra / total
  for _ in range(num_iters):
    per_prototype = batch_sum(q, q_extra, 0)                       # [K]
    q = q / per_prototype / num_prototypes
    q = normalise_samples(q)
    if q_extra is not None:
      q_extra = normalise_samples(q_extra / per_prototype / num_prototypes)
  return jax.lax.stop_gradient(q * num_samples)


def swapped_prediction(scores: list[jnp.ndarray], codes: list[jnp.ndarray], temperature: float,
                       axis_name: str | None = None
                       ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """SwAV's multi-crop swapped-prediction loss (Caron et al. 2020, eq. 1-2 and Sec. 3.2).

  Crop i's codes q_i are predicted by every other crop v through
  p_v = softmax(z_v . C / temperature), with the cross-entropy
  l(z_v, q_i) = -sum_k q_i[k] log p_v[k]. The loss is

      1 / |codes| sum_i 1 / (V - 1) sum_{v != i} mean_b l(z_v, q_i),

  the reference implementation's normalisation, the mean running over the global batch.

  Args:
    scores: V arrays [n, K], this device's prototype scores of each crop; the crops with
      codes come first, in the order of `codes`.
    codes: the codes of the first len(codes) crops, [n, K] each (no gradient).
    temperature: softmax temperature tau (the paper: 0.1).
    axis_name: mesh axis the batch is split over; None for one device.

  Returns:
    The global-batch loss (identical on every device) and metrics: `swav_accuracy`, how often
    a crop's most likely prototype is the most likely code of the crop it predicts, and
    `code_max`, the mean largest code probability (1 for hard assignments, 1/K for uniform).
  """
  num_crops = len(scores)
  n = scores[0].shape[0]
  scores, codes = precision.to_float32((scores, codes))
  num_rows = parallel.psum(jnp.float32(n), axis_name)
  log_p = [jax.nn.log_softmax(s / temperature, axis=-1) for s in scores]
  total = 0.0
  correct = 0.0
  for i, q in enumerate(codes):
    per_crop = 0.0
    target = jnp.argmax(q, axis=-1)
    for v in range(num_crops):
      if v == i:
        continue
      per_crop += jnp.sum(-q * log_p[v])
      correct += jnp.sum(jnp.argmax(log_p[v], axis=-1) == target)
    total += per_crop / (num_crops - 1)
  num_pairs = len(codes) * (num_crops - 1)
  loss = parallel.psum(total, axis_name) / (len(codes) * num_rows)
  code_max = sum(jnp.sum(jnp.max(q, axis=-1)) for q in codes)
  metrics = {
      'swav_accuracy': parallel.psum(correct, axis_name) / (num_pairs * num_rows),
      'code_max': parallel.psum(code_max, axis_name) / (len(codes) * num_rows),
  }
  return loss, jax.lax.stop_gradient(metrics)
