"""Host input throughput for variable-size JPEGs: decode + random-resized crops on the CPU.

  python benchmarks/input_throughput.py [--num_images=256] [--workers=1,2]
      [--accelerator_rate=185] [--direct]

Writes `num_images` synthetic JPEGs of ImageNet's typical size (500x375, quality 90, smooth
colour fields plus texture and grain, so files are of ImageNet-like size) into a temporary
folder and measures images/s of the host half of the view policy for two 224-px views
(SimCLR) and for 2x224 + 6x96 (multi-crop):

* `direct`: `host_crop.decode_image` + `host_crop.random_views` in a plain loop, one core.
* `pipeline`: the real training input, `pipeline.make_train_iterator` over
  `sources.get_source('folder:<tmp>', 'train')`, with `worker_count` grain worker processes
  of `--threads_per_worker` threads each, so that a row uses about workers x threads cores.

Files are read from the page cache (they were just written), so disk speed is not measured.
The last column divides `--accelerator_rate` (images/s one accelerator consumes; a TPU v3
core ran SimCLR's ResNet-50 at ~185) by the per-core rate: the host cores needed to keep one
accelerator fed. Prints a markdown table.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer('num_images', 256, 'Synthetic JPEGs written and cycled through.',
                     lower_bound=8)
flags.DEFINE_list('workers', ['1', '2'], 'grain worker counts of the pipeline rows.')
flags.DEFINE_integer('threads_per_worker', 1, 'grain read threads in each worker process.',
                     lower_bound=1)
flags.DEFINE_integer('batch_size', 32, 'Pipeline batch size.', lower_bound=1)
flags.DEFINE_float('seconds', 4.0, 'Minimum timed seconds per row (after a warm-up).')
flags.DEFINE_float('accelerator_rate', 185.0,
                   'Images/s one accelerator consumes (TPU v3 core, SimCLR ResNet-50: ~185).')
flags.DEFINE_bool('direct', False,
                  'Only the plain decode + crop loop in this process (no grain pipeline).')

IMAGE_SIZE = (500, 375)  # (width, height): ImageNet's most common size
JPEG_QUALITY = 90


def natural_jpeg(rng: np.random.Generator, size=IMAGE_SIZE) -> bytes:
  """A JPEG of smooth colour fields, texture and grain: ~60-100 KB at 500x375, q=90."""
  width, height = size
  # Random noise alone compresses far worse than photographs and smooth fields far better.
  coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
  base = np.asarray(Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC), np.float32)
  texture = rng.normal(0, 40, (height // 8, width // 8, 3))
  texture = Image.fromarray(np.uint8(np.clip(128 + texture, 0, 255)))
  texture = np.asarray(texture.resize(size, Image.Resampling.BILINEAR), np.float32) - 128
  grain = rng.normal(0, rng.uniform(8, 30), (height, width, 1))
  pixels = np.uint8(np.clip(base + texture + grain, 0, 255))
  image = Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(0.6))
  buf = io.BytesIO()
  image.save(buf, 'JPEG', quality=JPEG_QUALITY)
  return buf.getvalue()


def write_images(folder: str, n: int) -> list[bytes]:
  rng = np.random.default_rng(0)
  images = [natural_jpeg(rng) for _ in range(n)]
  # The ImageNet layout, root/train/<class>/<file>, with two classes.
  for i, data in enumerate(images):
    class_dir = os.path.join(folder, 'train', f'class{i % 2}')
    os.makedirs(class_dir, exist_ok=True)
    with open(os.path.join(class_dir, f'{i:06d}.jpg'), 'wb') as f:
      f.write(data)
  return images


def view_sets():
  from ssl_jax.data import host_crop  # pylint: disable=g-import-not-at-top

  ratio = (3 / 4, 4 / 3)
  global_views = (host_crop.CropSpec(224, (0.08, 1.0), ratio),) * 2
  local_views = (host_crop.CropSpec(96, (0.05, 0.14), ratio),) * 6
  return {'2x224': global_views, '2x224 + 6x96': global_views + local_views}


def time_direct(images: list[bytes], specs, seconds: float) -> float:
  """Images/s of decode + crops in a plain loop in this process (one core)."""
  from ssl_jax.data import host_crop  # pylint: disable=g-import-not-at-top

  for data in images[:8]:  # warm-up
    host_crop.random_views(host_crop.decode_image(data), specs, 0, 0)
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds or count < len(images):
    data = images[count % len(images)]
    host_crop.random_views(host_crop.decode_image(data), specs, 0, count)
    count += 1
  return count / (time.perf_counter() - start)


def time_pipeline(folder: str, specs, workers: int, threads: int, batch_size: int,
                  seconds: float) -> float:
  """Images/s of the training iterator over the folder, after its start-up and a warm-up."""
  import grain  # pylint: disable=g-import-not-at-top
  from ssl_jax.data import pipeline, sources  # pylint: disable=g-import-not-at-top

  source = sources.get_source('folder:' + folder, 'train')
  iterator = pipeline.make_train_iterator(
      source, global_batch_size=batch_size, seed=0, process_index=0, process_count=1,
      worker_count=workers, crop_specs=specs,
      read_options=grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * batch_size))
  # Warm-up: worker start-up and filling the prefetch buffers are not throughput.
  for _ in range(max(2, 2 * workers)):
    batch = next(iterator)
  expected = tuple((batch_size, s.size, s.size, 3) for s in specs)
  if tuple(v.shape for v in batch['views']) != expected:
    raise RuntimeError(f'Unexpected view shapes {[v.shape for v in batch["views"]]}.')
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    batch = next(iterator)
    count += batch['label'].shape[0]
  rate = count / (time.perf_counter() - start)
  del iterator  # stops the worker processes
  return rate


def format_table(rows, rate: float) -> str:
  lines = [
      '| views | mode | workers x threads | images/s | images/s per core | '
      f'cores to feed {rate:g} images/s |',
      '|---|---|---|---|---|---|',
  ]
  for views, mode, cores_label, cores, ips in rows:
    per_core = ips / cores
    lines.append(f'| {views} | {mode} | {cores_label} | {ips:.0f} | {per_core:.0f} | '
                 f'{rate / per_core:.2f} |')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  workers = [int(w) for w in FLAGS.workers]
  if any(w < 1 for w in workers):
    raise app.UsageError('--workers must be positive.')
  with tempfile.TemporaryDirectory(prefix='ssl_jax_input_bench_') as folder:
    images = write_images(folder, FLAGS.num_images)
    sizes = np.array([len(d) for d in images]) / 1e3
    print(f'{len(images)} JPEGs of {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, quality {JPEG_QUALITY}: '
          f'{sizes.mean():.0f} KB mean ({sizes.min():.0f}-{sizes.max():.0f}); '
          f'{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f} at start.\n')
    rows = []
    for name, specs in view_sets().items():
      ips = time_direct(images, specs, FLAGS.seconds)
      rows.append((name, 'direct loop', '1 process', 1, ips))
      if FLAGS.direct:
        continue
      for w in workers:
        threads = FLAGS.threads_per_worker
        ips = time_pipeline(folder, specs, w, threads, FLAGS.batch_size, FLAGS.seconds)
        rows.append((name, 'pipeline', f'{w} x {threads}', w * threads, ips))
  print(format_table(rows, FLAGS.accelerator_rate))
  if not FLAGS.direct and max(workers) * FLAGS.threads_per_worker > (os.cpu_count() or 1):
    print(f'\nnote: rows using more than the {os.cpu_count()} cores share them, so their '
          'per-core figure is too low.')


if __name__ == '__main__':
  app.run(main)
