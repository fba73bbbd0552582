"""Representation diagnostics: is the embedding informative, or collapsing?

All functions take a batch of embeddings [N, D] (and positive pairs where needed) and return
scalars or spectra; they are pure jnp, so they run jitted on device or on host arrays. They are
jitted here already: called eagerly, each jnp operation would otherwise compile on its own.

- alignment and uniformity: Wang & Isola 2020, "Understanding Contrastive Representation
  Learning through Alignment and Uniformity on the Hypersphere", sec. 4.1.
- effective rank: RankMe, Garrido et al. 2023, "RankMe: Assessing the Downstream Performance
  of Pretrained Self-Supervised Representations by Their Rank", eq. 1.
- covariance spectrum: Jing et al. 2022, "Understanding Dimensional Collapse in Contrastive
  Self-supervised Learning", fig. 2 (dimensional collapse shows as eigenvalues falling off).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax.losses.info_nce import l2_normalize


def normalized_std(embeddings: jnp.ndarray) -> jnp.ndarray:
  """Mean over dimensions of the per-dimension standard deviation of the l2-normalised
  embeddings. A collapsed encoder gives 0; a healthy one about 1/sqrt(D) (uniform on the
  sphere), so the ratio to 1/sqrt(D) is the fraction of a healthy spread."""
  z = l2_normalize(jnp.asarray(embeddings, jnp.float32))
  return jnp.mean(jnp.std(z, axis=0))


@jax.jit
def alignment(z1: jnp.ndarray, z2: jnp.ndarray, alpha: float = 2.0) -> jnp.ndarray:
  """E ||f(x) - f(y)||_2^alpha over the positive pairs (rows of z1, z2) of l2-normalised
  embeddings (Wang & Isola 2020, eq. 4). 0 when the two views map to the same point, 4 at
  most (antipodal views, alpha = 2)."""
  z1 = l2_normalize(jnp.asarray(z1, jnp.float32))
  z2 = l2_normalize(jnp.asarray(z2, jnp.float32))
  # The power of the squared distance, not of the norm: the norm's gradient is NaN at 0,
  # which identical views would hit.
  squared = jnp.sum((z1 - z2) ** 2, axis=-1)
  return jnp.mean(squared ** (alpha / 2))


@jax.jit
def uniformity(z: jnp.ndarray, t: float = 2.0) -> jnp.ndarray:
  """log E_{i<j} exp(-t ||f(x_i) - f(x_j)||_2^2) over the distinct pairs of l2-normalised
  embeddings (Wang & Isola 2020, eq. 5). 0 for a collapsed set (every distance 0), more
  negative the more evenly the points cover the sphere (about -4 for t = 2 in high D).
  Memory is N x N."""
  z = l2_normalize(jnp.asarray(z, jnp.float32))
  n = z.shape[0]
  # ||a - b||^2 = 2 - 2 a.b for unit vectors; rounding can make it slightly negative.
  squared = jnp.maximum(2.0 - 2.0 * (z @ z.T), 0.0)
  # The matrix is symmetric, so the mean over i != j equals the mean over i < j.
  off_diagonal = 1.0 - jnp.eye(n, dtype=z.dtype)
  # logsumexp keeps the log of a mean of tiny exponentials finite (large t, spread points).
  return (jax.scipy.special.logsumexp(-t * squared, b=off_diagonal) -
          jnp.log(n * (n - 1.0)))


@jax.jit
def singular_values(z: jnp.ndarray) -> jnp.ndarray:
  """Descending singular values of the embedding matrix as it is: neither centred nor
  normalised, as RankMe uses it."""
  return jnp.linalg.svd(jnp.asarray(z, jnp.float32), compute_uv=False)


@jax.jit
def covariance_eigenvalues(z: jnp.ndarray) -> jnp.ndarray:
  """Descending eigenvalues of the covariance (1/N, matching `normalized_std`) of the
  l2-normalised embeddings: the spectrum whose tail drops to 0 under dimensional collapse
  (Jing et al. 2022). They sum to the trace, 1 - ||mean||^2."""
  z = l2_normalize(jnp.asarray(z, jnp.float32))
  centred = z - jnp.mean(z, axis=0)
  covariance = centred.T @ centred / z.shape[0]
  # The covariance is positive semi-definite; eigvalsh's rounding can dip below 0.
  return jnp.maximum(jnp.linalg.eigvalsh(covariance)[::-1], 0.0)


@jax.jit
def effective_rank(z: jnp.ndarray, eps: float = 1e-7) -> jnp.ndarray:
  """RankMe (Garrido et al. 2023, eq. 1): exp(-sum_k p_k log p_k) with
  p_k = sigma_k / ||sigma||_1 + eps over the singular values sigma of z. Between 1 (a single
  direction) and min(N, D) (equal energy in every direction)."""
  sigma = singular_values(z)
  # A zero matrix has ||sigma||_1 = 0: the guard gives p_k = eps and a rank of about 1.
  p = sigma / jnp.maximum(jnp.sum(sigma), jnp.finfo(sigma.dtype).tiny) + eps
  return jnp.exp(-jnp.sum(p * jnp.log(p)))


@jax.jit
def diagnostics_arrays(z1: jnp.ndarray, z2: jnp.ndarray) -> dict:
  """`representation_diagnostics` as device arrays, jitted, for use inside a step."""
  dim = z1.shape[1]
  rank = effective_rank(z1)
  std = normalized_std(z1)
  return {
      'alignment': alignment(z1, z2),
      'uniformity': uniformity(z1),
      'effective_rank': rank,
      'effective_rank_fraction': rank / dim,
      'normalized_std': std,
      'std_fraction': std * math.sqrt(dim),
      'spectrum': covariance_eigenvalues(z1),
  }


def representation_diagnostics(z1, z2) -> dict:
  """Alignment of the pairs (z1[i], z2[i]) and, on z1 alone, uniformity, RankMe effective
  rank (and as a fraction of D), normalized_std and std_fraction = normalized_std * sqrt(D)
  (about 1 when healthy, 0 when collapsed), as Python floats; 'spectrum' is the numpy
  array of covariance eigenvalues of z1, descending. The rank is at most min(N, D): use at
  least D rows, or the fraction cannot approach 1."""
  values = jax.device_get(diagnostics_arrays(jnp.asarray(z1), jnp.asarray(z2)))
  return {k: (np.asarray(v) if k == 'spectrum' else float(v)) for k, v in values.items()}


def collapse_warnings(diagnostics: dict, min_rank_fraction: float,
                      min_std_fraction: float) -> list[str]:
  """One message per violated threshold of `representation_diagnostics` output (a value that
  is NaN or infinite violates its threshold): empty when the embedding looks healthy."""
  messages = []
  rank = float(diagnostics['effective_rank_fraction'])
  if not rank >= min_rank_fraction:
    messages.append(
        f'effective_rank_fraction = {rank:.3g} is below {min_rank_fraction:.3g}: the '
        f'embeddings (RankMe rank {float(diagnostics["effective_rank"]):.3g}) use few of '
        'their dimensions (dimensional collapse). Try stronger augmentation, a larger '
        'projector or batch, a higher temperature, or a variance/decorrelation term.')
  std = float(diagnostics['std_fraction'])
  if not std >= min_std_fraction:
    messages.append(
        f'std_fraction = {std:.3g} is below {min_std_fraction:.3g}: the normalised embeddings '
        'barely vary across examples (1 is a uniform spread, 0 a single point: complete '
        'collapse). Try a lower learning rate, a predictor or momentum target for '
        'non-contrastive methods, more negatives, or a variance term.')
  return messages
