"""Representation diagnostics: is the embedding informative, or collapsing?

All functions take a batch of embeddings [N, D] (and positive pairs where needed) and return
scalars or spectra; they are pure jnp, so they run jitted on device or on host arrays.
"""

from __future__ import annotations

import jax.numpy as jnp

from ssl_jax.losses.info_nce import l2_normalize


def normalized_std(embeddings: jnp.ndarray) -> jnp.ndarray:
  """Mean over dimensions of the per-dimension standard deviation of the l2-normalised
  embeddings. A collapsed encoder gives 0; a healthy one about 1/sqrt(D) (uniform on the
  sphere), so the ratio to 1/sqrt(D) is the fraction of a healthy spread."""
  z = l2_normalize(jnp.asarray(embeddings, jnp.float32))
  return jnp.mean(jnp.std(z, axis=0))
