"""iBOT's masked-patch self-distillation and patch centre (Zhou et al. 2022, "iBOT: Image BERT
pre-training with online tokenizer", Sec. 3.2, eq. 1; reference main_ibot.py, `iBOTLoss`).

The teacher, an online tokenizer, sees each global crop unmasked; its output on patch token j
becomes the target P_t(u_j) = softmax((g_t(u_j) - c') / tau_t'), centred by its own running
centre c' (`center2` in the reference) and sharpened by its own temperature. The student sees
the same crop with blocks of patches masked and is trained to predict those targets at the
masked positions (eq. 1):

  L_MIM = - sum_j m_j P_t(u_j)^T log P_s(u_hat_j) / max(sum_j m_j, 1),

per image, then averaged over all images and global crops; an image whose crop has no mask
adds 0 to the mean (the reference averages over every image, masked or not). The class-token
part is DINO's loss (`losses.dino.self_distillation`). The loss has no cross-row terms: on
several devices only the numerator's sum and the number of images are psum'd, so each image's
own division by its masked count is exact on any number of devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_jax import parallel, precision


def masked_patch_distillation(student: list[jnp.ndarray], teacher: list[jnp.ndarray],
                              masks: list[jnp.ndarray], center: jnp.ndarray,
                              student_temperature: float,
                              teacher_temperature: float | jnp.ndarray,
                              axis_name: str | None = None
                              ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """The patch loss L_MIM (eq. 1), the reference's `total_loss2` before lambda2.

  Args:
    student: G arrays [n, L, K], the student's patch outputs on this device's rows of each
      (masked) global crop.
    teacher: G arrays [n, L, K], the teacher's patch outputs on the same crops unmasked (no
      gradient is taken).
    masks: G arrays [n, L], 1 where the student's patch was masked, else 0.
    center: [K] the patch centre c'.
    student_temperature, teacher_temperature: tau_s (the paper: 0.1) and tau_t' (0.04 ->
      0.07).
    axis_name: mesh axis the batch is split over; None for one device.

  Returns:
    The loss, identical on every device, and metrics: `masked_fraction` (masked patches over
    all patches of the global crops) and `patch_teacher_entropy` (mean entropy of the
    teacher's targets at the masked patches; 0: one-hot targets, log K: uniform).
  """
  student, teacher, masks, center = precision.to_float32((student, teacher, masks, center))
  n, num_patches = masks[0].shape
  num_images = parallel.psum(jnp.float32(n), axis_name)
  total = entropy = masked = 0.0
  for s, t, m in zip(student, teacher, masks):
    target = jax.nn.softmax(jax.lax.stop_gradient(t - center) / teacher_temperature, axis=-1)
    cross_entropy = -jnp.sum(target * jax.nn.log_softmax(s / student_temperature, axis=-1),
                             axis=-1)                                            # [n, L]
    per_image = jnp.sum(cross_entropy * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)
    total += jnp.sum(per_image)
    entropy += jnp.sum(m * -jnp.sum(target * jnp.log(jnp.maximum(target, 1e-30)), axis=-1))
    masked += jnp.sum(m)
  loss = parallel.psum(total, axis_name) / (len(student) * num_images)
  masked = parallel.psum(masked, axis_name)
  metrics = {
      'masked_fraction': masked / (len(student) * num_images * num_patches),
      'patch_teacher_entropy': parallel.psum(entropy, axis_name) / jnp.maximum(masked, 1.0),
  }
  return loss, jax.lax.stop_gradient(metrics)


def update_patch_center(center: jnp.ndarray, teacher: list[jnp.ndarray], momentum: float,
                        axis_name: str | None = None) -> jnp.ndarray:
  """c' <- m c' + (1 - m) mean over the images of the global batch and its global crops of
  each image's mean teacher output over all its patches (masked or not), as the reference's
  `update_center`; psum'd, so the new centre is the same on every device."""
  center, teacher = precision.to_float32((center, teacher))
  per_image = jax.lax.stop_gradient(jnp.concatenate([jnp.mean(t, axis=1) for t in teacher]))
  num_rows = parallel.psum(jnp.float32(per_image.shape[0]), axis_name)
  batch_center = parallel.psum(jnp.sum(per_image, axis=0), axis_name) / num_rows
  return momentum * center + (1.0 - momentum) * batch_center
