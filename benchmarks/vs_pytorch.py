"""JAX vs PyTorch: images/s of the default training step, the same recipe written in both.

  python benchmarks/vs_pytorch.py [--config=configs/simclr.py] [--steps=16] [--warmup_steps=2] \
      [--rounds=4] [--matmul_repeats=20]

Times one optimizer step of a config (by default configs/simclr.py, the Fashion-MNIST CPU
recipe) on one uint8 batch of the dataset's image shape (random pixels; 256 x 28 x 28 x 1),
augmentation included, in three implementations:

- jax: the project's step, built as `ssl_jax.train` builds it (benchmarks/train_throughput.py,
  whose helpers this script reuses): both views augmented inside the jitted step.
- torch (NCHW) and torch (channels-last): the same recipe in eager PyTorch, written below, with
  `torch.set_num_threads(os.cpu_count())`; the second holds the model and its inputs in
  `torch.channels_last`.

The PyTorch recipe mirrors what the default config enables, and refuses configs that enable more:
- Views, two per image, augmented batched on tensors: torchvision's RandomResizedCrop box drawn
  as `augment.sample_crop_box` draws it (scale (0.2, 1), ratio (3/4, 4/3), the first of 10
  attempts that fits, else the central box), resampled to the crop side in one antialiased
  bilinear pass with the weights of `jax.image.scale_and_translate` (two batched matmuls);
  horizontal flip (p = 0.5); colour jitter (p = 0.8) of brightness and contrast in random
  order. On one-channel images saturation, hue and grayscale are identities (the JAX step
  drops them at trace time too), and Gaussian blur's kernel at 16 pixels is one tap (10 % of
  the side, made odd), an identity, so neither side does any of these; no solarisation.
- Network: all views as one batch (BatchNorm normalises both views with the same statistics):
  the ConvNet (`models/convnet.py`: per stage, 3x3 conv without bias -> BatchNorm -> ReLU, two
  per stage, widths 16-32-64, 2x2 max-pool between stages, the last stage averaged over the
  config's `model.pool_grid` grid: adaptive average pooling, 4 x 4 in the recipe) and the
  projector (`models/heads.py`: Linear without bias -> BatchNorm -> ReLU, then Linear with bias
  to 128, no last BatchNorm); BatchNorm momentum 0.1 (flax's 0.9) and eps 1e-5; flax's
  initialisers.
- Loss: NT-Xent at temperature 0.1 over the 2 x 256 views (`losses/info_nce.py`).
- Optimizer: LARS as `optax.lars` in `ssl_jax/optim.py`: weight decay 1e-6 and the trust ratio
  (coefficient 1e-3, eps 0) on conv kernels and linear weights only, then the learning rate,
  then momentum 0.9 on the scaled update; learning rates from the project's schedule.

Known differences, none of which changes the work by more than a trifle: the random streams
differ (the distributions do not); the JAX step also computes the metrics it logs (cosines,
contrastive accuracy, gradient norm: a few reductions); PyTorch keeps BatchNorm's running
variance unbiased, flax biased. Given the same parameters and views, the two give the same
crops, jitter, loss and LARS update up to float32 rounding.

Timing: each implementation first runs `warmup_steps` untimed steps, then its `steps` timed
steps in `rounds` blocks, the implementations taking turns block by block (each block after the
first begins with one untimed step), so that a change in the machine's speed during the run
(other work, frequency) reaches all of them alike. The PyTorch steps run in a process of their
own (spawned; JAX's in this one): in one process, the JAX step timed 15-18 % slower between
PyTorch's blocks than alone (133.3 against 113.0-113.5 ms, issue 14's session of 2026-12-03),
and as fast as alone with `OMP_WAIT_POLICY=PASSIVE`, which in turn slowed PyTorch's
channels-last step from 67-70 to 86 ms: PyTorch's OpenMP threads, which spin while they wait
by default, took cores from XLA's. Machines of this class differ by up to 2x,
so only the ratios of one run are meaningful. Prints a table (median step time, images/s,
JAX/torch ratio of images/s, and the JAX step's MFU against the float32 matmul peak measured in
the same run), then the same figures as one JSON line.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time

# train_throughput.py, next to this file, puts the repository root on sys.path (ssl_jax and
# configs import from there) and defines the flags shared with it: --config, --steps,
# --warmup_steps and --matmul_repeats.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_throughput  # noqa: E402
from absl import app, flags  # noqa: E402

from ssl_jax.data import host_crop  # noqa: E402  (numpy only: jax is imported after the flags)

try:
  import torch
  import torch.nn.functional as F
  from torch import nn
except ImportError:  # only the JAX step is timed then (TORCH_MISSING)
  torch = None

FLAGS = flags.FLAGS
# Fewer than train_throughput's defaults: a torch step takes about a second on two cores, and
# the whole comparison should take about two minutes there.
FLAGS.set_default('steps', 16)
FLAGS.set_default('warmup_steps', 2)
flags.DEFINE_integer('rounds', 4, 'Blocks that each implementation\'s timed steps are split '
                     'into, the implementations taking turns block by block.', lower_bound=1)

TORCH_MISSING = ('PyTorch is not installed, so only the JAX step was timed; to compare: '
                 'pip install torch==2.13.0')
JAX, TORCH_NCHW, TORCH_CHANNELS_LAST = 'jax', 'torch (NCHW)', 'torch (channels-last)'
# The standard deviation of a unit normal truncated to [-2, 2], by which flax's truncated
# normal initialisers widen theirs.
TRUNCATED_NORMAL_STD = 0.87962566103423978


# -----------------------------------------------------------------------------------------------
# JAX: the project's step


class JaxStep:
  """The project's compiled train step on the synthetic batch, with what is compared."""

  def __init__(self, config):
    import jax
    import jax.numpy as jnp
    from ssl_jax import config_lib, experiment, optim, parallel
    from ssl_jax.methods.common import encoder_with_projector

    config_lib.validate(config, jax.device_count(), jax.process_count())
    mesh = parallel.make_mesh()
    train_step, self.state = train_throughput.build_step(config, mesh)
    self.images, self.labels = train_throughput.synthetic_batch(config, mesh)
    self.compiled, self.compile_s, self.flops = train_throughput.compile_step(
        train_step, self.state, self.images, self.labels)

    self.num_params = sum(x.size for x in jax.tree.leaves(self.state.params))
    side, channels = config.augment.crop_size, self.images.shape[-1]
    features, z = jax.eval_shape(
        lambda variables, x: encoder_with_projector(config, None).apply(variables, x, False),
        {'params': self.state.params, 'batch_stats': self.state.batch_stats},
        jax.ShapeDtypeStruct((1, side, side, channels), jnp.float32))
    self.feature_dim, self.projection_dim = features.shape[-1], z.shape[-1]

    # The learning rates of the schedule that build_step's optimizer follows, for the torch
    # optimizer to take the same ones.
    total, warmup = experiment.schedule_steps(config, config.batch_size * 1000)
    schedule = optim.learning_rate_schedule(config.optimizer, config.batch_size, total, warmup)
    self.learning_rates = jax.device_get(schedule(jnp.arange(total))).tolist()

  def run(self, steps: int, warmup_steps: int) -> list[float]:
    import jax
    import jax.numpy as jnp

    # The step donates its state, so every block starts from a copy of the initial one: the
    # state's values (step count, learning rate) do not change the step's cost.
    state = jax.tree.map(jnp.copy, self.state)
    return train_throughput.time_steps(self.compiled, state, self.images, self.labels, steps,
                                       warmup_steps)


# -----------------------------------------------------------------------------------------------
# PyTorch: the same recipe


def torch_recipe_problems(config, channels: int, platform: str) -> list[str]:
  """What in `config` the PyTorch recipe below does not implement."""
  from ssl_jax.data import augment

  a = config.augment
  blur_kernel = a.get('blur_kernel_size', 0) or augment.default_blur_kernel_size(a.crop_size)
  checks = [
      (platform == 'cpu', f'JAX runs on {platform} and torch on the CPU: set JAX_PLATFORMS=cpu.'),
      (config.method.name == 'simclr' and config.method.get('negatives', 'uniform') == 'uniform',
       'method: only SimCLR with NT-Xent (negatives=uniform).'),
      (config.model.name == 'convnet', 'model.name: only convnet.'),
      (config.model.dtype == 'float32', 'model.dtype: only float32.'),
      (config.model.get('head_norm', 'batch') == 'batch', 'model.head_norm: only batch.'),
      (config.optimizer.name == 'lars', 'optimizer.name: only lars.'),
      (config.get('microbatches', 1) == 1, 'microbatches: only 1.'),
      (not config.eval.get('online_probe', False), 'eval.online_probe: not implemented.'),
      (channels == 1, f'{channels}-channel images: only one channel (no saturation, hue, '
       'grayscale).'),
      (blur_kernel == 1 or a.blur_prob <= 0, f'blur: a {blur_kernel}-tap kernel is not '
       'implemented (only the identity of one tap).'),
      (a.solarize_prob <= 0, 'augment.solarize_prob: only 0.'),
      (not a.num_local_crops and not a.get('per_view'),
       'augment: no local crops, no per-view settings.'),
  ]
  return [problem for ok, problem in checks if not ok]


def torch_network(config, channels: int):
  """(encoder, projector): `config`'s ConvNet and projection MLP as torch modules, initialised
  with flax's initialisers so that both sides start from the same distribution."""
  m, p = config.model, config.method
  layers, width_in = [], channels
  for i, width in enumerate(m.widths):
    if i > 0:
      layers.append(nn.MaxPool2d(2))
    for _ in range(m.convs_per_stage):
      conv = nn.Conv2d(width_in, width, 3, padding=1, bias=False)
      # flax's variance_scaling(2, 'fan_out', 'normal'): untruncated, as torch's.
      nn.init.kaiming_normal_(conv.weight, mode='fan_out', nonlinearity='relu')
      layers += [conv, nn.BatchNorm2d(width, eps=1e-5, momentum=0.1), nn.ReLU(inplace=True)]
      width_in = width
  # models.convnet.grid_average: its cells have adaptive pooling's bounds; the features come
  # channel-major here, cell-major there, a permutation of the projector's inputs.
  grid = m.get('pool_grid', 1)
  layers += [nn.AdaptiveAvgPool2d(grid), nn.Flatten()]
  width_in *= grid * grid

  head = []
  for _ in range(p.get('projector_num_layers', 2) - 1):
    head += [_dense(width_in, p.projector_hidden_dim, bias=False),
             nn.BatchNorm1d(p.projector_hidden_dim, eps=1e-5, momentum=0.1),
             nn.ReLU(inplace=True)]
    width_in = p.projector_hidden_dim
  last_bn = p.get('projector_last_bn', False)
  head.append(_dense(width_in, p.projector_output_dim, bias=not last_bn))
  if last_bn:
    head.append(nn.BatchNorm1d(p.projector_output_dim, eps=1e-5, momentum=0.1, affine=False))
  return nn.Sequential(*layers), nn.Sequential(*head)


def _dense(width_in: int, width_out: int, bias: bool):
  """A linear layer initialised as flax's Dense: lecun_normal (a normal truncated at two of its
  standard deviations, widened to keep the variance 1 / fan_in), zero bias."""
  layer = nn.Linear(width_in, width_out, bias=bias)
  std = width_in**-0.5 / TRUNCATED_NORMAL_STD
  nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
  if bias:
    nn.init.zeros_(layer.bias)
  return layer


def sample_crop_boxes(u, height: int, width: int, scale, ratio):
  """torchvision's RandomResizedCrop boxes, drawn from uniforms u [4, B, attempts] as
  `augment.sample_crop_box` draws them: (top, left, h, w), float32 [B] each."""
  area = height * width * (scale[0] + (scale[1] - scale[0]) * u[0])
  log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
  aspect = torch.exp(log_low + (log_high - log_low) * u[1])
  w = torch.round(torch.sqrt(area * aspect))  # whole pixels, as torchvision crops
  h = torch.round(torch.sqrt(area / aspect))
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  top = _uniform_offset(u[2], height - h + 1)
  left = _uniform_offset(u[3], width - w + 1)
  first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax takes the first maximum
  box = torch.stack([x.gather(1, first)[:, 0] for x in (top, left, h, w)])
  central = torch.tensor(host_crop.central_crop_box(height, width, ratio), dtype=torch.float32)
  return tuple(torch.where(fits.any(dim=1), box, central[:, None]))


def _uniform_offset(u, num_positions):
  n = num_positions.clamp_min(1)
  return torch.minimum(torch.floor(u * n), n - 1)


def resample_weights(start, length, in_size: int, out_size: int):
  """[B, out_size, in_size]: the weights by which `jax.image.scale_and_translate` (bilinear,
  antialiased) resamples the span [start, start + length) of one axis to out_size pixels; the
  same formula, so the crops equal `augment.crop_and_resize`'s."""
  scale = out_size / length
  inv_scale = 1.0 / scale
  translation = -start * scale
  # When downsampling, the triangle widens to low-pass filter (antialiasing).
  kernel_scale = inv_scale.clamp_min(1.0)[:, None, None]
  sample = ((torch.arange(out_size) + 0.5)[None] * inv_scale[:, None]
            - (translation * inv_scale)[:, None] - 0.5)
  weights = (1 - (sample[:, :, None] - torch.arange(in_size)).abs() / kernel_scale).clamp_min(0)
  total = weights.sum(dim=2, keepdim=True)
  weights = torch.where(total.abs() > 1000 * torch.finfo(torch.float32).eps,
                        weights / torch.where(total != 0, total, 1.0), 0.0)
  inside = (sample >= -0.5) & (sample <= in_size - 0.5)
  return weights * inside[:, :, None]


def random_resized_crop(x, a):
  """A random resized crop of each image of x [B, C, H, W], to [B, C, s, s]."""
  batch, _, height, width = x.shape
  u = torch.rand(4, batch, host_crop.CROP_ATTEMPTS)
  top, left, h, w = sample_crop_boxes(u, height, width, a.crop_scale, a.crop_ratio)
  rows = resample_weights(top, h, height, a.crop_size)
  cols = resample_weights(left, w, width, a.crop_size)
  return rows[:, None] @ x @ cols[:, None].transpose(2, 3)


def random_flip(x, p: float):
  flip = torch.rand(x.shape[0]) < p
  return torch.where(flip[:, None, None, None], x.flip(3), x)


def random_jitter(x, a):
  """`augment.color_jitter` on one-channel images: brightness and contrast factors in
  torchvision's ranges, applied in random order, with probability `a.jitter_prob`; each
  adjustment clips to [0, 1], as torchvision's."""
  # Nine uniforms per image, as color_jitter draws: applied or not, four factors (saturation's
  # and hue's unused on one channel), four ranks giving the order of the four adjustments, of
  # which only whether brightness precedes contrast matters here.
  u = torch.rand(x.shape[0], 9, 1, 1, 1)
  brightness = _factor(u[:, 1], a.brightness)
  contrast = _factor(u[:, 2], a.contrast)

  def adjust_brightness(y):
    return (brightness * y).clamp(0, 1)

  def adjust_contrast(y):
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    return (contrast * y + (1 - contrast) * mean).clamp(0, 1)

  jittered = torch.where(u[:, 5] < u[:, 6], adjust_contrast(adjust_brightness(x)),
                         adjust_brightness(adjust_contrast(x)))
  return torch.where(u[:, 0] < a.jitter_prob, jittered, x)


def _factor(u, strength: float):
  # torchvision keeps the multiplicative factors non-negative.
  low, high = max(0.0, 1.0 - strength), 1.0 + strength
  return low + (high - low) * u


def torch_views(images, a, num_views: int = 2) -> list:
  """`num_views` augmented views of a uint8 batch [B, H, W, C]: float32 [B, C, s, s] in [0, 1]."""
  x = images.permute(0, 3, 1, 2).float() / 255.0
  return [random_jitter(random_flip(random_resized_crop(x, a), a.flip_prob), a)
          for _ in range(num_views)]


def nt_xent(z1, z2, temperature: float):
  """`losses.info_nce.nt_xent` on one device: each of the 2N views against the other 2N - 1,
  its positive the other view of its image, averaged over the 2N queries."""
  z = torch.cat([z1, z2])
  q = z * torch.rsqrt(z.square().sum(dim=1, keepdim=True).clamp_min(1e-12))
  logits = (q @ q.T / temperature).fill_diagonal_(-1e9)  # a finite mask, as info_nce's
  positives = torch.arange(z.shape[0]).roll(z1.shape[0])
  return F.cross_entropy(logits, positives)


def lars_update(params, momenta, learning_rate: float, opt) -> None:
  """One step of `optax.lars` as `optim.make_optimizer` configures it: weight decay, then the
  trust ratio, on the parameters of more than one dimension only (`optim.decay_mask`); then
  the learning rate, then momentum (optax.trace) on the scaled update."""
  with torch.no_grad():
    for p, m in zip(params, momenta):
      g = p.grad
      if p.ndim > 1:
        g = g + opt.weight_decay * p
        p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
        ratio = opt.trust_coefficient * p_norm / g_norm  # eps = 0
        g = g * torch.where((p_norm == 0) | (g_norm == 0), 1.0, ratio)
      update = -learning_rate * g
      m.mul_(opt.momentum).add_(update)
      p.add_(update + opt.momentum * m if opt.nesterov else m)


def torch_worker(conn, config, images, learning_rates) -> None:
  """The PyTorch steps of both memory formats, in a process of their own (module docstring):
  sends their model facts and torch's thread count, then runs `(name, steps, warmup_steps)` requests, replying with
  the seconds per timed step, until it receives None."""
  torch.set_num_threads(os.cpu_count())
  steps = {name: TorchStep(config, images, learning_rates, memory_format)
           for name, memory_format in ((TORCH_NCHW, torch.contiguous_format),
                                       (TORCH_CHANNELS_LAST, torch.channels_last))}
  conn.send((model_facts(steps[TORCH_NCHW]), torch.get_num_threads()))
  while (request := conn.recv()) is not None:
    name, steps_to_time, warmup_steps = request
    conn.send(steps[name].run(steps_to_time, warmup_steps))


class TorchProcess:
  """`torch_worker` in a spawned process, with a runner per memory format."""

  def __init__(self, config, images, learning_rates):
    import multiprocessing
    context = multiprocessing.get_context('spawn')  # a fresh interpreter: no JAX threads
    self.conn, child_conn = context.Pipe()
    self.process = context.Process(target=torch_worker, daemon=True,
                                   args=(child_conn, config, images, learning_rates))
    self.process.start()
    self.facts, self.threads = self.conn.recv()

  def runner(self, name: str):
    def run(steps: int, warmup_steps: int) -> list[float]:
      self.conn.send((name, steps, warmup_steps))
      return self.conn.recv()
    return run

  def close(self) -> None:
    self.conn.send(None)
    self.process.join(timeout=60)


class TorchStep:
  """The PyTorch recipe's train step on the same uint8 batch, in one memory format."""

  def __init__(self, config, images, learning_rates: list[float], memory_format):
    self.config, self.memory_format = config, memory_format
    self.images = torch.tensor(images)  # a copy: the host copy of a jax array is read-only
    encoder, projector = torch_network(config, images.shape[-1])
    self.model = nn.Sequential(encoder, projector).to(memory_format=memory_format)
    self.params = list(self.model.parameters())
    self.momenta = [torch.zeros_like(p) for p in self.params]
    self.learning_rates = learning_rates
    self.step_count = 0

    self.num_params = sum(p.numel() for p in self.params)
    side = config.augment.crop_size
    with torch.no_grad():
      features = encoder.eval()(torch.zeros(2, images.shape[-1], side, side))
      projection = projector.eval()(features)
    self.feature_dim, self.projection_dim = features.shape[-1], projection.shape[-1]
    self.model.train()

  def step(self):
    """One step on `self.images`; returns the loss, detached."""
    with torch.no_grad():
      # Both views as one batch, as the JAX step forwards them (methods.common.forward_together).
      x = torch.cat(torch_views(self.images, self.config.augment))
      x = x.to(memory_format=self.memory_format)
    z1, z2 = self.model(x).chunk(2)
    loss = nt_xent(z1, z2, self.config.method.temperature)
    self.model.zero_grad(set_to_none=True)
    loss.backward()
    lars_update(self.params, self.momenta, self.learning_rates[self.step_count],
                self.config.optimizer)
    self.step_count += 1
    return loss.detach()

  def run(self, steps: int, warmup_steps: int) -> list[float]:
    """Seconds per step, as `train_throughput.time_steps` measures (eager CPU ops have
    finished when they return)."""
    times = []
    for i in range(warmup_steps + steps):
      start = time.perf_counter()
      self.step()
      if i >= warmup_steps:
        times.append(time.perf_counter() - start)
    return times


# -----------------------------------------------------------------------------------------------
# Timing and report


def time_interleaved(runners: dict, steps: int, warmup_steps: int, rounds: int) -> dict:
  """{name: seconds per timed step}: `steps` per runner in `rounds` blocks, the runners taking
  turns block by block, each first in turn. The first step of a later block finds caches and
  thread pools as the previous runner left them, which a training loop never does: untimed."""
  names = list(runners)
  times = {name: [] for name in names}
  rounds = min(rounds, steps)
  for r in range(rounds):
    block = steps // rounds + (r < steps % rounds)
    for name in names[r % len(names):] + names[:r % len(names)]:
      times[name] += runners[name](block, warmup_steps if r == 0 else 1)
  return times


def summarize(times: dict, batch_size: int, flops: float, peak_gflops: float) -> list[dict]:
  jax_median = statistics.median(times[JAX])
  rows = []
  for name, seconds in times.items():
    median = statistics.median(seconds)
    rows.append({
        'implementation': name, 'step_ms_median': median * 1e3,
        'step_ms_mean': statistics.mean(seconds) * 1e3, 'images_per_sec': batch_size / median,
        # images/s of JAX over this one's: > 1 when JAX is faster.
        'jax_over_torch': None if name == JAX else median / jax_median,
        'mfu_percent': 100 * flops / median / 1e9 / peak_gflops if name == JAX else None,
    })
  return rows


def format_table(r: dict) -> str:
  lines = [
      f'config       {r["summary"]}',
      f'machine      {r["cpu_count"]} CPU cores; jax {r["jax_version"]} on {r["devices"]} x '
      f'{r["platform"]}' + (f', torch {r["torch_version"]} with {r["torch_threads"]} threads'
                            if r['torch_version'] else ''),
      f'timing       {r["steps"]} timed steps each (median) in {r["rounds"]} interleaved '
      f'rounds, after {r["warmup_steps"]} warm-up steps; JAX compile {r["compile_s"]:.1f} s',
      'model        ' + '; '.join(
          f'{name} {m["params"]:,} parameters, features {m["feature_dim"]}, projection '
          f'{m["projection_dim"]}' for name, m in r['models'].items()),
      f'MFU          of the JAX step: {r["gflop_per_step"]:.2f} GFLOP per step (XLA cost '
      f'analysis) over the float32 matmul peak, {r["peak_gflops"]:.1f} GFLOP/s',
      '',
  ]
  header = ('implementation', 'step ms (median)', 'images/s', 'JAX/torch (images/s)', 'JAX MFU')
  table = [header] + [(
      row['implementation'], f'{row["step_ms_median"]:.1f}', f'{row["images_per_sec"]:.1f}',
      '-' if row['jax_over_torch'] is None else f'{row["jax_over_torch"]:.2f}',
      '-' if row['mfu_percent'] is None else f'{row["mfu_percent"]:.1f} %')
      for row in r['rows']]
  widths = [max(len(cells[i]) for cells in table) for i in range(len(header))]
  for cells in table:
    lines.append('  '.join([cells[0].ljust(widths[0])] +
                           [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])]))
  lines.append('(images/s: each image is two augmented views)')
  return '\n'.join(lines)


def model_facts(step) -> dict:
  return {'params': step.num_params, 'feature_dim': step.feature_dim,
          'projection_dim': step.projection_dim}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Imported after flag parsing so that jax sees XLA_FLAGS and its own absl flags.
  import jax
  jax.config.parse_flags_with_absl()
  from ssl_jax.data import sources

  config = FLAGS.config
  devices, platform = jax.device_count(), jax.devices()[0].platform
  if torch is not None:
    channels = sources.source_info(config.data.name).image_shape[-1]
    if problems := torch_recipe_problems(config, channels, platform):
      raise app.UsageError('The PyTorch recipe here does not implement this config:\n  '
                           + '\n  '.join(problems))

  jax_step = JaxStep(config)
  runners = {JAX: jax_step.run}
  models = {'jax': model_facts(jax_step)}
  torch_process = None
  if torch is not None:
    torch_process = TorchProcess(config, jax.device_get(jax_step.images),
                                 jax_step.learning_rates)
    runners.update((name, torch_process.runner(name))
                   for name in (TORCH_NCHW, TORCH_CHANNELS_LAST))
    models['torch'] = torch_process.facts
    if models['torch'] != models['jax']:
      raise RuntimeError(f'The torch model differs from the JAX one: {models}.')

  times = time_interleaved(runners, FLAGS.steps, FLAGS.warmup_steps, FLAGS.rounds)
  if torch_process is not None:
    torch_process.close()
  # As train_throughput: simulated CPU devices share the cores, so the peak is one device's.
  peak = train_throughput.matmul_peak_gflops(FLAGS.matmul_repeats)
  peak = peak if platform == 'cpu' else peak * devices
  result = {
      'summary': train_throughput.model_summary(config), 'batch_size': config.batch_size,
      'steps': FLAGS.steps, 'rounds': min(FLAGS.rounds, FLAGS.steps),
      'warmup_steps': FLAGS.warmup_steps, 'cpu_count': os.cpu_count(),
      'jax_version': jax.__version__, 'devices': devices, 'platform': platform,
      'torch_version': torch.__version__ if torch else None,
      'torch_threads': torch_process.threads if torch_process else None,
      'compile_s': jax_step.compile_s, 'models': models,
      'gflop_per_step': jax_step.flops / 1e9, 'peak_gflops': peak,
      'rows': summarize(times, config.batch_size, jax_step.flops, peak),
  }
  print(format_table(result))
  print(json.dumps(result), flush=True)
  if torch is None:
    print(TORCH_MISSING)


if __name__ == '__main__':
  app.run(main)
