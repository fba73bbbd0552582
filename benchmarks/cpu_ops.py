"""Where XLA:CPU loses to PyTorch on the default ConvNet: the layers one at a time.

  python benchmarks/cpu_ops.py [--batch=512] [--repeats=20]

For each stage of the default ConvNet (16-pixel crops, widths 16-32-64; the batch is the two
views of 256 images), times in milliseconds, one device, float32, channels-last in both. The
JAX rows are compiled twice: with the options the trainer compiles a ConvNet's step with
(`ssl_jax.compiler_options`: YNNPACK for dots only), and with XLA's defaults ("jax, XLA
defaults": YNNPACK also for reductions), which is what the trainer used before:

- conv fwd / dx / dw: a 3x3 'SAME' convolution, its input gradient and its weight gradient
  (JAX: each jitted alone; PyTorch: forward alone, then forward + backward, which includes dx
  and dw).
- bn+relu: batch-statistics BatchNorm and ReLU, forward + backward.
- pool: 2x2 max-pooling, forward + backward, as `nn.max_pool` (reduce_window, whose gradient
  XLA computes with select_and_scatter) and as `models.convnet.max_pool_2x2` (a reshape and a
  max), which the ConvNet uses.

PyTorch is optional (`pip install torch==2.13.0`); without it only the JAX columns print.
Compare figures of one run only: machines of this class differ by up to 2x.
"""

from __future__ import annotations

import os
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer('batch', 512, 'Rows per layer call (default: two views of 256 images).')
flags.DEFINE_integer('repeats', 20, 'Timed calls per figure (after two untimed ones).')

# (spatial side, channels) of the default ConvNet's stages on 16-pixel crops.
STAGES = ((16, 16), (8, 32), (4, 64))


def _ms(fn, repeats: int) -> float:
  """Mean milliseconds per call of `fn` (which blocks until its result is ready)."""
  fn()
  fn()
  start = time.perf_counter()
  for _ in range(repeats):
    fn()
  return (time.perf_counter() - start) / repeats * 1e3


def jax_row(batch: int, side: int, channels: int, repeats: int, options: dict | None) -> dict:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  from ssl_jax.models.convnet import max_pool_2x2

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, side, side, channels)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, channels, channels)) * 0.1, jnp.float32)
  conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  y = conv(x, w)

  def bn_relu(x):
    mean = x.mean((0, 1, 2))
    var = (x * x).mean((0, 1, 2)) - mean * mean
    return jax.nn.relu((x - mean) * jax.lax.rsqrt(var + 1e-5))

  jit = lambda f: jax.jit(f, compiler_options=options)

  def forward_backward(f):
    """The input gradient of `f` at x, its forward pass included (as PyTorch's column)."""
    cotangent = jnp.ones(jax.eval_shape(f, x).shape, jnp.float32)
    return jit(lambda x: jax.vjp(f, x)[1](cotangent)[0])

  timed = lambda f, *args: _ms(lambda: jax.block_until_ready(f(*args)), repeats)
  return {
      'conv fwd': timed(jit(conv), x, w),
      'conv dx': timed(jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g)[0]), x, w, y),
      'conv dw': timed(jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g)[1]), x, w, y),
      'bn+relu': timed(forward_backward(bn_relu), x),
      'pool (reduce_window)': timed(
          forward_backward(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))), x),
      'pool (reshape)': timed(forward_backward(max_pool_2x2), x),
  }


def torch_row(batch: int, side: int, channels: int, repeats: int) -> dict | None:
  try:
    import torch
  except ImportError:
    return None
  torch.set_num_threads(os.cpu_count())
  channels_last = torch.channels_last
  x = torch.randn(batch, channels, side, side).contiguous(memory_format=channels_last)
  x.requires_grad_()
  conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(
      memory_format=channels_last)
  norm = torch.nn.BatchNorm2d(channels)

  def backward_of(f):
    def run():
      out = f(x)
      out.backward(torch.ones_like(out))
    return run

  def forward_only():
    with torch.no_grad():
      conv(x)

  return {
      'conv fwd': _ms(forward_only, repeats),
      'conv fwd+dx+dw': _ms(backward_of(conv), repeats),
      'bn+relu': _ms(backward_of(lambda x: torch.relu(norm(x))), repeats),
      'pool': _ms(backward_of(lambda x: torch.nn.functional.max_pool2d(x, 2)), repeats),
  }


def main(argv):
  del argv
  import ml_collections

  from ssl_jax import compiler_options
  trainer_options = compiler_options.for_train_step(ml_collections.ConfigDict({'name': 'convnet'}))
  columns = ('conv fwd', 'conv dx', 'conv dw', 'bn+relu', 'pool (reduce_window)',
             'pool (reshape)')
  print(f'ms per call, batch {FLAGS.batch}, float32, channels-last')
  print(f'{"stage":<28}' + ''.join(f'{c:>22}' for c in columns))
  torch_rows = []
  for side, channels in STAGES:
    for name, options in (('jax', trainer_options), ('jax, XLA defaults', None)):
      row = jax_row(FLAGS.batch, side, channels, FLAGS.repeats, options)
      print(f'{f"{name} {side}x{side}x{channels}":<28}' +
            ''.join(f'{row[c]:>22.1f}' for c in columns))
    torch_rows.append((side, channels, torch_row(FLAGS.batch, side, channels, FLAGS.repeats)))
  if torch_rows[0][2] is None:
    print('PyTorch is not installed (pip install torch==2.13.0): JAX figures only.')
    return
  torch_columns = ('conv fwd', 'conv fwd+dx+dw', 'bn+relu', 'pool')
  print(f'{"stage":<28}' + ''.join(f'{c:>22}' for c in torch_columns))
  for side, channels, row in torch_rows:
    print(f'{f"torch {side}x{side}x{channels}":<28}' +
          ''.join(f'{row[c]:>22.1f}' for c in torch_columns))


if __name__ == '__main__':
  app.run(main)
