"""iBOT: the masked-patch loss and patch centre by hand, the whole objective against a float64
numpy port of the authors' iBOTLoss, blockwise masks against a port of their loader.py loop
(same draws) and its properties (ratio, fraction of crops masked, rows keyed globally), the
mask token in the ViT (masked pixels are invisible, the ViT's parameters stay a plain ViT's),
the shared and separate heads, 8 devices equal to one and to float64, exact resume, and config
errors that name the fix."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import method_harness as mh
from ssl_jax import config_lib, parallel, train
from ssl_jax.losses import ibot as ibot_loss
from ssl_jax.methods import RunLength, build_method
from ssl_jax.methods.ibot import MAX_BLOCK_TRIES, IBOTHead, block_mask, block_masks
from ssl_jax.models import build_encoder
from ssl_jax.models.dino_head import DINOHead

BATCH = 16


@pytest.fixture(scope='module', autouse=True)
def tiny_vit_registered():
  with mh.tiny_vit_registered():
    yield


def _config(**method):
  """The tiny ViT (16-pixel crops of 4-pixel patches: a 4 x 4 grid) with the class token, 2
  local crops of 12 pixels, small heads."""
  c = mh.tiny_vit_config('ibot', batch_size=BATCH)
  c.model.vit_pool = 'cls'
  c.augment.num_local_crops = 2  # the CPU recipe has none
  c.augment.local_crop_size = 12
  c.method.num_patch_prototypes = 64
  c.method.update(method)
  return c


# ------------------------------------------------------------------------------------------
# The loss


def test_hand_computed_patch_loss_and_centre():
  # K = 2, tau_s = tau_t' = 1, centre c' = (1, 0); one global crop of 3 images of 2 patches.
  # Image 0 masks patch 0, image 1 both, image 2 none.
  # Teacher, centred: (0, ln 3) -> (1/4, 3/4); (ln 3, 0) -> (3/4, 1/4); (0, 0) -> (1/2, 1/2).
  # Student: (0, 0) -> (1/2, 1/2); (ln 3, 0) -> (3/4, 1/4); (0, ln 3) -> (1/4, 3/4).
  # Image 0: H((1/4, 3/4), (1/2, 1/2)) = ln 2, over 1 masked patch.
  # Image 1: H((3/4, 1/4), (3/4, 1/4)) = 2 ln 2 - (3/4) ln 3, H((1/2, 1/2), (1/4, 3/4)) =
  #   2 ln 2 - (1/2) ln 3; over 2 masked patches: 2 ln 2 - (5/8) ln 3.
  # Image 2: nothing masked, 0, but it counts in the mean over images (as the reference).
  # Loss = (3 ln 2 - (5/8) ln 3) / 3. Unmasked patches' outputs are arbitrary.
  ln3 = math.log(3.0)
  teacher = jnp.array([[[1.0, ln3], [1.0 + ln3, 0.0]],
                       [[1.0 + ln3, 0.0], [1.0, 0.0]],
                       [[3.0, 1.0], [1.0, 3.0]]])
  student = jnp.array([[[0.0, 0.0], [5.0, -5.0]],
                       [[ln3, 0.0], [0.0, ln3]],
                       [[-4.0, 2.0], [7.0, 1.0]]])
  mask = jnp.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
  center = jnp.array([1.0, 0.0])
  loss, metrics = ibot_loss.masked_patch_distillation([student], [teacher], [mask], center,
                                                      1.0, 1.0)
  np.testing.assert_allclose(loss, (3 * math.log(2.0) - 0.625 * ln3) / 3, rtol=1e-6)
  np.testing.assert_allclose(metrics['masked_fraction'], 0.5, rtol=1e-6)
  # Target entropies at the 3 masked patches: H(1/4, 3/4) twice, ln 2 once.
  h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
  np.testing.assert_allclose(metrics['patch_teacher_entropy'], (2 * h + math.log(2.0)) / 3,
                             rtol=1e-6)
  # c' <- 0.9 c' + 0.1 mean over images of each image's mean over all its patches:
  # ((2 + ln 3) / 2, ln 3 / 2), ((2 + ln 3) / 2, 0), (2, 2).
  new_center = ibot_loss.update_patch_center(center, [teacher], 0.9)
  np.testing.assert_allclose(new_center, [0.9 + 0.1 * (4 + ln3) / 3, 0.1 * (ln3 / 2 + 2) / 3],
                             rtol=1e-6)
  # No gradient reaches the teacher.
  grad = jax.grad(lambda t: ibot_loss.masked_patch_distillation(
      [student], [t], [mask], center, 1.0, 1.0)[0])(teacher)
  np.testing.assert_array_equal(grad, 0.0)


def _log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def reference_ibot_loss(student_cls, student_patch, teacher_cls, teacher_patch, masks, center,
                        center2, student_temp, temp, temp2, lambda1, lambda2, momentum):
  """iBOTLoss.forward and update_center of the authors' main_ibot.py in float64 numpy, on
  per-crop lists (their chunks): (total, cls part, patch part, new center, new center2)."""
  t_cls = [np.exp(_log_softmax((t - center) / temp)) for t in teacher_cls]
  t_patch = [np.exp(_log_softmax((t - center2) / temp2)) for t in teacher_patch]
  s_cls = [s / student_temp for s in student_cls]
  s_patch = [s / student_temp for s in student_patch]
  loss1 = loss2 = 0.0
  n1 = n2 = 0
  for q in range(len(t_cls)):
    for v in range(len(s_cls)):
      if v == q:
        l2 = np.sum(-t_patch[q] * _log_softmax(s_patch[v]), axis=-1)
        mask = masks[v]
        l2 = np.sum(l2 * mask, axis=-1) / np.maximum(mask.sum(axis=-1), 1.0)
        loss2 += l2.mean()
        n2 += 1
      else:
        loss1 += np.sum(-t_cls[q] * _log_softmax(s_cls[v]), axis=-1).mean()
        n1 += 1
  loss1, loss2 = loss1 / n1 * lambda1, loss2 / n2 * lambda2
  all_cls, all_patch = np.concatenate(teacher_cls), np.concatenate(teacher_patch)
  new_center = center * momentum + all_cls.mean(axis=0) * (1 - momentum)
  new_center2 = center2 * momentum + all_patch.mean(axis=1).mean(axis=0) * (1 - momentum)
  return loss1 + loss2, loss1, loss2, new_center, new_center2


def test_objective_matches_the_authors_ibot_loss():
  """The method's objective (both parts, weights, temperature schedules, both centres) on 8
  devices against the float64 port of iBOTLoss, mid-warm-up, weights other than 1."""
  config = _config(cls_loss_weight=0.7, patch_loss_weight=1.3, teacher_temperature_start=0.03,
                   teacher_temperature=0.07, teacher_patch_temperature_start=0.04,
                   teacher_patch_temperature=0.09, teacher_warmup_epochs=4.0)
  method = build_method(config, RunLength(total_steps=10, steps_per_epoch=1))
  m = config.method
  rng = np.random.default_rng(0)
  n, num_patches, k = BATCH, 16, m.num_prototypes
  f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
  outputs = {'student': [f32(n, k) for _ in range(4)],
             'student_patch': [f32(n, num_patches, k) for _ in range(2)],
             'mask': [(rng.random((n, num_patches)) < 0.3).astype(np.float32) for _ in range(2)]}
  outputs['mask'][0][:3] = 0.0  # images with no mask count as 0 in the mean
  targets = {'teacher': [f32(n, k) for _ in range(2)],
             'teacher_patch': [f32(n, num_patches, k) for _ in range(2)]}
  state = {'center': f32(k), 'patch_center': f32(k)}
  step = 2
  mesh = parallel.make_mesh(8)
  axis = parallel.DATA_AXIS
  objective = jax.jit(jax.shard_map(
      lambda o, t, s: method.objective(None, s, o, t, {}, None, jnp.int32(step), axis),
      mesh=mesh, in_specs=(P(axis), P(axis), P()), out_specs=(P(), (P(), P()))))
  loss, (metrics, new_state) = jax.device_get(objective(outputs, targets, state))
  # Temperatures at step 2 of a 4-step warm-up: halfway.
  temp, temp2 = 0.03 + 0.5 * (0.07 - 0.03), 0.04 + 0.5 * (0.09 - 0.04)
  np.testing.assert_allclose(metrics['teacher_temperature'], temp, rtol=1e-6)
  np.testing.assert_allclose(metrics['teacher_patch_temperature'], temp2, rtol=1e-6)
  f64 = lambda xs: [np.asarray(x, np.float64) for x in xs]  # noqa: E731
  total, part1, part2, center, center2 = reference_ibot_loss(
      f64(outputs['student']), f64(outputs['student_patch']), f64(targets['teacher']),
      f64(targets['teacher_patch']), f64(outputs['mask']), state['center'].astype(np.float64),
      state['patch_center'].astype(np.float64), 0.1, temp, temp2, 0.7, 1.3, 0.9)
  np.testing.assert_allclose(loss, total, rtol=1e-5)
  np.testing.assert_allclose(0.7 * metrics['cls_loss'], part1, rtol=1e-5)
  np.testing.assert_allclose(1.3 * metrics['patch_loss'], part2, rtol=1e-5)
  np.testing.assert_allclose(new_state['center'], center, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_state['patch_center'], center2, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Masks


def _uniform(bits):
  return (np.asarray(bits) >> 8).astype(np.float32) * np.float32(2.0 ** -24)


def reference_block_mask(key, grid, ratio, aspect_ratio):
  """loader.py's `ImageFolderMask` block loop, verbatim but for its random draws: round i's
  tries read the bits that `block_mask` draws from fold_in(key, i), in numpy float32."""
  h, w = grid
  high = np.float32(ratio) * np.float32(h * w)
  log_aspect = np.log(np.asarray(aspect_ratio, np.float32))
  mask = np.zeros((h, w), dtype=bool)
  mask_count = 0
  i = 0
  while mask_count < high:
    bits = np.asarray(jax.random.bits(jax.random.fold_in(key, i), (4, MAX_BLOCK_TRIES),
                                      jnp.uint32))
    i += 1
    max_mask_patches = high - np.float32(mask_count)
    delta = 0
    for attempt in range(MAX_BLOCK_TRIES):
      low = np.float32((min(h, w) // 3) ** 2)
      target_area = low + _uniform(bits[0, attempt]) * (max_mask_patches - low)
      aspect = np.exp(log_aspect[0] + _uniform(bits[1, attempt]) *
                      (log_aspect[1] - log_aspect[0]))
      bh = int(np.round(np.sqrt(target_area * aspect)))
      bw = int(np.round(np.sqrt(target_area / aspect)))
      if bw < w and bh < h:
        top = int(bits[2, attempt] % np.uint32(h - bh + 1))    # random.randint(0, h - bh)
        left = int(bits[3, attempt] % np.uint32(w - bw + 1))
        num_masked = mask[top: top + bh, left: left + bw].sum()
        if 0 < bh * bw - num_masked <= max_mask_patches:
          for r in range(top, top + bh):
            for c in range(left, left + bw):
              if mask[r, c] == 0:
                mask[r, c] = 1
                delta += 1
      if delta > 0:
        break
    if delta == 0:
      break
    else:
      mask_count += delta
  return mask.reshape(-1)


@pytest.mark.parametrize('grid', [pytest.param((4, 4), marks=pytest.mark.slow), (7, 7),
                                  pytest.param((14, 14), marks=pytest.mark.slow)])
def test_block_mask_is_the_authors_loop(grid):
  """Same draws, same masks: the vectorised tries and the while_loop are loader.py's loop."""
  fn = jax.jit(jax.vmap(lambda k, r: block_mask(k, grid, r, (0.3, 1 / 0.3))))
  keys = jax.random.split(jax.random.PRNGKey(3), 40)
  ratios = np.linspace(0.1, 0.5, 40).astype(np.float32)
  masks = np.asarray(fn(keys, ratios))
  for key, ratio, mask in zip(keys, ratios, masks):
    np.testing.assert_array_equal(mask, reference_block_mask(key, grid, ratio, (0.3, 1 / 0.3)))
  # Never more than the target ratio, and blocks, not scattered patches: most masked patches
  # have a masked neighbour.
  counts = masks.sum(axis=1)
  assert np.all(counts <= ratios * grid[0] * grid[1])
  assert counts.mean() > 0.6 * (ratios * grid[0] * grid[1]).mean()
  two_d = masks.reshape(-1, *grid)
  padded = np.pad(two_d, ((0, 0), (1, 1), (1, 1)))
  neighbours = (padded[:, :-2, 1:-1] | padded[:, 2:, 1:-1] | padded[:, 1:-1, :-2] |
                padded[:, 1:-1, 2:])
  assert (two_d & neighbours).sum() > 0.8 * two_d.sum()


def _mask_config(**fields):
  return ml_collections.ConfigDict(dict(dict(
      mask_ratio=0.3, mask_ratio_spread=0.2, masked_crop_fraction=0.5,
      mask_aspect_ratio=(0.3, 1 / 0.3)), **fields))


@pytest.mark.slow  # about 12 s: the authors' loop in Python for 2,000 crops
def test_masks_ratio_and_fraction_of_crops_masked():
  """Half the crops unmasked, the others at most r L patches with r in [0.1, 0.5], on average
  as much as the authors' loop with its own random draws (their `random` module)."""
  rows, grid = 1024, (7, 7)
  masks = np.asarray(jax.jit(lambda k: block_masks(k, 2, rows, grid, _mask_config(), 0))(
      jax.random.PRNGKey(0)))
  counts = masks.sum(axis=1)
  masked = counts > 0
  # Binomial(2048, 1/2): 4 standard deviations are 0.044.
  assert abs(masked.mean() - 0.5) < 0.045, masked.mean()
  assert counts.max() <= 0.5 * 49 and counts[masked].min() >= 1
  # The authors' loop, their draws: mean masked count of masked crops.
  import random
  random.seed(0)
  reference = []
  for _ in range(2000):
    high = random.uniform(0.1, 0.5) * 49
    mask = np.zeros((7, 7), bool)
    count = 0
    while count < high:
      delta = 0
      for _ in range(10):
        area = random.uniform(4, high - count)
        aspect = math.exp(random.uniform(math.log(0.3), math.log(1 / 0.3)))
        bh, bw = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if bw < 7 and bh < 7:
          top, left = random.randint(0, 7 - bh), random.randint(0, 7 - bw)
          new = bh * bw - mask[top:top + bh, left:left + bw].sum()
          if 0 < new <= high - count:
            mask[top:top + bh, left:left + bw] = True
            delta = new
        if delta > 0:
          break
      if delta == 0:
        break
      count += delta
    reference.append(count)
  reference = np.asarray(reference, np.float64)
  standard_error = math.hypot(reference.std() / math.sqrt(len(reference)),
                              counts[masked].std() / math.sqrt(masked.sum()))
  assert abs(counts[masked].mean() - reference.mean()) < 4 * standard_error, (
      counts[masked].mean(), reference.mean())
  # Every crop masked with a fixed ratio (no spread): exactly that many when it is reachable.
  fixed = np.asarray(block_masks(jax.random.PRNGKey(1), 1, 64, grid,
                                 _mask_config(masked_crop_fraction=1.0, mask_ratio_spread=0.0,
                                              mask_ratio=8 / 49), 0))
  assert np.all(fixed.sum(axis=1) <= 8) and np.mean(fixed.sum(axis=1) == 8) > 0.9


def test_masks_follow_the_global_row_on_any_number_of_devices():
  """Each device's rows get the masks of those rows of the whole batch; the view and the
  example both change the mask; the same key gives the same masks."""
  rows, grid, config = 64, (7, 7), _mask_config(masked_crop_fraction=1.0)
  key = jax.random.PRNGKey(5)
  masks = jax.jit(lambda k, first_row: block_masks(k, 2, 16, grid, config, first_row))
  whole = np.asarray(jax.jit(lambda k: block_masks(k, 2, rows, grid, config, 0))(key))
  mesh = parallel.make_mesh(8)
  axis = parallel.DATA_AXIS
  # The local rows come back per device, view-major: reorder to views of the whole batch.
  sharded = jax.jit(jax.shard_map(
      lambda x: block_masks(key, 2, x.shape[0], grid, config, axis_name=axis)[None],
      mesh=mesh, in_specs=P(axis), out_specs=P(axis)))(jnp.zeros((rows,)))
  per_device = np.asarray(sharded).reshape(8, 2, rows // 8, -1)
  np.testing.assert_array_equal(per_device.transpose(1, 0, 2, 3).reshape(2 * rows, -1), whole)
  # A micro-batch of rows 16..31 passes its first row.
  part = np.asarray(masks(key, 16)).reshape(2, 16, -1)
  np.testing.assert_array_equal(part, whole.reshape(2, rows, -1)[:, 16:32])
  np.testing.assert_array_equal(masks(key, 16), part.reshape(32, -1))  # deterministic
  assert np.any(np.asarray(masks(jax.random.PRNGKey(6), 16)) != part.reshape(32, -1))
  views = whole.reshape(2, rows, -1)
  assert np.mean(np.any(views[0] != views[1], axis=1)) > 0.9
  assert len({m.tobytes() for m in views[0]}) > 0.9 * rows


# ------------------------------------------------------------------------------------------
# The network


def test_masked_patches_are_invisible_and_the_vit_stays_plain():
  config = _config()
  method = build_method(config)
  encoder = build_encoder(config.model)
  plain = jax.jit(encoder.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)))['params']
  # The mask token is the network's; the encoder's parameters are exactly a plain ViT's.
  params = jax.eval_shape(method.init, jax.random.PRNGKey(0), jnp.zeros((2, 16, 16, 1)))[0]
  assert params['mask_token'].shape == (1, 16)
  assert jax.tree.map(np.shape, params['encoder']) == jax.tree.map(np.shape, plain)
  token = jax.random.normal(jax.random.PRNGKey(1), (1, 16))
  run = jax.jit(lambda x, mask: encoder.apply({'params': plain}, x, train=False, tokens=True,
                                              mask=mask, mask_token=token))
  x = jax.random.uniform(jax.random.PRNGKey(2), (2, 16, 16, 1))
  mask = np.zeros((2, 16), bool)
  mask[0, [0, 5]] = True   # patch 5: rows 4-7, columns 4-7
  mask[1, 15] = True
  moved = x.at[0, 4:8, 4:8].add(1.0).at[1, 12:, 12:].add(1.0)
  np.testing.assert_allclose(run(moved, mask), run(x, mask), rtol=1e-6, atol=1e-6)
  # ... whereas unmasked pixels count, and without the mask the same change shows.
  assert np.abs(run(x.at[0, 8:12, 0:4].add(1.0), mask) - run(x, mask)).max() > 1e-3
  no_mask = np.zeros((2, 16), bool)
  assert np.abs(run(moved, no_mask) - run(x, no_mask)).max() > 1e-3
  # The token replaces the patch embedding before the position embedding: a masked patch is
  # the token plus its position's embedding, so two masked patches still differ.
  all_masked = run(x, np.ones((2, 16), bool))
  np.testing.assert_allclose(all_masked[0], all_masked[1], rtol=1e-6, atol=1e-6)
  assert np.abs(all_masked[0, 1] - all_masked[0, 2]).max() > 1e-3


@pytest.mark.parametrize('shared', [True, False])
def test_head_is_dinos_head_on_every_token(shared):
  """IBOTHead is DINOHead (models/dino_head.py) run on the class features and on every patch
  token with one MLP: its class outputs are DINOHead's with the same parameters, its patch
  outputs DINOHead's on each token with `patch_last_layer` (if not shared) as the last layer.
  Catches a second MLP for the patches and a head that drifts from DINO's."""
  features = jax.random.normal(jax.random.PRNGKey(0), (3, 12))
  patches = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 12))
  sizes = dict(output_dim=10, hidden_dim=20, bottleneck_dim=8, num_layers=3)
  head = IBOTHead(patch_output_dim=7, shared=shared, norm_last_layer=False, **sizes)
  params = head.init(jax.random.PRNGKey(2), features, patches)['params']
  layers = {'Dense_0', 'Dense_1', 'Dense_2', 'last_layer'}
  assert set(params) == (layers if shared else layers | {'patch_last_layer'})
  cls_out, patch_out = head.apply({'params': params}, features, patches)
  dino = lambda k: DINOHead(norm_last_layer=False, **dict(sizes, output_dim=k))  # noqa: E731
  mlp = {name: params[name] for name in ('Dense_0', 'Dense_1', 'Dense_2')}
  np.testing.assert_allclose(cls_out, dino(10).apply(
      {'params': dict(mlp, last_layer=params['last_layer'])}, features), rtol=1e-6)
  patch_layer = params['last_layer'] if shared else params['patch_last_layer']
  expected = dino(10 if shared else 7).apply(
      {'params': dict(mlp, last_layer=patch_layer)}, patches.reshape(10, 12))
  assert patch_out.shape == (2, 5, 10 if shared else 7)
  np.testing.assert_allclose(patch_out.reshape(10, -1), expected, rtol=1e-6)


@pytest.mark.slow  # 7-20 s each: the multi-crop network's init, student and teacher
@pytest.mark.parametrize('shared, shared_teacher', [(True, True), (False, True),
                                                    (False, False)])
def test_heads_shared_or_separate(shared, shared_teacher):
  """shared_head: one last layer for both token kinds; otherwise the student's patches get
  their own. A teacher that shares (the reference's default) reads the moving average of the
  class token's layer for its patches, and then num_patch_prototypes is ignored (K' = K, the
  reference's `same_dim`); one that does not has its own, num_patch_prototypes wide."""
  config = _config(shared_head=shared, shared_head_teacher=shared_teacher,
                   num_patch_prototypes=32)
  width = 32 if not (shared or shared_teacher) else 64
  method, params, _, target, state = mh.init_method(config)
  head = params['head']
  # Zeros at first, as the reference's masked_embed.
  np.testing.assert_array_equal(params['mask_token'], np.zeros((1, 16)))
  assert ('patch_last_layer' in head) != shared
  assert state['patch_center'].shape == (width,)
  frozen = {path for path in method.frozen_steps() if path[0] == 'head'}
  assert frozen == ({('head', 'last_layer')} if shared else
                    {('head', 'last_layer'), ('head', 'patch_last_layer')})
  # Masks and drop path off: student and teacher (a copy of it) then see the same crops.
  config.method.masked_crop_fraction = 0.0
  config.model.drop_path_rate = 0.0
  method = build_method(config)
  views = mh.make_views(config, method, BATCH)
  out, _ = method.forward(params, {}, views, jax.random.PRNGKey(0), None, 0)
  teacher, _ = method.target_forward(target, {}, state, views, None, None, 0)
  assert out['student_patch'][0].shape == teacher['teacher_patch'][0].shape == (BATCH, 16, width)
  np.testing.assert_allclose(out['student'][1], teacher['teacher'][1], rtol=1e-5, atol=1e-6)
  same = np.abs(out['student_patch'][1] - teacher['teacher_patch'][1]).max() < 1e-5
  assert same == (shared or not shared_teacher)
  if shared_teacher and not shared:
    # The teacher's patches are the student's with the class token's layer swapped in.
    swapped = dict(params, head=dict(head, patch_last_layer=head['last_layer']))
    out, _ = method.forward(swapped, {}, views, jax.random.PRNGKey(0), None, 0)
    np.testing.assert_allclose(out['student_patch'][1], teacher['teacher_patch'][1],
                               rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Devices, resume, config


@pytest.mark.slow  # about 90 s on 2 busy cores: three compilations of the multi-crop step
def test_devices_agree_multicrop():
  """8 devices == 1 device == float64: loss, gradients (mask token included), metrics and
  both centres, at step 1 of the temperatures' warm-up, with drop path in the student (its
  masks are drawn in float32 in the float64 reference too: models.vit.drop_path_mask)."""
  config = _config(masked_crop_fraction=0.75, teacher_temperature_start=0.04,
                   teacher_temperature=0.07, teacher_patch_temperature=0.07,
                   teacher_warmup_epochs=4.0)
  config.model.drop_path_rate = 0.3
  ref = mh.check_devices_agree(config, num_devices=8, batch_size=BATCH, steps=(1,))
  loss, grads, metrics, _, state = ref
  assert metrics['masked_fraction'] > 0.05
  assert np.abs(grads['mask_token']).max() > 0
  assert np.abs(state['patch_center']).max() > 0 and np.abs(state['center']).max() > 0


@pytest.mark.slow  # about 45 s: three short training runs
def test_resumed_run_ends_with_identical_state(tmp_path):
  """Both centres, the teacher and the mask token survive a checkpoint exactly."""
  config = _config()
  config.augment.num_local_crops = 0  # resume does not depend on them; compiles faster
  config.eval.final_bank_size, config.eval.final_test_size = 100, 50
  straight, _ = train.train_and_evaluate(config, str(tmp_path / 'straight'))
  first, _ = train.train_and_evaluate(config, str(tmp_path / 'resumed'), stop_at_step=2)
  resumed, results = train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  # It restored step 2 and trained the 2 steps left (not from scratch).
  assert results['restored_step'] == 2 and results['steps_run'] == 2
  assert int(resumed.step) == int(straight.step) == 4
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed), jax.device_get(straight))
  # Not vacuous: steps 3 and 4 moved both centres and the teacher.
  for name in ('center', 'patch_center'):
    assert np.abs(np.asarray(straight.method_state[name] - first.method_state[name])).max() > 0
  assert max(float(np.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(straight.target_params), jax.tree.leaves(first.target_params))) > 0


def test_config_errors_name_the_fix():
  config_lib.validate(mh.load_config('ibot'), 8)
  config_lib.validate(mh.load_config('ibot', 'dataset=tfds:imagenet2012'), 8)
  convnet = mh.load_config('ibot', 'backbone=convnet')
  with pytest.raises(config_lib.ConfigError, match='use a vit_\\* backbone'):
    config_lib.validate(convnet, 8)
  c = mh.load_config('ibot')
  m = c.method
  m.mask_ratio, m.mask_ratio_spread = 0.1, 0.2
  m.masked_crop_fraction = 1.5
  m.mask_aspect_ratio = (2.0, 0.5)
  m.teacher_patch_temperature = 0.0
  m.shared_head, m.shared_head_teacher = True, False
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(c, 8)
  message = str(error.value)
  for expected in ('method.mask_ratio=0.1 +- mask_ratio_spread=0.2 must stay within [0, 1]',
                   'method.masked_crop_fraction=1.5 must be in [0, 1]',
                   'method.mask_aspect_ratio=(2.0, 0.5) must be (low, high)',
                   'method.teacher_patch_temperature must be positive',
                   'set shared_head_teacher=True'):
    assert expected in message, message


def test_recipes():
  """The paper's ViT-S/16 run and the CPU default."""
  paper = mh.load_config('ibot', 'dataset=tfds:imagenet2012')
  m = paper.method
  assert paper.model.name == 'vit_small' and paper.model.patch_size == 16
  assert paper.augment.crop_size == 224 and paper.augment.local_crop_size == 96
  assert paper.augment.num_local_crops == 10 and paper.batch_size == 1024
  assert paper.num_epochs == 800 and paper.optimizer.base_lr == 0.0005
  assert (m.num_prototypes, m.num_patch_prototypes) == (8192, 8192) and m.shared_head
  assert (m.teacher_patch_temperature_start, m.teacher_patch_temperature) == (0.04, 0.07)
  assert (m.mask_ratio, m.mask_ratio_spread, m.masked_crop_fraction) == (0.3, 0.2, 0.5)
  cpu = mh.load_config('ibot')
  assert cpu.model.name == 'vit_micro' and cpu.model.vit_pool == 'cls'
  assert cpu.augment.crop_size // cpu.model.patch_size == 4 and cpu.num_epochs == 4
  # configs/dino.py's CPU teacher (no temperature warm-up, momentum 0.99), a sharper class
  # token's, main_ibot.py's lr and normalised last layer.
  m = cpu.method
  assert (m.teacher_temperature_start, m.teacher_temperature, m.teacher_patch_temperature_start,
          m.teacher_patch_temperature, m.target_momentum) == (0.02, 0.02, 0.04, 0.04, 0.99)
  assert m.norm_last_layer and cpu.optimizer.base_lr == 0.0005
  assert cpu.augment.num_local_crops == 0 and m.num_prototypes == 1024
