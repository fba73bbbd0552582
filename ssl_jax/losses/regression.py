"""Negative-free regression losses: a prediction regresses the (stop-gradient) projection of
the other view of the same image (BYOL, Grill et al. 2020; SimSiam, Chen & He 2021).

Each row's loss involves only its own two vectors, so under `shard_map` every device computes
its local rows and one `psum` averages over the global batch; no columns need gathering. The
target side is always wrapped in `stop_gradient`, which is what keeps these losses from
collapsing to a constant (SimSiam, Sec. 4.1); `stop_gradient=False` exists for that ablation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_jax import parallel, precision
from ssl_jax.losses.info_nce import l2_normalize


def _global_mean(per_row: jnp.ndarray, axis_name: str | None) -> jnp.ndarray:
  num_rows = parallel.psum(per_row.shape[0], axis_name)
  return parallel.psum(jnp.sum(per_row), axis_name) / num_rows


def _cosine(p: jnp.ndarray, z: jnp.ndarray, stop_gradient: bool) -> jnp.ndarray:
  p, z = precision.to_float32((p, z))
  if stop_gradient:
    z = jax.lax.stop_gradient(z)
  return jnp.sum(l2_normalize(p) * l2_normalize(z), axis=-1)


def normalized_regression(p: jnp.ndarray, z: jnp.ndarray, axis_name: str | None = None
                          ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """BYOL's loss, Grill et al. 2020, eq. 2: || p/||p|| - z/||z|| ||^2 = 2 - 2 cos(p, z).

  Args:
    p: this device's online predictions q_theta(z_theta) of one view, [n, d].
    z: this device's target projections z'_xi of the other view, [n, d]; no gradient.
    axis_name: mesh axis the global batch is spread over; None for one device.

  Returns:
    The loss averaged over the global batch (identical on every device) and its mean cosine.
  """
  cos = _cosine(p, z, stop_gradient=True)
  mean_cos = _global_mean(cos, axis_name)
  return 2.0 - 2.0 * mean_cos, {'cosine': jax.lax.stop_gradient(mean_cos)}


def negative_cosine(p: jnp.ndarray, z: jnp.ndarray, axis_name: str | None = None,
                    stop_gradient: bool = True) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """SimSiam's D(p, stopgrad(z)) = -cos(p, z), Chen & He 2021, eqs. 1 and 3, averaged over
  the global batch. `stop_gradient=False` is the paper's collapsing ablation (Fig. 2)."""
  mean_cos = _global_mean(_cosine(p, z, stop_gradient), axis_name)
  return -mean_cos, {'cosine': jax.lax.stop_gradient(mean_cos)}


def embedding_spread(z: jnp.ndarray, axis_name: str | None = None) -> jnp.ndarray:
  """Collapse monitor (SimSiam, Fig. 2 middle): the per-dimension standard deviation of the
  l2-normalised embeddings over the global batch, averaged over dimensions, times sqrt(d).

  About 1 for embeddings spread over the sphere, 0 for a collapsed (constant) output.
  """
  zn = l2_normalize(jax.lax.stop_gradient(z))
  num_rows = parallel.psum(zn.shape[0], axis_name)
  mean = parallel.psum(jnp.sum(zn, axis=0), axis_name) / num_rows
  # Two passes rather than E[x^2] - E[x]^2, which cancels badly as the spread goes to 0.
  var = parallel.psum(jnp.sum((zn - mean) ** 2, axis=0), axis_name) / num_rows
  return jnp.mean(jnp.sqrt(var)) * jnp.sqrt(float(z.shape[-1]))
