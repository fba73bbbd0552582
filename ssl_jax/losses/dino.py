"""DINO's self-distillation loss and teacher centring (Caron et al. 2021, Sec. 3.1, eq. 2-4).

The teacher's outputs on the global crops become targets P_t = softmax((g_t - c) / tau_t),
centred by c and sharpened by a low temperature; the student's outputs on every crop,
P_s = softmax(g_s / tau_s), are trained to match them with the cross-entropy H(P_t, P_s).
Centring alone would flatten the targets towards uniform and sharpening alone would collapse
them to one dimension; together they balance (Sec. 5.3). The loss has no cross-row terms, so
on several devices only the batch means and the centre's batch statistic are psum'd.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_jax import parallel, precision


def _entropy(p: jnp.ndarray) -> jnp.ndarray:
  return -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1)


def self_distillation(student: list[jnp.ndarray], teacher: list[jnp.ndarray],
                      center: jnp.ndarray, student_temperature: float,
                      teacher_temperature: float | jnp.ndarray, axis_name: str | None = None
                      ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """DINO's multi-crop loss (eq. 3): the mean over pairs (teacher global crop i, student
  crop v != i) of the global-batch mean of H(P_t(x_i), P_s(x_v)).

  Args:
    student: V arrays [n, K], the student's head outputs on this device's rows of every crop,
      the global crops first, in the order of `teacher`.
    teacher: the teacher's head outputs [n, K] on the global crops (no gradient is taken).
    center: [K] the running centre c subtracted from the teacher's outputs.
    student_temperature, teacher_temperature: tau_s and tau_t (the paper: 0.1, 0.04 -> 0.07).
    axis_name: mesh axis the batch is split over; None for one device.

  Returns:
    The loss (identical on every device) and metrics: `teacher_entropy`, the mean entropy of
    the teacher's targets (0 when each is one-hot: collapse by sharpening), and
    `teacher_marginal_entropy`, the entropy of their batch mean (0 when every image gets the
    same target: collapse to one dimension); log K is uniform for both.
  """
  num_crops = len(student)
  n = student[0].shape[0]
  student, teacher, center = precision.to_float32((student, teacher, center))
  num_rows = parallel.psum(jnp.float32(n), axis_name)
  targets = [jax.nn.softmax(jax.lax.stop_gradient(t - center) / teacher_temperature, axis=-1)
             for t in teacher]
  log_p = [jax.nn.log_softmax(s / student_temperature, axis=-1) for s in student]
  total = 0.0
  num_pairs = 0
  for i, p_t in enumerate(targets):
    for v in range(num_crops):
      if v == i:
        continue
      total += jnp.sum(-p_t * log_p[v])
      num_pairs += 1
  loss = parallel.psum(total, axis_name) / (num_pairs * num_rows)

  target_sum = parallel.psum(sum(jnp.sum(p, axis=0) for p in targets), axis_name)
  marginal = target_sum / (len(targets) * num_rows)
  metrics = {
      'teacher_entropy': parallel.psum(sum(jnp.sum(_entropy(p)) for p in targets), axis_name)
                         / (len(targets) * num_rows),
      'teacher_marginal_entropy': _entropy(marginal),
  }
  return loss, jax.lax.stop_gradient(metrics)


def update_center(center: jnp.ndarray, teacher: list[jnp.ndarray], momentum: float,
                  axis_name: str | None = None) -> jnp.ndarray:
  """c <- m c + (1 - m) mean of the teacher's outputs over the global crops of the global
  batch (eq. 4); psum'd, so the new centre is the same on every device."""
  center, teacher = precision.to_float32((center, teacher))
  outputs = jax.lax.stop_gradient(jnp.concatenate(teacher, axis=0))
  num_rows = parallel.psum(jnp.float32(outputs.shape[0]), axis_name)
  batch_center = parallel.psum(jnp.sum(outputs, axis=0), axis_name) / num_rows
  return momentum * center + (1.0 - momentum) * batch_center


def config_problems(m) -> list[str]:
  """What is wrong in a DINO-style method config `m` (DINO's, iBOT's): the temperatures,
  centre momentum, head depth and outputs, and the warm-up and freeze lengths, each message
  naming the fix."""
  problems = []
  for name in ('student_temperature', 'teacher_temperature', 'teacher_temperature_start'):
    if m[name] <= 0:
      problems.append(f'method.{name} must be positive.')
  if not 0.0 <= m.center_momentum < 1.0:
    problems.append('method.center_momentum must be in [0, 1) (the paper: 0.9).')
  if m.projector_num_layers < 1:
    problems.append('method.projector_num_layers must be at least 1 (the paper: 3).')
  if m.num_prototypes < 1:
    problems.append('method.num_prototypes must be positive (the papers: DINO 65536, '
                    'iBOT 8192).')
  for name in ('teacher_warmup_epochs', 'freeze_last_layer_epochs'):
    if m[name] < 0:
      problems.append(f'method.{name} must be >= 0 (0 disables it).')
  return problems
