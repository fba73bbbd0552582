"""Shared checks for every method: the sharded loss and gradients against one device, and a
short training run on Fashion-MNIST. Each method's test file calls these."""

from __future__ import annotations

import contextlib
import functools
import importlib
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ssl_jax import experiment, models, parallel
from ssl_jax.data import augment
from ssl_jax.methods import RunLength, build_method

def load_config(name: str, arg: str | None = None):
  """configs/<name>.py's get_config(arg); LiT's locks the image tower of `lit_tower_workdir`
  unless `arg` names one."""
  if name == 'lit' and 'image_tower=' not in (arg or ''):
    arg = ','.join(filter(None, [f'image_tower={lit_tower_workdir()}', arg]))
  return importlib.import_module(f'ssl_jax.configs.{name}').get_config(arg)


@functools.cache
def lit_tower_workdir() -> str:
  """A workdir of SimCLR on the `shrink` ConvNet trained for one step (made once per test
  process): the image tower that LiT's configs lock in tests."""
  import tempfile
  from ssl_jax.train import train_and_evaluate
  workdir = tempfile.mkdtemp(prefix='ssl_jax_lit_tower_')
  config = shrink(load_config('simclr'))
  config.total_steps = config.checkpoint_every_steps = 1
  config.eval.final_bank_size, config.eval.final_test_size = 100, 50
  train_and_evaluate(config, workdir)
  return workdir


def random_captions(config, batch_size: int, seed: int = 0) -> np.ndarray:
  """int32 [batch, K, L] token ids of random captions (byte ids 2-257, an end-of-text token,
  padding), K and L from `config.text`: what a caption source gives image-text methods."""
  t = config.text
  rng = np.random.default_rng(seed + 1000)
  k, length = t.captions_per_image, t.context_length
  tokens = rng.integers(2, 258, (batch_size, k, length)).astype(np.int32)
  ends = rng.integers(1, length, (batch_size, k))
  positions = np.arange(length)
  tokens[positions >= ends[..., None]] = 0
  np.put_along_axis(tokens, ends[..., None], 1, axis=-1)
  return tokens


# The training set size that methods with per-example state (DeepCluster-v2's memory bank)
# are built for when a test gives no RunLength; 'index' inputs are drawn from it.
NUM_EXAMPLES = 1024


def paired_inputs(config, method, batch_size: int, seed: int = 0) -> tuple:
  """The batch's arrays that `method.paired_inputs` names: random captions, or distinct
  random record indices below `NUM_EXAMPLES`."""
  arrays = {'texts': lambda: random_captions(config, batch_size, seed),
            'index': lambda: np.random.default_rng(seed + 2000).permutation(
                NUM_EXAMPLES)[:batch_size].astype(np.int32)}
  return tuple(arrays[name]() for name in method.paired_inputs)


def shrink(config, batch_size: int = 32, crop: int = 12):
  """The method's config on a tiny ConvNet: trains a few steps in seconds on CPU."""
  config.batch_size = batch_size
  config.model.name = 'convnet'
  config.model.widths = (4, 8)
  config.model.convs_per_stage = 1
  config.augment.crop_size = crop
  config.eval.image_size = crop
  config.total_steps = 4
  config.log_every_steps = 2
  config.checkpoint_every_steps = 2
  config.eval_every_steps = 0
  config.eval.final_bank_size = 500
  config.eval.final_test_size = 100
  config.eval.baselines = False
  config.eval.diagnostics = config.eval.plots = False  # tests that check them turn them on
  return config


# Width 16, depth 2, 2 heads: a ViT that compiles in seconds (`tiny_vit_config`).
TINY_VIT = functools.partial(models._vit, 16, 2, 2)  # pylint: disable=protected-access


def tiny_vit_registered():
  """A context in which model.name='vit_test' builds `TINY_VIT`."""
  return mock.patch.dict(models.ENCODERS, {'vit_test': TINY_VIT})


def tiny_vit_config(name: str, drop_path_rate: float = 0.0, batch_size: int = 32):
  """configs/<name>.py with a ViT, shrunk: the tiny ViT ('vit_test', inside
  `tiny_vit_registered`) on 16-pixel crops, small heads, two local crops for multi-crop
  methods, no colour augmentation (compile time, and nothing the ViT tests need)."""
  config = shrink(load_config(name, 'backbone=vit_tiny'), batch_size=batch_size, crop=16)
  config.model.name = 'vit_test'
  config.model.patch_size = 4
  # Mean-pooled: see test_vit.py's train-step test (the class token at initialisation is
  # ill-conditioned in float32 behind a BatchNorm projector).
  config.model.vit_pool = 'gap'
  config.model.drop_path_rate = drop_path_rate
  m = config.method
  for field, value in (('projector_hidden_dim', 32), ('projector_output_dim', 16),
                       ('predictor_hidden_dim', 32), ('num_prototypes', 64)):
    if field in m:
      m[field] = value
  if config.augment.num_local_crops:
    config.augment.num_local_crops = 2
  config.augment.jitter_prob = config.augment.grayscale_prob = config.augment.blur_prob = 0.0
  return config


def init_method(config, run_length: RunLength | None = None, seed: int = 0):
  """(method, params, batch_stats, target_params, method_state) at initialisation."""
  if run_length is None:
    run_length = RunLength(total_steps=max(1, config.total_steps), steps_per_epoch=1,
                           num_examples=NUM_EXAMPLES)
  method = build_method(config, run_length)
  size = config.augment.crop_size
  params, batch_stats, method_state = jax.jit(
      lambda r: method.init(r, jnp.zeros((2, size, size, 1))))(jax.random.PRNGKey(seed))
  target = method.init_target(params)
  return method, params, batch_stats, target, method_state


def make_views(config, method, batch_size: int, seed: int = 0) -> list[jnp.ndarray]:
  """The trainer's views (global, then local crops) of random uint8 images, then the
  method's paired inputs (random captions)."""
  images = np.random.default_rng(seed).integers(0, 256, (batch_size, 16, 16, 1), np.uint8)
  cfgs = augment.view_configs(config.augment, method.num_views)
  views = augment.augment_views(jax.random.PRNGKey(seed), jnp.asarray(images), cfgs)
  return views + [jnp.asarray(x) for x in paired_inputs(config, method, batch_size, seed)]


def sharded_loss_and_grads(method, params, batch_stats, target_params, method_state, views,
                           num_devices: int, step: int = 0, rng=None):
  """method.loss under shard_map over `num_devices` devices (views split by rows), and the
  gradient with respect to params, exactly as the train step computes them.

  Returns (loss, grads, metrics, new_batch_stats, new_method_state), all on the host.
  num_devices=0 runs the loss without shard_map (axis_name=None): the plain reference.
  """
  rng = jax.random.PRNGKey(1) if rng is None else rng
  step = jnp.asarray(step, jnp.int32)
  if num_devices == 0:
    def loss_fn(p):
      return method.loss(p, batch_stats, target_params, method_state, views, rng, step, None)
  else:
    mesh = parallel.make_mesh(num_devices)
    axis = parallel.DATA_AXIS
    sharded = jax.shard_map(
        lambda p, b, t, s, v, r, k: method.loss(p, b, t, s, v, r, k, axis), mesh=mesh,
        in_specs=(P(), P(), P(), P(), P(axis), P(), P()), out_specs=(P(), (P(), P(), P())))

    def loss_fn(p):
      return sharded(p, batch_stats, target_params, method_state, views, rng, step)
  (loss, (metrics, new_stats, new_state)), grads = jax.jit(
      jax.value_and_grad(loss_fn, has_aux=True))(params)
  return jax.device_get((loss, grads, metrics, new_stats, new_state))


def assert_trees_close(actual, expected, rtol=1e-5, atol=1e-6, what=''):
  flat_a = jax.tree_util.tree_leaves_with_path(actual)
  flat_e = jax.tree.leaves(expected)
  assert len(flat_a) == len(flat_e), f'{what}: trees differ in size'
  for (path, a), e in zip(flat_a, flat_e):
    e = np.asarray(e)
    # float32 sums taken in a different order (per device, then across devices) differ by a
    # few ulps of the *largest* terms, so the absolute slack scales with the leaf's size.
    scale = float(np.abs(e).max()) if e.size and np.issubdtype(e.dtype, np.floating) else 0.0
    np.testing.assert_allclose(np.asarray(a), e, rtol=rtol, atol=atol + rtol * scale,
                               err_msg=f'{what}{jax.tree_util.keystr(path)}')


# Unit roundoff of float32: one rounding moves a value by at most this fraction of itself.
F32_ROUNDOFF = 2.0 ** -24


@contextlib.contextmanager
def float64_computation():
  """Traces ssl_jax's float32 code in float64: x64 on, the model's compute dtype 'float64',
  and the explicit `jnp.float32` casts of the heads, encoders and losses turned into float64
  casts while the context is open (only tracing happens here: jit each function inside it).
  The float64 result is a reference whose own rounding (2^-53) is negligible next to float32's,
  so comparing a float32 run with it measures that run's error alone."""
  with jax.enable_x64(True), \
      mock.patch.dict(models.DTYPES, {'float64': jnp.float64}), \
      mock.patch.object(jnp, 'float32', jnp.float64):
    yield


def to_float64(tree):
  """Floating leaves as float64 jax arrays (exact), other leaves (ints, keys) unchanged. Call it
  inside `float64_computation` (outside, jax would truncate them back to float32)."""
  def cast(x):
    x = np.asarray(x)
    return jnp.asarray(x, np.float64) if np.issubdtype(x.dtype, np.floating) else jnp.asarray(x)
  return jax.tree.map(cast, tree)


def float64_method(config, run_length: RunLength | None = None):
  """The method of `config` computing in float64 (use it inside `float64_computation`)."""
  config = config.copy_and_resolve_references()
  config.model.dtype = 'float64'
  with float64_computation():
    return build_method(config, run_length)


def reduction_length(views) -> int:
  """R, the number of terms of the step's longest sums: every pixel position of every view of
  the global batch (a first-layer kernel gradient sums over all of them; BN statistics and
  batch means sum over the rows, fewer)."""
  return int(sum(np.prod(np.shape(v)[:3]) for v in views))


def float32_tolerance(reference, length: int):
  """Per-leaf absolute tolerance for a float32 computation of `reference` (float64) whose
  sums have at most `length` terms; one number per leaf, the same tree structure.

  tol = u (R max|leaf| + sqrt(R) max|tree|), u = 2^-24, R = `length`:
  - u R max|leaf| is the classical worst-case bound gamma_R ~ R u of an R-term float32 sum,
    relative to the leaf's size. It stands in for the true bound u R sum|terms| (not
    computable here: with BatchNorm the gradient is no sum of per-example terms), and its
    worst-case R (against the sqrt(R) typical of rounding errors) is the margin for the
    backward pass's cancellations: measured errors of 1 and 8 devices against float64 are
    30-850 u max|leaf| (850 on the slower CI CPU, 3.5x this machine's), R = 9216 for
    SimSiam's 2 x 32 views of 12 x 12 pixels, so a 10x margin on the slowest CPU seen;
  - u sqrt(R) max|tree| covers leaves that cancel to ~0 (running mean of batch-normalised
    features, a mean cosine near 0): the typical (random-walk) error of an R-term sum whose
    terms are no larger than the tree's largest entry.
  A cross-device bug (a local instead of a global mean, a missing psum or gather) changes
  results by a sizeable fraction of themselves, 1e-3 to 1: 2 to 4 orders above R u = 5.5e-4
  for SimSiam, and the tests planting such bugs fail (see tests/test_train_step.py's module
  docstring)."""
  leaves = [np.asarray(x) for x in jax.tree.leaves(reference)]
  floats = [x for x in leaves if np.issubdtype(x.dtype, np.floating) and x.size]
  tree_max = max((float(np.abs(x).max()) for x in floats), default=0.0)
  def tol(x):
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating) or not x.size:
      return 0.0
    return F32_ROUNDOFF * (length * float(np.abs(x).max()) + np.sqrt(length) * tree_max)
  return jax.tree.map(tol, reference)


def assert_close_to_float64(actual, reference, length: int, what='', tolerance=None):
  """Every leaf of the float32 `actual` within `float32_tolerance` of the float64 `reference`
  (or within `tolerance`, a tree of per-leaf numbers, if given); integer leaves equal."""
  tols = float32_tolerance(reference, length) if tolerance is None else tolerance
  flat_a = jax.tree_util.tree_leaves_with_path(actual)
  flat_r, flat_t = jax.tree.leaves(reference), jax.tree.leaves(tols)
  assert len(flat_a) == len(flat_r), f'{what}: trees differ in size'
  for (path, a), r, t in zip(flat_a, flat_r, flat_t):
    a, r = np.asarray(a), np.asarray(r)
    msg = f'{what}{jax.tree_util.keystr(path)}'
    if np.issubdtype(r.dtype, np.floating):
      np.testing.assert_allclose(a, r, rtol=0, atol=t, err_msg=msg)
    else:
      np.testing.assert_array_equal(a, r, err_msg=msg)


def float64_loss_and_grads(config, params, batch_stats, target_params, method_state, views,
                           step: int = 0, rng=None, run_length: RunLength | None = None):
  """`sharded_loss_and_grads(..., num_devices=0)`, the shard_map-free loss and gradient, in
  float64 on the float64 images of the same float32 inputs."""
  method = float64_method(config, run_length)
  with float64_computation():
    out = sharded_loss_and_grads(method, *to_float64(
        (params, batch_stats, target_params, method_state, list(views))), 0, step, rng)
  # The loss, hence its gradient, was computed in float64 to the end (constants such as a
  # schedule's value in the metrics may stay float32: the run under test has the same).
  assert all(x.dtype == np.float64 for x in jax.tree.leaves(out[:2])), 'not float64'
  return out


def check_devices_agree(config, num_devices=8, batch_size=32, steps=(0,)):
  """Loss, gradients, metrics, BN statistics and method state on `num_devices` devices and on
  one device equal the shard_map-free computation in float64 on the same global batch, within
  the float32 rounding bound of `float32_tolerance` (so within twice that of each other).
  Returns the float64 reference of the last step."""
  method, params, batch_stats, target, state = init_method(config)
  views = make_views(config, method, batch_size)
  length = reduction_length(views)
  for step in steps:
    ref = float64_loss_and_grads(config, params, batch_stats, target, state, views, step)
    one = sharded_loss_and_grads(method, params, batch_stats, target, state, views, 1, step)
    many = sharded_loss_and_grads(method, params, batch_stats, target, state, views,
                                  num_devices, step)
    for name, other in (('1 device', one), (f'{num_devices} devices', many)):
      for i, part in enumerate(('loss', 'grads', 'metrics', 'batch_stats', 'method_state')):
        assert_close_to_float64(other[i], ref[i], length, f'{part}, {name}, step {step}')
    # Not vacuous: the gradient is not zero.
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(ref[1])) > 0
  return ref


def build_experiment(config, num_devices: int, seed: int = 0):
  """The trainer's experiment for `config` on `num_devices` devices, with one-step epochs
  (`total_steps` and warm-up epochs count steps), its initial state and its jitted step."""
  built = experiment.build(config, num_train_examples=config.batch_size, image_channels=1,
                           mesh=parallel.make_mesh(num_devices))
  return built, built.init_state(seed), built.make_train_step()


def random_batch(config, seed: int) -> np.ndarray:
  """A global batch of random 16 x 16 uint8 images."""
  return np.random.default_rng(seed).integers(0, 256, (config.batch_size, 16, 16, 1), np.uint8)


def trainer_steps(config, num_steps, num_devices=2):
  """The real train step on `num_devices` devices; the states before and after each step."""
  built, state, step = build_experiment(config, num_devices)
  states, metrics = [jax.device_get(state)], []
  for i in range(num_steps):
    images, paired = parallel.global_batch_from_host(
        (random_batch(config, i), paired_inputs(config, built.method, config.batch_size, i)),
        built.mesh)
    state, m = step(state, images, paired=paired)
    states.append(jax.device_get(state))  # the step donates its input: keep host copies
    metrics.append(jax.device_get(m))
  return states, metrics


def train_briefly(config, workdir: str, steps: int):
  """Trains `config` for `steps` steps on Fashion-MNIST with the random-init baseline, its
  features globally pooled; returns (final state, results) of `train_and_evaluate`."""
  from ssl_jax.train import train_and_evaluate
  # Scored on globally pooled features, as tests/test_learning.py: the ConvNet's 4 x 4 grid
  # readout makes random features too strong a kNN baseline for a run this short.
  config.model.pool_grid = 1
  config.total_steps = steps
  config.checkpoint_every_steps = steps
  config.log_every_steps = max(1, steps // 4)
  config.eval.baselines = True
  return train_and_evaluate(config, workdir)


def resumed_run_matches_straight_run(config, tmp_path, stop_at_step: int = 2,
                                      total_steps: int = 4):
  """Trains `config` straight, and again stopped at `stop_at_step` then resumed; asserts the
  resumed run restored that checkpoint, trained only the steps left (a restore skipped
  silently would train from scratch and end in the same state) and ends with a state equal
  to the straight run's, bit for bit. Returns (state at the stop, resumed state) on the host
  for the caller's checks that the steps after the stop changed what it resumes."""
  from ssl_jax.train import train_and_evaluate
  straight, _ = train_and_evaluate(config, str(tmp_path / 'straight'))
  first, _ = train_and_evaluate(config, str(tmp_path / 'resumed'), stop_at_step=stop_at_step)
  first = jax.device_get(first)
  resumed, results = train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert results['restored_step'] == stop_at_step
  assert results['steps_run'] == total_steps - stop_at_step
  assert int(resumed.step) == int(straight.step) == total_steps
  resumed = jax.device_get(resumed)
  jax.tree.map(np.testing.assert_array_equal, resumed, jax.device_get(straight))
  return first, resumed


def check_short_lars_run_learns(name: str, workdir: str, **method_fields):
  """200 steps at batch 64 (a fifth of an epoch) of configs/<name>.py's LARS recipe, with what
  such a short run needs; the encoder must keep its spread and beat its random init in kNN."""
  config = shrink(load_config(name), batch_size=64)
  # The recipe's warm-up (1 epoch, 937 steps here) would outlast the run.
  config.optimizer.warmup_epochs = 0.03
  # LARS scales each layer's step to lr x 0.001 of its norm: at the recipe's lr (0.3 x 64 /
  # 256) 200 steps leave the encoder close to its initialisation. lr 1.2, as at batch 1024.
  config.optimizer.base_lr = 4.8
  config.method.update(method_fields)
  # Random-resized crops zoom in, so evaluate at 1.25 x the crop side, as the recipe does.
  config.eval.image_size = 15
  # The trained and random-init scores differ by a few points: 2,000 queries keep the
  # evaluation's own noise (about 1 point) below that.
  config.eval.final_bank_size, config.eval.final_test_size = 10000, 2000
  state, results = train_briefly(config, workdir, 200)
  spread = encoder_spread(config, build_method(config), state)
  print(f'{name}: kNN {results["knn_top1"]:.4f} vs random init '
        f'{results["knn_top1_random_init"]:.4f}, spread {spread:.3f}')
  assert spread > 0.1
  assert results['knn_top1'] > results['knn_top1_random_init']


def encoder_spread(config, method, state, num_images: int = 1000) -> float:
  """Per-dimension std of the l2-normalised features of test images, times sqrt(D): about 1
  for features spread over the sphere, 0 for a collapsed encoder."""
  from ssl_jax.data import pipeline, sources
  from ssl_jax.evaluation import diagnostics, features
  test = sources.get_source(config.data.name, config.data.eval_split)
  images, _ = pipeline.make_eval_arrays(test, max_examples=num_images)
  feats = features.extract_features(
      lambda x: method.encode(state.params, state.batch_stats, x), images,
      config.eval.batch_size, config.eval.image_size or None)
  return float(diagnostics.normalized_std(feats)) * np.sqrt(feats.shape[1])
