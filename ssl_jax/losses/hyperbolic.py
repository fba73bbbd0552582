"""Hyperbolic contrastive loss (Ermolov et al. 2022, "Hyperbolic Vision Transformers:
Combining Improvements in Metric Learning"): NT-Xent whose similarity is the negative
geodesic distance of the Poincaré ball, over the global batch gathered across devices.

The Poincaré ball of curvature -c is {x : c ||x||^2 < 1}, of radius 1/sqrt(c). Embeddings
reach it in three steps (their `hyptorch.nn.ToPoincare`, riemannian=False):
  1. feature clipping (Guo et al. 2022, "Clipped Hyperbolic Classifiers Are
     Super-Hyperbolic Classifiers"):
     x <- x min(1, r / ||x||), which bounds how close to the edge a point can get, so the
     vanishing gradients of points near the boundary cannot occur;
  2. the exponential map at the origin (Ganea et al. 2018, "Hyperbolic Neural Networks"):
     exp_0(v) = tanh(sqrt(c) ||v||) v / (sqrt(c) ||v||);
  3. a projection onto the ball of radius (1 - eps) / sqrt(c) (Ganea et al. 2018):
     tanh rounds to 1 in float32 for arguments above ~9, which would put points on the edge.
The distance (Ganea et al. 2018) is
  d_c(x, y) = 2 / sqrt(c) artanh(sqrt(c) ||(-x) (+)_c y||),
with Möbius addition (Ganea et al. 2018)
  x (+)_c y = ((1 + 2c<x,y> + c||y||^2) x + (1 - c||x||^2) y)
              / (1 + 2c<x,y> + c^2 ||x||^2 ||y||^2).

The constants follow hyptorch/pmath.py of the authors' code (github:htdt/hyp_metric): the
projection's eps 1e-3, the artanh argument clamped to 1 - 1e-5, 1e-5 added to the Möbius
denominator, norms clamped below at 1e-5, and 1e-5 added to the norm in the clipping factor.

Every function casts its inputs to float32 (`precision`): near the edge 1 - c||x||^2 is a
difference of nearly equal numbers, which bfloat16 would round to 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_jax import parallel, precision
from ssl_jax.losses import info_nce

# hyptorch/pmath.py: `_project`'s maxnorm (1 - 1e-3) / sqrt(c), `Artanh`'s clamp 1 - 1e-5,
# `_mobius_add`'s denominator + 1e-5, `_expmap0`'s and `_project`'s norm clamp 1e-5;
# hyptorch/nn.py `ToPoincare`: the clipping factor's norm + 1e-5.
BALL_EPS = 1e-3
ARTANH_LIMIT = 1.0 - 1e-5
MOBIUS_DENOM_EPS = 1e-5
MIN_NORM = 1e-5
# The masked-out logit of a query with itself: large but finite, as in info_nce.py.
_MASK_VALUE = -1e9
# The smallest norm `_norm` takes a square root of: its square 1e-30 is a normal float32.
_SQRT_FLOOR = 1e-15


def _norm(x: jnp.ndarray, min_norm: float = 0.0) -> jnp.ndarray:
  """||x|| along the last axis (keepdims), at least `min_norm`, with a finite gradient at
  x = 0: the square root of the clamped square (the gradient of sqrt at 0 is infinite, and
  0 x inf is NaN even where the result is clamped or masked afterwards)."""
  return _sqrt(jnp.sum(x * x, axis=-1, keepdims=True), min_norm)


def _sqrt(sq: jnp.ndarray, min_root: float = 0.0) -> jnp.ndarray:
  """sqrt(max(sq, min_root^2)), at least _SQRT_FLOOR: finite gradient at sq = 0."""
  return jnp.sqrt(jnp.maximum(sq, max(min_root, _SQRT_FLOOR) ** 2))


def artanh(x: jnp.ndarray) -> jnp.ndarray:
  """artanh with its argument clamped to [-ARTANH_LIMIT, ARTANH_LIMIT]: finite at the ball's
  edge (artanh(1) = inf), its derivative there at most 1 / (1 - ARTANH_LIMIT^2) ~ 5e4."""
  return jnp.arctanh(jnp.clip(x, -ARTANH_LIMIT, ARTANH_LIMIT))


def mobius_add(x: jnp.ndarray, y: jnp.ndarray, c: float) -> jnp.ndarray:
  """x (+)_c y, Ganea et al. 2018, broadcasting over the leading axes."""
  x, y = precision.to_float32((x, y))
  x2 = jnp.sum(x * x, axis=-1, keepdims=True)
  y2 = jnp.sum(y * y, axis=-1, keepdims=True)
  xy = jnp.sum(x * y, axis=-1, keepdims=True)
  num = (1 + 2 * c * xy + c * y2) * x + (1 - c * x2) * y
  denom = 1 + 2 * c * xy + c ** 2 * x2 * y2
  return num / (denom + MOBIUS_DENOM_EPS)


def expmap0(v: jnp.ndarray, c: float) -> jnp.ndarray:
  """exp_0(v) = tanh(sqrt(c) ||v||) v / (sqrt(c) ||v||): the tangent space at the origin
  onto the ball (Ganea et al. 2018); its norm is tanh(sqrt(c) ||v||) / sqrt(c)."""
  v = precision.to_float32(v)
  sqrt_c = c ** 0.5
  norm = _norm(v, MIN_NORM)
  return jnp.tanh(sqrt_c * norm) * v / (sqrt_c * norm)


def project(x: jnp.ndarray, c: float) -> jnp.ndarray:
  """x, or x rescaled to norm (1 - BALL_EPS) / sqrt(c) where it is longer: strictly inside
  the ball whatever rounding did to it."""
  x = precision.to_float32(x)
  norm = _norm(x, MIN_NORM)
  max_norm = (1 - BALL_EPS) / c ** 0.5
  return jnp.where(norm > max_norm, x / norm * max_norm, x)


def clip_features(x: jnp.ndarray, radius: float) -> jnp.ndarray:
  """x min(1, r / ||x||) (Guo et al. 2022): Euclidean features of norm at most r."""
  x = precision.to_float32(x)
  return x * jnp.minimum(1.0, radius / (_norm(x) + MIN_NORM))


def to_poincare(x: jnp.ndarray, c: float, clip_radius: float) -> jnp.ndarray:
  """Euclidean embeddings onto the ball: clipped, mapped by exp_0 and projected (their
  `ToPoincare(c, clip_r=r, riemannian=False)`)."""
  return project(expmap0(clip_features(x, clip_radius), c), c)


def poincare_distance(x: jnp.ndarray, y: jnp.ndarray, c: float) -> jnp.ndarray:
  """d_c(x, y) = 2 / sqrt(c) artanh(sqrt(c) ||(-x) (+)_c y||) (Ganea et al. 2018),
  broadcasting over the leading axes; the last axis is reduced."""
  sqrt_c = c ** 0.5
  return 2 / sqrt_c * artanh(sqrt_c * _norm(mobius_add(-x, y, c))[..., 0])


def distance_to_origin(x: jnp.ndarray, c: float) -> jnp.ndarray:
  """d_c(0, x) = 2 / sqrt(c) artanh(sqrt(c) ||x||)."""
  sqrt_c = c ** 0.5
  return 2 / sqrt_c * artanh(sqrt_c * _norm(precision.to_float32(x))[..., 0])


def pairwise_poincare_distance(q: jnp.ndarray, k: jnp.ndarray, c: float) -> jnp.ndarray:
  """[a, b] matrix of d_c(q_i, k_j) for q [a, d] and k [b, d], without the [a, b, d] Möbius
  sums: their norm has the closed form (the identity below)

    ||(-x) (+)_c y|| = ||x - y|| sqrt(D) / D,  D = 1 - 2c<x,y> + c^2 ||x||^2 ||y||^2,

  since the Möbius numerator (1 - 2c<x,y> + c||y||^2)(-x) + (1 - c||x||^2) y has squared
  norm ||x - y||^2 D. With hyptorch's + 1e-5 in the denominator it is ||x - y|| sqrt(D) /
  (D + 1e-5), the value `poincare_distance` computes. Everything comes from the Gram matrix
  (a full-precision float32 matmul), so a batch costs what NT-Xent's similarities cost.
  D is summed as (1 - c<x,y>)^2 + c^2 (||x||^2 ||y||^2 - <x,y>^2), two terms >= 0: the
  expanded form cancels to negative values in float32 at the ball's edge."""
  q, k = precision.to_float32((q, k))
  q2 = jnp.sum(q * q, axis=1)[:, None]
  k2 = jnp.sum(k * k, axis=1)[None, :]
  qk = precision.matmul(q, k.T)
  sq_diff = jnp.maximum(q2 + k2 - 2 * qk, 0.0)
  denom = (1 - c * qk) ** 2 + c ** 2 * jnp.maximum(q2 * k2 - qk * qk, 0.0)
  norm = _sqrt(sq_diff) * _sqrt(denom) / (denom + MOBIUS_DENOM_EPS)
  sqrt_c = c ** 0.5
  return 2 / sqrt_c * artanh(sqrt_c * norm)


def hyperbolic_nt_xent(z1: jnp.ndarray, z2: jnp.ndarray, c: float, temperature: float,
                       clip_radius: float, axis_name: str | None = None
                       ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """NT-Xent with logits -d_c(q, k) / temperature between points of the Poincaré ball.

  The pairwise loss of their train.py `contrastive_loss(x0, x1)`: query i of view a against
  every embedding of view b (its positive: row i) and every other embedding of view a, the
  query itself masked out; both orderings (a, b) = (1, 2), (2, 1). That is SimCLR's 2N - 1
  candidates per query (`info_nce.pair_logits`): each of the 2N embeddings of the global
  batch is a query, its positive the other view of its image. Their train.py sums the two
  orderings' means; this averages over all 2N queries, half of that (as `info_nce.nt_xent`),
  which AdamW's updates do not see. Each device computes its own 2n rows against the 2N
  gathered columns, so the loss equals the single-device one on any number of devices.

  Args:
    z1, z2: this device's Euclidean embeddings of the two views, [n, d]; row i of both is
      one image. They are mapped to the ball by `to_poincare` here.
    c: the ball's curvature is -c (c > 0).
    temperature: tau of the softmax over -d / tau.
    clip_radius: r of the feature clipping.
    axis_name: mesh axis to gather embeddings over; None for one device.

  Returns:
    The loss averaged over the 2N queries of the global batch, and metrics: the contrastive
    top-1 accuracy, the mean distance of positive and of negative pairs, and the distribution
    over the 2N embeddings of their distance to the origin and of their norm as a fraction
    of the ball's radius (mean, std, min, max): how far toward the edge, where hyperbolic
    space has room for hierarchies, the embeddings sit.
  """
  n = z1.shape[0]
  p1, p2 = to_poincare(z1, c, clip_radius), to_poincare(z2, c, clip_radius)
  queries = jnp.concatenate([p1, p2], axis=0)                            # [2n, d] local
  k1 = parallel.gather_rows(p1, axis_name)                               # [N, d]
  k2 = parallel.gather_rows(p2, axis_name)
  big_n = k1.shape[0]
  keys = jnp.concatenate([k1, k2], axis=0)                               # [2N, d] all
  is_self, is_pos, pos_col = info_nce.pair_columns(n, big_n, axis_name)

  # The Gram-matrix distances are accurate to ~1e-3 in absolute terms (||x - y||^2 from
  # ||x||^2 + ||y||^2 - 2<x,y> cancels): the positives, which training brings close, are
  # computed from the Möbius sums of their vectors instead ([2n, d], this device's rows).
  pos_dist = poincare_distance(queries, jnp.concatenate([p2, p1], axis=0), c)      # [2n]
  dist = jnp.where(is_pos, pos_dist[:, None],
                   pairwise_poincare_distance(queries, keys, c))         # [2n, 2N]
  logits = jnp.where(is_self, _MASK_VALUE, -dist / temperature)
  pos_logit = jnp.sum(jnp.where(is_pos, logits, 0.0), axis=1)
  per_query = jax.nn.logsumexp(logits, axis=1) - pos_logit
  num_queries = 2 * big_n
  loss = parallel.psum(jnp.sum(per_query), axis_name) / num_queries

  is_neg = ~(is_self | is_pos)
  correct = jnp.sum(jnp.argmax(logits, axis=1) == pos_col)
  metrics = {
      'contrastive_acc': parallel.psum(correct, axis_name) / num_queries,
      'pos_distance': parallel.psum(jnp.sum(jnp.where(is_pos, dist, 0.0)), axis_name)
                      / num_queries,
      'neg_distance': parallel.psum(jnp.sum(jnp.where(is_neg, dist, 0.0)), axis_name)
                      / (num_queries * (num_queries - 2)),
  }
  # Gathered as replicated values (a psum), which shard_map can return as metrics.
  metrics.update(_spread('origin_distance', parallel.gather_rows_replicated(
      distance_to_origin(queries, c), axis_name)))
  metrics.update(_spread('norm_fraction', parallel.gather_rows_replicated(
      c ** 0.5 * _norm(queries)[:, 0], axis_name)))
  return loss, jax.lax.stop_gradient(metrics)


def _spread(name: str, x: jnp.ndarray) -> dict[str, jnp.ndarray]:
  """Mean, std, min and max of `x`, every device's gathered values (hence the same on all)."""
  mean = jnp.mean(x)
  return {f'{name}_mean': mean, f'{name}_std': jnp.sqrt(jnp.mean((x - mean) ** 2)),
          f'{name}_min': jnp.min(x), f'{name}_max': jnp.max(x)}
