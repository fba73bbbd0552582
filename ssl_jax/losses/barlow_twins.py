"""Barlow Twins' redundancy-reduction loss (Zbontar et al. 2021, eq. 1-2) over the global batch.

Each view's embedding is standardised along the batch, the cross-correlation matrix C of the
two standardised views is formed over the global batch of N images, and

    L = sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2.                          (eq. 1)

Everything the loss needs is a sufficient statistic that sums over rows: per-dimension sums
(for the mean and variance) and the D x D product z1n^T z2n. Under `shard_map` each device
reduces its own n rows and the statistics are psum'd, so the cost per device is n x D^2 and
no embedding ever crosses devices; the result equals the single-device computation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_jax import parallel, precision


def global_row_count(local_rows: int, axis_name: str | None) -> int:
  """N, the number of rows over all devices: a Python int, as psum of a constant is the
  (static) number of devices."""
  return local_rows * parallel.psum(1, axis_name)


def standardize(z: jnp.ndarray, axis_name: str | None, eps: float = 1e-5) -> jnp.ndarray:
  """(z - mean) / sqrt(var + eps) per dimension, with the mean and the *biased* (1 / N)
  variance of the global batch.

  This is what the reference code's affine-free, synchronised `BatchNorm1d` does in training
  mode (biased variance, eps 1e-5). With the biased variance, C in eq. 2 is exactly the
  Pearson correlation (up to eps): C_ii = 1 for identical views.
  """
  count = global_row_count(z.shape[0], axis_name)
  mean = parallel.psum(jnp.sum(z, axis=0), axis_name) / count
  centred = z - mean
  # Two passes (centre, then square) rather than E[z^2] - E[z]^2: no cancellation when the
  # mean is large next to the spread, for one more psum of D numbers.
  var = parallel.psum(jnp.sum(centred * centred, axis=0), axis_name) / count
  return centred * jax.lax.rsqrt(var + eps)


def cross_correlation(z1: jnp.ndarray, z2: jnp.ndarray, axis_name: str | None,
                      eps: float = 1e-5) -> jnp.ndarray:
  """C of eq. 2, [D, D]: the two views standardised over the global batch, z1n^T z2n / N.

  Each device contributes the product of its own rows; the psum makes C identical on every
  device.
  """
  count = global_row_count(z1.shape[0], axis_name)
  z1n = standardize(z1, axis_name, eps)
  z2n = standardize(z2, axis_name, eps)
  # Full float32 precision: default TPU matmul precision (one bf16 pass) would put ~1e-2
  # relative error on correlations the loss pushes to 1 and 0.
  local = precision.matmul(z1n.T, z2n)
  return parallel.psum(local, axis_name) / count


def barlow_twins_loss(z1: jnp.ndarray, z2: jnp.ndarray, redundancy_weight: float,
                      axis_name: str | None = None, eps: float = 1e-5,
                      ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """Barlow Twins' loss (eq. 1) over the global batch.

  Args:
    z1, z2: this device's projector outputs for the two views, [n, D]; row i of both is one
      image.
    redundancy_weight: lambda, the weight of the off-diagonal (redundancy-reduction) term.
    axis_name: mesh axis the global batch is split over; None for one device.
    eps: added to the variance before standardising.

  Returns:
    The loss (identical on every device), and metrics: the invariance term
    sum_i (1 - C_ii)^2, the unweighted redundancy term sum_{i != j} C_ij^2, the mean
    diagonal correlation and the root-mean-square off-diagonal correlation.
  """
  z1, z2 = precision.to_float32((z1, z2))
  c = cross_correlation(z1, z2, axis_name, eps)
  dim = c.shape[0]
  diag = jnp.diagonal(c)
  # Masking the diagonal out, rather than subtracting sum(diag^2) from sum(C^2): at D = 8192
  # that difference would cancel away float32 digits of the small off-diagonal sum.
  off_diag = jnp.where(jnp.eye(dim, dtype=bool), 0.0, c)
  invariance = jnp.sum(jnp.square(1.0 - diag))
  redundancy = jnp.sum(jnp.square(off_diag))
  loss = invariance + redundancy_weight * redundancy
  metrics = {
      'invariance_term': invariance,
      'redundancy_term': redundancy,
      'mean_diag_correlation': jnp.mean(diag),
      'rms_off_diag_correlation': jnp.sqrt(redundancy / max(dim * (dim - 1), 1)),
  }
  return loss, jax.lax.stop_gradient(metrics)
