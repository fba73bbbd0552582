"""Mixed precision: what stays float32 when the networks compute in bfloat16.

`--config.model.dtype=bfloat16` (`models.DTYPES`) makes the encoders and heads run their
convolutions, dense layers, activations and residual additions in bfloat16, for every method.
What follows is the one list of the float32 islands of the library; each entry says where it
is implemented, and tests/test_bfloat16.py checks them.

Stored state, float32 whatever the compute dtype:
  * Parameters. Every module creates them float32 (flax's `param_dtype` default; the modules
    that call `self.param` themselves pass float32: models/dino_head.py, methods/swav.py's
    prototypes, models/vit.py), so the optimizer state (optax follows the parameters'
    dtypes) and the target network are float32 too.
  * BatchNorm running statistics (flax keeps them float32).
  * Method state: MoCo's and NNCLR's queues (losses/queue.py: created float32, `enqueue`
    casts the rows to the queue's dtype), SwAV's queue (methods/swav.py, `init`), AdCo's
    bank and its velocity (methods/adco.py, `init`), DINO's centre (losses/dino.py,
    `update_center`).

Computed in float32 inside a bfloat16 network:
  * BatchNorm statistics. flax's `nn.BatchNorm` with `dtype=bfloat16` casts its input to
    float32 to take the batch mean and variance (`force_float32_reductions`, on by default;
    the cross-device mean over `axis_name` is then a float32 pmean) and normalises in float32,
    `(x - mean) * rsqrt(var + eps) * scale + bias`; only its output is rounded to bfloat16
    (flax.linen.normalization, `_compute_stats` and `_normalize`, flax 0.12).
  * ViT: LayerNorm (models/vit.py, `_layer_norm`: dtype float32) and the attention softmax
    (`Attention`: logits accumulated in float32); the representation is the
    float32 LayerNorm of the class token, or of the float32 mean of the patch tokens.
  * Features: every encoder returns float32 (models/convnet.py, resnet.py, vit.py), so the
    evaluation features (kNN, linear and online probes, diagnostics) are float32.
  * Head outputs: the projection MLP (models/heads.py) and MoCo v2's head (methods/moco_v2.py)
    return float32; DINO's head l2-normalises its bottleneck in float32 and its
    weight-normalised last layer divides by the column norms in float32 and accumulates and
    returns float32 logits (models/dino_head.py), which the sharp teacher softmax
    (temperature 0.04) would otherwise see rounded to 3 significant digits.
  * Losses. Every loss in ssl_jax/losses casts its inputs (embeddings, scores, queues, banks,
    centres) with `to_float32` on entry, so everything after the network runs in float32:
    the l2 normalisation of embeddings (`losses/info_nce.l2_normalize` returns float32),
    similarity matrices, softmax and log-sum-exp of the contrastive losses (info_nce.py,
    moco.py, negatives.py), of DINO (dino.py) and of SwAV's swapped prediction, Sinkhorn-Knopp
    (sinkhorn.py), the cross-correlation (barlow_twins.py) and covariance (vicreg.py) sums,
    triplet distances (triplet.py), cosine regression (regression.py) and nearest-neighbour
    search (queue.py).
  * Loss matmuls at full float32 precision (`matmul`): on TPUs (and on GPUs that allow
    TF32) a float32 matmul at default precision rounds its operands to bfloat16 (TF32).
    Similarities, cross-correlations and covariances use `matmul`; they cost batch^2 x d or
    batch x d^2, negligible next to the network.

What stays bfloat16: the networks' convolutions and dense layers (with float32 parameters
rounded to bfloat16 on use), activations, residual additions, and the
cotangents of all of these in the backward pass. The gradient with respect to the float32
parameters is float32 (the cast's transpose), as is every update.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The precision of the losses' matmuls: full float32 on every backend.
LOSS_MATMUL_PRECISION = jax.lax.Precision.HIGHEST


def to_float32(tree):
  """Every floating array of `tree` (an array, a tuple, a list ...) promoted to at least
  float32: bfloat16 and float16 become float32, float32 and float64 are unchanged; other
  leaves (integers, booleans) too. Differentiable: the gradient is cast back."""
  def cast(x):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return jax.tree.map(cast, tree)


def matmul(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """a @ b at `LOSS_MATMUL_PRECISION`, for the losses' similarity and statistics matrices."""
  return jnp.matmul(a, b, precision=LOSS_MATMUL_PRECISION)
