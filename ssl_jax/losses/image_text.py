"""Image-text contrastive losses: CLIP's softmax (Radford et al. 2021) and SigLIP's sigmoid
(Zhai et al. 2023), over the global batch of matching (image, text) pairs.

Both are pure functions of this device's rows, for use inside `jax.shard_map`: row i of
`image_emb` and of `text_emb` is one pair, and every other text (image) of the global batch is
a negative. With `axis_name=None` they compute the single-device loss; with a mesh axis (or a
tuple of axes, e.g. `parallel.BATCH_AXES`) every device scores its own rows against the other
devices' columns and the result equals the single-device loss on the concatenated batch.

The temperature is learnt as a log-scale t' (logits = exp(t') * cosine). CLIP clamps the scale
to 100 after each optimizer step (OpenCLIP's `logit_scale.clamp_(0, ln 100)`), not inside the
loss: a clip in the loss would zero the gradient of t' once it passes the bound and the
parameter could never come back from above it. Hence `clamp_log_scale`, for the method's
after-update hook; the losses use whatever log-scale they are given.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ssl_jax import parallel, precision
from ssl_jax.losses.info_nce import l2_normalize

# CLIP: temperature 0.07 at init (logit scale 1/0.07 ~ 14.3), scale clamped to 100.
CLIP_INIT_LOG_SCALE = math.log(1 / 0.07)
CLIP_MAX_SCALE = 100.0
# SigLIP (section 3.2): t' = log 10 and b = -10, so that the many negatives start near their
# optimum and the first steps are not spent pushing them down.
SIGLIP_INIT_LOG_SCALE = math.log(10.0)
SIGLIP_INIT_BIAS = -10.0


def clamp_log_scale(log_scale: jnp.ndarray, max_scale: float = CLIP_MAX_SCALE) -> jnp.ndarray:
  """min(log_scale, log(max_scale)): the projection OpenCLIP applies to the parameter after
  each optimizer step (values below the bound are returned unchanged)."""
  return jnp.minimum(log_scale, math.log(max_scale))


def _axis_size(axis_name) -> int:
  """Number of devices along `axis_name` (1 for None), as a Python int. `jax.lax.axis_size`
  accepts a tuple of mesh axes and returns the product of their sizes."""
  if axis_name is None:
    return 1
  if hasattr(jax.lax, 'axis_size'):
    return int(jax.lax.axis_size(axis_name))
  return int(jax.lax.psum(1, axis_name))


def _normalized_pair(image_emb, text_emb, log_scale):
  image_emb, text_emb, log_scale = precision.to_float32((image_emb, text_emb, log_scale))
  return l2_normalize(image_emb), l2_normalize(text_emb), jnp.exp(log_scale)


def clip_loss(image_emb: jnp.ndarray, text_emb: jnp.ndarray, log_scale: jnp.ndarray,
              axis_name=None) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """CLIP's symmetric InfoNCE over the global batch.

  Each local image is a query against all B gathered texts, its positive the text at its
  global index; each local text likewise against all gathered images. The two directions are
  separate softmaxes (rows of the similarity matrix, then its columns), which is why both
  directions need the other modality gathered: a device's rows of the image-to-text matrix
  say nothing about the normalisation of its texts' columns.

  Args:
    image_emb, text_emb: this device's embeddings, [n, d]; row i of both is one pair.
      L2-normalised here, in float32.
    log_scale: scalar t'; logits are exp(t') * cosine. Not clipped here (`clamp_log_scale`).
    axis_name: mesh axis, or tuple of axes, that splits the batch; None for one device.

  Returns:
    (loss_i2t + loss_t2i) / 2, each the mean over the B pairs of the global batch (identical
    on every device), and replicated metrics: top-1 accuracy of the positive in either
    direction, the scale exp(t') and the mean cosine of the positive pairs.
  """
  n = image_emb.shape[0]
  img, txt, scale = _normalized_pair(image_emb, text_emb, log_scale)
  img_all = parallel.gather_rows(img, axis_name)                         # [B, d]
  txt_all = parallel.gather_rows(txt, axis_name)
  big_b = img_all.shape[0]
  pos_col = parallel.global_row_offset(n, axis_name) + jnp.arange(n)

  def direction(queries, keys):
    """Cross-entropy summed over the local queries, and how many rank their positive first."""
    cos = precision.matmul(queries, keys.T)                              # [n, B]
    logits = scale * cos
    pos_logit = jnp.take_along_axis(logits, pos_col[:, None], axis=1)[:, 0]
    ce = jnp.sum(jax.nn.logsumexp(logits, axis=1) - pos_logit)
    correct = jnp.sum(jnp.argmax(logits, axis=1) == pos_col)
    return ce, correct

  ce_i2t, correct_i2t = direction(img, txt_all)
  ce_t2i, correct_t2i = direction(txt, img_all)
  loss = parallel.psum(ce_i2t + ce_t2i, axis_name) / (2 * big_b)

  pos_cos = jnp.sum(img * txt)                    # row i of both is the pair: the diagonal
  metrics = {
      'i2t_accuracy': parallel.psum(correct_i2t, axis_name) / big_b,
      't2i_accuracy': parallel.psum(correct_t2i, axis_name) / big_b,
      'scale': scale,
      'positive_cosine': parallel.psum(pos_cos, axis_name) / big_b,
  }
  return loss, jax.lax.stop_gradient(metrics)


def _sigmoid_terms(img, txt, scale, bias, positive_diagonal: bool):
  """-log sigmoid(z * (scale * cos + bias)) summed over the block img x txt, with z = +1 on
  the diagonal when `positive_diagonal` and -1 everywhere else; and the block's logit sum."""
  logits = scale * precision.matmul(img, txt.T) + bias                   # [n, m]
  if positive_diagonal:
    z = jnp.where(jnp.eye(*logits.shape, dtype=bool), 1.0, -1.0)
  else:
    z = -1.0
  return -jnp.sum(jax.nn.log_sigmoid(z * logits)), jnp.sum(logits)


def siglip_loss(image_emb: jnp.ndarray, text_emb: jnp.ndarray, log_scale: jnp.ndarray,
                bias: jnp.ndarray, axis_name=None, chunked: bool = True
                ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """SigLIP's pairwise sigmoid loss over the global batch:

    L = -(1/B) sum_i sum_j log sigmoid(z_ij (t x_i . y_j + b)),

  z_ij = +1 for a matching pair and -1 otherwise, t = exp(t'), x and y l2-normalised, B the
  global batch. Every pair is an independent binary problem, so the loss is a plain sum over
  blocks of the B x B matrix and needs no normalisation across a row.

  That is what the chunked form (the paper's section 3.3) uses: each device scores its images
  against its own texts (the only block holding positives), then passes its current text
  chunk to the next device around a ring (`ppermute`, axis_size - 1 times) and scores its
  images against each chunk that arrives, all negatives. No device holds more than one other
  device's texts or more than an n x n block of logits (the block is recomputed in the
  backward pass, `jax.checkpoint`, rather than kept for each step). `chunked=False` gathers
  all texts and scores the n x B row block at once; both give the same loss and gradients.

  Args:
    image_emb, text_emb: this device's embeddings, [n, d]; row i of both is one pair.
      L2-normalised here, in float32.
    log_scale: scalar t'; the logit scale is exp(t').
    bias: scalar b.
    axis_name: mesh axis, or tuple of axes, that splits the batch; None for one device. A
      tuple is one ring over the devices in `axis_index` order (row-major over the axes).
    chunked: ring of text chunks (True) or all-gather of the texts (False).

  Returns:
    The loss (identical on every device) and replicated metrics: the scale t, the bias, and
    the mean logit of the B positive and of the B(B - 1) negative pairs.
  """
  n = image_emb.shape[0]
  img, txt, scale = _normalized_pair(image_emb, text_emb, log_scale)
  bias = precision.to_float32(bias)
  devices = _axis_size(axis_name)
  big_b = n * devices
  pos_logit_sum = jnp.sum(scale * jnp.sum(img * txt, axis=1) + bias)

  if chunked or axis_name is None:
    # Own chunk: positives on the diagonal.
    loss_sum, logit_sum = _sigmoid_terms(img, txt, scale, bias, positive_diagonal=True)
    if devices > 1:
      ring = [(i, (i + 1) % devices) for i in range(devices)]
      negatives = jax.checkpoint(
          lambda x, y, t, b: _sigmoid_terms(x, y, t, b, positive_diagonal=False))

      def step(carry, _):
        chunk, loss_acc, logit_acc = carry
        # After s steps this device holds the texts of device (index - s) mod devices,
        # never its own for s in 1 .. devices - 1: every pair scored here is a negative.
        chunk = jax.lax.ppermute(chunk, axis_name, ring)
        block_loss, block_logits = negatives(img, chunk, scale, bias)
        return (chunk, loss_acc + block_loss, logit_acc + block_logits), None

      (_, loss_sum, logit_sum), _ = jax.lax.scan(
          step, (txt, loss_sum, logit_sum), None, length=devices - 1)
  else:
    txt_all = parallel.gather_rows(txt, axis_name)                       # [B, d]
    logits = scale * precision.matmul(img, txt_all.T) + bias             # [n, B]
    pos_col = parallel.global_row_offset(n, axis_name) + jnp.arange(n)
    is_pos = jnp.arange(big_b)[None, :] == pos_col[:, None]
    z = jnp.where(is_pos, 1.0, -1.0)
    loss_sum = -jnp.sum(jax.nn.log_sigmoid(z * logits))
    logit_sum = jnp.sum(logits)

  loss = parallel.psum(loss_sum, axis_name) / big_b
  pos_total = parallel.psum(pos_logit_sum, axis_name)
  neg_total = parallel.psum(logit_sum, axis_name) - pos_total
  metrics = {
      'scale': scale,
      'bias': bias,
      'positive_logit': pos_total / big_b,
      'negative_logit': neg_total / max(big_b * (big_b - 1), 1),
  }
  return loss, jax.lax.stop_gradient(metrics)
