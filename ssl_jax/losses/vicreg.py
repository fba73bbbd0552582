"""VICReg's variance-invariance-covariance loss (Bardes et al. 2022, eq. 1-6) over the global
batch.

For the embeddings Z, Z' [N, D] of the two views of a global batch of N images,

    v(Z) = 1/D sum_j max(0, 1 - sqrt(Var(z^j) + eps))                           (eq. 1)
    C(Z) = 1/(N - 1) sum_b (z_b - mean)(z_b - mean)^T                            (eq. 3)
    c(Z) = 1/D sum_{i != j} C(Z)_ij^2                                            (eq. 4)
    s(Z, Z') = 1/N sum_b ||z_b - z'_b||^2                                         (eq. 5)
    l = lambda s(Z, Z') + mu [v(Z) + v(Z')] / 2 + nu [c(Z) + c(Z')]               (eq. 6)

with the unbiased (N - 1) variance, Var(z^j) = C(Z)_jj. Two departures from eq. 6 as printed,
both following the authors' code (facebookresearch/vicreg, main_vicreg.py; lightly's
VICRegLoss does the same), so that its coefficients (lambda = mu = 25, nu = 1) mean what they
mean there:
  * the variance terms of the two views are averaged, not summed: std_loss =
    mean(relu(1 - std_x)) / 2 + mean(relu(1 - std_y)) / 2 (eq. 6 as printed is mu' = 2 mu);
  * the invariance term is the mean squared error over all N x D entries (F.mse_loss, as
    in the paper's pseudo-code), i.e. eq. 5 divided by D.
The covariance terms are summed as printed and as in the code: off_diagonal(cov)^2.sum() / D
per view, cov = zc^T zc / (N - 1).

All of it comes from row sums: per-dimension sums, the D x D product zc^T zc, and the sum of
squared view differences. Under `shard_map` each device reduces its own n rows and the
statistics are psum'd, so the cost per device is n x D^2 and no embedding crosses devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_jax import parallel, precision


def _global_row_count(local_rows: int, axis_name: str | None) -> int:
  # psum of a constant is the static number of devices.
  return local_rows * parallel.psum(1, axis_name)


def covariance(z: jnp.ndarray, axis_name: str | None) -> jnp.ndarray:
  """C(Z) of eq. 3, [D, D], over the global batch with the unbiased (N - 1) denominator."""
  count = _global_row_count(z.shape[0], axis_name)
  mean = parallel.psum(jnp.sum(z, axis=0), axis_name) / count
  centred = z - mean
  # Full float32 precision: default TPU matmul precision would round the covariance to bf16.
  local = precision.matmul(centred.T, centred)
  return parallel.psum(local, axis_name) / (count - 1)


def variance_and_covariance_terms(z: jnp.ndarray, eps: float, axis_name: str | None,
                                  ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """(v(Z), c(Z), mean std) for one view: eq. 1 and eq. 4 on the global batch."""
  cov = covariance(z, axis_name)
  dim = cov.shape[0]
  std = jnp.sqrt(jnp.diagonal(cov) + eps)
  variance = jnp.mean(jax.nn.relu(1.0 - std))
  # Masked rather than sum(C^2) - sum(diag^2), which cancels digits when variances dominate.
  off_diag = jnp.where(jnp.eye(dim, dtype=bool), 0.0, cov)
  covariance_term = jnp.sum(jnp.square(off_diag)) / dim
  return variance, covariance_term, jnp.mean(std)


def vicreg_loss(z1: jnp.ndarray, z2: jnp.ndarray, invariance_weight: float = 25.0,
                variance_weight: float = 25.0, covariance_weight: float = 1.0,
                eps: float = 1e-4, axis_name: str | None = None,
                ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """VICReg's loss (eq. 6) over the global batch.

  Args:
    z1, z2: this device's expander outputs for the two views, [n, D]; row i of both is one
      image.
    invariance_weight, variance_weight, covariance_weight: lambda, mu and nu of eq. 6,
      i.e. the authors' sim_coeff, std_coeff and cov_coeff (mu multiplies the average of the
      two views' variance terms, as std_coeff does there).
    eps: added to the variance under the square root (eq. 1).
    axis_name: mesh axis the global batch is split over; None for one device.

  Returns:
    The loss (identical on every device), and metrics: the three unweighted terms
    (invariance s, variance (v(Z) + v(Z')) / 2, covariance c(Z) + c(Z')) and the mean standard
    deviation of the embedding dimensions over both views.
  """
  n, dim = z1.shape
  z1, z2 = precision.to_float32((z1, z2))
  count = _global_row_count(n, axis_name)
  invariance = parallel.psum(jnp.sum(jnp.square(z1 - z2)), axis_name) / (count * dim)
  v1, c1, std1 = variance_and_covariance_terms(z1, eps, axis_name)
  v2, c2, std2 = variance_and_covariance_terms(z2, eps, axis_name)
  variance = (v1 + v2) / 2  # averaged over the views, as the authors' std_loss
  covariance_term = c1 + c2
  loss = (invariance_weight * invariance + variance_weight * variance +
          covariance_weight * covariance_term)
  metrics = {
      'invariance_term': invariance,
      'variance_term': variance,
      'covariance_term': covariance_term,
      'embedding_std': (std1 + std2) / 2,
  }
  return loss, jax.lax.stop_gradient(metrics)
