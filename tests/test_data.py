"""Tests of ssl_jax.data.sources and ssl_jax.data.pipeline."""

from __future__ import annotations

import functools
import gzip
import http.server
import os
import pathlib
import shutil
import threading
import time

import grain
import numpy as np
import pytest

from ssl_jax.data import pipeline, sources

SYSTEM_FMNIST = pathlib.Path('/usr/share/datasets/fashion-mnist')
INSTALL_HINT = ('Fashion-MNIST is required (CI installs it): '
                'sudo apt-get install dataset-fashion-mnist')
FMNIST_FILES = ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
                't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')


def require_system_fmnist():
  if not all((SYSTEM_FMNIST / f).is_file() for f in FMNIST_FILES):
    pytest.fail(f'{SYSTEM_FMNIST} lacks the Fashion-MNIST files. {INSTALL_HINT}')


# ------------------------------------------------------------------------------------------
# IDX parsing.
# ------------------------------------------------------------------------------------------

_CODES = {np.dtype('u1'): 0x08, np.dtype('i1'): 0x09, np.dtype('i2'): 0x0B,
          np.dtype('i4'): 0x0C, np.dtype('f4'): 0x0D, np.dtype('f8'): 0x0E}


def idx_bytes(arr: np.ndarray) -> bytes:
  """An IDX file written by hand from the format spec (independent of the reader)."""
  header = bytes([0, 0, _CODES[arr.dtype], arr.ndim])
  header += b''.join(int(d).to_bytes(4, 'big') for d in arr.shape)
  return header + arr.astype(arr.dtype.newbyteorder('>')).tobytes()


ROUND_TRIP_ARRAYS = [
    np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5),
    np.array([-128, 0, 127], np.int8),
    np.array([[-30000, 1], [2, 30000]], np.int16),
    np.array([[-2**31, 2**31 - 1, 7]], np.int32),
    np.array([1.5, -np.inf, 3e38], np.float32),
    np.array([[np.pi], [-1e300]], np.float64),
    np.zeros((0, 28, 28), np.uint8),
]


@pytest.mark.parametrize('compress', [False, True], ids=['raw', 'gzip'])
@pytest.mark.parametrize('arr', ROUND_TRIP_ARRAYS, ids=lambda a: f'{a.dtype}{a.shape}')
def test_read_idx_round_trips_exactly(tmp_path, arr, compress):
  data = idx_bytes(arr)
  path = tmp_path / 'x.idx'
  path.write_bytes(gzip.compress(data) if compress else data)
  out = sources.read_idx(path)
  assert out.dtype == arr.dtype.newbyteorder('=') and out.dtype.isnative
  assert out.shape == arr.shape
  np.testing.assert_array_equal(out, arr)
  assert out.flags.writeable  # an ordinary array, not a view of the read-only file bytes


def test_read_idx_ignores_file_name(tmp_path):
  arr = np.arange(10, dtype=np.uint8)
  (tmp_path / 'raw.gz').write_bytes(idx_bytes(arr))  # not actually gzip
  (tmp_path / 'packed').write_bytes(gzip.compress(idx_bytes(arr)))
  np.testing.assert_array_equal(sources.read_idx(tmp_path / 'raw.gz'), arr)
  np.testing.assert_array_equal(sources.read_idx(tmp_path / 'packed'), arr)


GOOD = idx_bytes(np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6))


@pytest.mark.parametrize('content, match', [
    (GOOD[:-1], r'truncated.*needs 120 data bytes.*has 119'),
    (GOOD[:14], r'truncated header'),
    (GOOD[:2], r'truncated or not an IDX'),
    (GOOD + b'\0', r'1 unexpected trailing bytes'),
    (b'\x01' + GOOD[1:], r'bad magic number'),
    (GOOD[:2] + b'\x07' + GOOD[3:], r'unknown IDX data type code 0x07'),
    (GOOD[:3] + b'\x00' + GOOD[4:], r'0 dimensions'),
    (gzip.compress(GOOD)[:-12], r'gzip data is truncated'),
    (gzip.compress(GOOD)[:-8] + b'\0\0\0\0' + gzip.compress(GOOD)[-4:], r'gzip data is corrupt'),
    (gzip.compress(GOOD[:-1]), r'truncated'),
], ids=['data-short', 'header-short', 'tiny', 'trailing', 'magic', 'dtype', 'ndim',
        'gzip-truncated', 'gzip-crc', 'gzip-of-truncated'])
def test_read_idx_rejects_corrupt_files(tmp_path, content, match):
  path = tmp_path / 'bad.idx'
  path.write_bytes(content)
  with pytest.raises(sources.IdxFormatError, match=match) as info:
    sources.read_idx(path)
  assert str(path) in str(info.value)
  assert isinstance(info.value, ValueError)


# ------------------------------------------------------------------------------------------
# ArraySource and the registry.
# ------------------------------------------------------------------------------------------


def test_array_source_records_and_validation():
  images = np.arange(3 * 2 * 2, dtype=np.uint8).reshape(3, 2, 2)
  src = sources.ArraySource(images, np.array([4, 5, 6], np.int64))
  assert len(src) == 3 and src.image_shape == (2, 2, 1)
  rec = src[1]
  assert rec['image'].dtype == np.uint8 and rec['image'].shape == (2, 2, 1)
  np.testing.assert_array_equal(rec['image'][..., 0], images[1])
  assert rec['label'].dtype == np.int32 and rec['label'].shape == () and rec['label'] == 5
  batch = src.get_batch([2, 0, 2])
  assert batch['image'].shape == (3, 2, 2, 1) and batch['label'].dtype == np.int32
  np.testing.assert_array_equal(batch['label'], [6, 4, 6])
  with pytest.raises(IndexError):
    src[3]
  with pytest.raises(TypeError, match='uint8'):
    sources.ArraySource(images.astype(np.float32), [0, 1, 2])
  with pytest.raises(ValueError, match='3 images but 2 labels'):
    sources.ArraySource(images, [0, 1])
  with pytest.raises(ValueError, match='shape'):
    sources.ArraySource(images[0], [0, 1])
  with pytest.raises(TypeError, match='integer'):
    sources.ArraySource(images, [0.0, 1.0, 2.0])


def test_registry():
  assert 'fashion_mnist' in sources.KNOWN_SOURCES
  assert sources.source_info('fashion_mnist') == ((28, 28, 1), 10)
  with pytest.raises(ValueError, match=r"Unknown data source 'mnistt'.*fashion_mnist.*tfds:"):
    sources.get_source('mnistt', 'train')
  with pytest.raises(ValueError, match='splits'):
    sources.get_source('fashion_mnist', 'validation')


# ------------------------------------------------------------------------------------------
# Fashion-MNIST.
# ------------------------------------------------------------------------------------------


@pytest.fixture
def no_fallbacks(tmp_path, monkeypatch):
  """No Fashion-MNIST anywhere: empty system dir, empty home, no SSL_JAX_DATA_DIR."""
  monkeypatch.setattr(sources, 'SYSTEM_DATA_DIRS', (str(tmp_path / 'system'),))
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  monkeypatch.delenv(sources.DATA_DIR_ENV, raising=False)
  return tmp_path


def test_real_fashion_mnist():
  require_system_fmnist()
  for split, n in (('train', 60000), ('test', 10000)):
    src = sources.get_source('fashion_mnist', split, data_dir=SYSTEM_FMNIST)
    images, labels = pipeline.make_eval_arrays(src)
    assert images.shape == (n, 28, 28, 1) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.int32
    assert labels.min() == 0 and labels.max() == 9
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [n // 10] * 10)
    assert 0 < images.mean() < 255 and images.max() == 255  # real pixels, not zeros
    # Cached and shared: the second call returns the same object, whose arrays are read-only.
    assert sources.fashion_mnist(split, data_dir=SYSTEM_FMNIST) is src
    with pytest.raises(ValueError, match='read-only'):
      src.images[0, 0, 0, 0] = 1


def test_fashion_mnist_default_search_finds_system_dir(monkeypatch, tmp_path):
  require_system_fmnist()
  monkeypatch.delenv(sources.DATA_DIR_ENV, raising=False)
  monkeypatch.setenv('HOME', str(tmp_path))
  src = sources.fashion_mnist('test')
  assert len(src) == 10000
  # SSL_JAX_DATA_DIR/fashion-mnist is searched first (files linked from the system dir).
  (tmp_path / 'root' / 'fashion-mnist').mkdir(parents=True)
  for f in FMNIST_FILES:
    os.symlink(SYSTEM_FMNIST / f, tmp_path / 'root' / 'fashion-mnist' / f)
  monkeypatch.setenv(sources.DATA_DIR_ENV, str(tmp_path / 'root'))
  assert sources.fashion_mnist_search_dirs()[0] == tmp_path / 'root' / 'fashion-mnist'
  assert len(sources.fashion_mnist('test')) == 10000


@pytest.mark.parametrize('explicit_dir', [False, True])
def test_missing_fashion_mnist_says_how_to_get_it(no_fallbacks, explicit_dir):
  data_dir = None
  if explicit_dir:
    data_dir = no_fallbacks / 'empty'
    data_dir.mkdir()
  with pytest.raises(FileNotFoundError) as info:
    sources.get_source('fashion_mnist', 'train', data_dir=data_dir)
  msg = str(info.value)
  assert 'sudo apt-get install dataset-fashion-mnist' in msg
  assert 'download=True' in msg and '--config.data.download=True' in msg
  assert 'data_dir' in msg and 'SSL_JAX_DATA_DIR' in msg
  assert str(data_dir if explicit_dir else no_fallbacks / 'system') in msg


class _QuietHandler(http.server.SimpleHTTPRequestHandler):

  def log_message(self, *args):
    pass


@pytest.fixture
def serve_dir(monkeypatch):
  """serve_dir(path) -> base URL of a local HTTP server for `path`."""
  for var in ('http_proxy', 'HTTP_PROXY', 'https_proxy', 'HTTPS_PROXY', 'all_proxy',
              'ALL_PROXY'):
    monkeypatch.delenv(var, raising=False)
  servers = []

  def start(path):
    server = http.server.ThreadingHTTPServer(
        ('127.0.0.1', 0), functools.partial(_QuietHandler, directory=str(path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    servers.append(server)
    return f'http://127.0.0.1:{server.server_address[1]}/'

  yield start
  for server in servers:
    server.shutdown()
    server.server_close()


def test_download_is_verified_and_atomic(no_fallbacks, serve_dir, monkeypatch):
  require_system_fmnist()
  # A server with a truncated training-image file: the download fails, nothing is left.
  bad = no_fallbacks / 'bad_server'
  bad.mkdir()
  for f in FMNIST_FILES:
    shutil.copy(SYSTEM_FMNIST / f, bad / f)
  content = (bad / FMNIST_FILES[0]).read_bytes()
  (bad / FMNIST_FILES[0]).write_bytes(content[:len(content) // 2])
  target = no_fallbacks / 'dl'
  monkeypatch.setattr(sources, 'FASHION_MNIST_URL', serve_dir(bad))
  with pytest.raises(OSError, match='not a valid IDX file.*truncated'):
    sources.fashion_mnist('train', data_dir=target, download=True)
  assert not (target / FMNIST_FILES[0]).exists()
  assert not [p for p in target.iterdir() if p.name.endswith('.part')]

  # The real files: downloaded into the cache dir (no data_dir), then found there.
  monkeypatch.setattr(sources, 'FASHION_MNIST_URL', serve_dir(SYSTEM_FMNIST))
  src = sources.fashion_mnist('test', download=True)
  cache = sources.fashion_mnist_cache_dir()
  assert cache == no_fallbacks / 'home' / '.cache' / 'ssl_jax' / 'fashion-mnist'
  assert sorted(p.name for p in cache.iterdir()) == sorted(FMNIST_FILES)
  reference = sources.fashion_mnist('test', data_dir=SYSTEM_FMNIST)
  np.testing.assert_array_equal(src.images, reference.images)
  np.testing.assert_array_equal(src.labels, reference.labels)
  monkeypatch.setattr(sources, 'FASHION_MNIST_URL', 'http://127.0.0.1:9/')  # nothing there
  assert len(sources.fashion_mnist('train')) == 60000  # from the cache, no download


# ------------------------------------------------------------------------------------------
# The training pipeline.
# ------------------------------------------------------------------------------------------

N = 1000  # records whose label is their index, so batches show which examples they hold.


@pytest.fixture(scope='module')
def indexed_source():
  images = (np.arange(N)[:, None, None, None] % 251 * np.ones((1, 3, 2, 1))).astype(np.uint8)
  return sources.ArraySource(images, np.arange(N))


def take(iterator, steps):
  return [next(iterator) for _ in range(steps)]


def stream(batches):
  return np.concatenate([b['label'] for b in batches])


def train_iter(source, **kwargs):
  kwargs.setdefault('process_index', 0)
  kwargs.setdefault('process_count', 1)
  kwargs.setdefault('global_batch_size', 64)
  kwargs.setdefault('seed', 0)
  return pipeline.make_train_iterator(source, **kwargs)


def test_batches_have_the_record_format(indexed_source):
  it = train_iter(indexed_source, global_batch_size=8, process_index=1, process_count=2)
  assert isinstance(it, grain.DatasetIterator)
  batch = next(it)
  assert set(batch) == {'image', 'label', 'index'}
  assert batch['image'].dtype == np.uint8 and batch['image'].shape == (4, 3, 2, 1)
  assert batch['label'].dtype == np.int32 and batch['label'].shape == (4,)
  np.testing.assert_array_equal(batch['image'][:, 0, 0, 0], batch['label'] % 251)


@pytest.mark.parametrize('process_count', [2, 4])
def test_hosts_read_fixed_slices_of_the_same_global_batch(indexed_source, process_count):
  steps = 40  # 40 * 64 = 2560 examples: crosses two epoch boundaries
  single = take(train_iter(indexed_source, seed=3), steps)
  hosts = [take(train_iter(indexed_source, seed=3, process_index=h,
                           process_count=process_count), steps)
           for h in range(process_count)]
  for t in range(steps):
    for h in range(process_count):
      assert hosts[h][t]['label'].shape == (64 // process_count,)
    glued = np.concatenate([hosts[h][t]['label'] for h in range(process_count)])
    np.testing.assert_array_equal(glued, single[t]['label'])  # same rows, same order
    glued_images = np.concatenate([hosts[h][t]['image'] for h in range(process_count)])
    np.testing.assert_array_equal(glued_images, single[t]['image'])


def test_every_example_once_per_epoch_and_epochs_differ(indexed_source):
  labels = stream(take(train_iter(indexed_source, global_batch_size=48), 3 * N // 48 + 1))
  epochs = [labels[e * N:(e + 1) * N] for e in range(3)]
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(N))
    assert not np.array_equal(epoch, np.arange(N))  # shuffled
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[1], epochs[2])
  # Not merely shifted / correlated: the epochs' orders are unrelated.
  assert abs(np.corrcoef(epochs[0], epochs[1])[0, 1]) < 0.2


def test_seed_determinism(indexed_source):
  a = stream(take(train_iter(indexed_source, seed=7), 32))  # 2048 examples: 2 epochs
  b = stream(take(train_iter(indexed_source, seed=7), 32))
  c = stream(take(train_iter(indexed_source, seed=8), 32))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # Seeds are not epochs in disguise (grain's shuffle uses seed + epoch per epoch).
  assert len(a) >= 2 * N
  assert not np.array_equal(c[:N], a[N:2 * N])


def test_no_shuffle_reads_in_order(indexed_source):
  labels = stream(take(train_iter(indexed_source, shuffle=False, global_batch_size=100), 12))
  np.testing.assert_array_equal(labels, np.concatenate([np.arange(N), np.arange(200)]))


def test_finite_epochs(indexed_source):
  it = train_iter(indexed_source, num_epochs=2, global_batch_size=64)
  batches = list(it)
  assert len(batches) == 2 * N // 64  # the last incomplete global batch is dropped
  counts = np.bincount(stream(batches), minlength=N)
  assert counts.max() <= 2 and counts.sum() == 2 * N // 64 * 64
  batches = list(train_iter(indexed_source, num_epochs=2, drop_remainder=False))
  assert [len(b['label']) for b in batches[-2:]] == [64, 2 * N % 64]
  np.testing.assert_array_equal(np.bincount(stream(batches)), np.full(N, 2))
  with pytest.raises(ValueError, match='unequal'):
    train_iter(indexed_source, num_epochs=1, drop_remainder=False, process_count=2)
  with pytest.raises(ValueError, match='do not fill one global batch'):
    train_iter(indexed_source, num_epochs=1, global_batch_size=2 * N)


def test_argument_errors(indexed_source):
  with pytest.raises(ValueError, match=r'global_batch_size=30 is not divisible by '
                                       r'process_count=4.*multiple of 4.*batch_size=28'):
    train_iter(indexed_source, global_batch_size=30, process_count=4)
  with pytest.raises(ValueError, match='process_index'):
    train_iter(indexed_source, process_index=2, process_count=2)
  with pytest.raises(ValueError, match='seed'):
    train_iter(indexed_source, seed=-1)


def test_defaults_to_jax_process_index_and_count(indexed_source):
  explicit = next(train_iter(indexed_source))
  default = next(pipeline.make_train_iterator(indexed_source, global_batch_size=64, seed=0))
  np.testing.assert_array_equal(explicit['label'], default['label'])


def test_get_state_set_state_resumes_exactly(indexed_source):
  reference = take(train_iter(indexed_source, seed=5), 30)
  it = train_iter(indexed_source, seed=5)
  take(it, 17)
  state = it.get_state()
  take(it, 4)  # the original goes on; its saved state must not change
  resumed = train_iter(indexed_source, seed=5)
  resumed.set_state(state)
  np.testing.assert_array_equal(stream(take(resumed, 13)), stream(reference[17:]))


@pytest.mark.parametrize('asynchronous', [False, True], ids=['sync', 'async'])
def test_orbax_checkpoint_resumes_exactly(indexed_source, tmp_path, asynchronous):
  import orbax.checkpoint as ocp
  reference = take(train_iter(indexed_source, seed=2), 25)
  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                         enable_async_checkpointing=asynchronous)
  params = {'w': np.arange(6.0).reshape(2, 3)}
  with ocp.CheckpointManager(tmp_path / 'ckpt', options=options) as manager:
    it = train_iter(indexed_source, seed=2)
    take(it, 11)
    manager.save(11, args=ocp.args.Composite(
        state=ocp.args.StandardSave(params), data=grain.checkpoint.CheckpointSave(it)))
    take(it, 5)  # training goes on while an asynchronous save is still being written
    manager.wait_until_finished()
  with ocp.CheckpointManager(tmp_path / 'ckpt', options=options) as manager:
    assert manager.latest_step() == 11
    fresh = train_iter(indexed_source, seed=2)
    restored = manager.restore(11, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(params), data=grain.checkpoint.CheckpointRestore(fresh)))
  np.testing.assert_array_equal(restored['state']['w'], params['w'])
  assert restored['data'] is fresh and fresh.get_state() == {'next_index': 11}
  np.testing.assert_array_equal(stream(take(fresh, 14)), stream(reference[11:]))


def test_worker_processes_give_the_same_batches(indexed_source):
  reference = take(train_iter(indexed_source, seed=4), 6)
  it = train_iter(indexed_source, seed=4, worker_count=1)
  try:
    first = take(it, 3)
    state = it.get_state()
  finally:
    it.close()
  np.testing.assert_array_equal(stream(first), stream(reference[:3]))
  resumed = train_iter(indexed_source, seed=4, worker_count=1)
  try:
    resumed.set_state(state)
    np.testing.assert_array_equal(stream(take(resumed, 3)), stream(reference[3:]))
  finally:
    resumed.close()


def test_real_data_loading_is_cheap():
  require_system_fmnist()
  src = sources.fashion_mnist('train', data_dir=SYSTEM_FMNIST)
  it = pipeline.make_train_iterator(src, global_batch_size=256, seed=0, process_index=0,
                                    process_count=1)
  next(it)
  start = time.perf_counter()
  for _ in range(200):
    batch = next(it)
  elapsed = time.perf_counter() - start
  assert batch['image'].shape == (256, 28, 28, 1)
  assert elapsed < 5.0, f'200 batches of 256 took {elapsed:.2f} s'  # ~0.05 s expected


# ------------------------------------------------------------------------------------------
# Evaluation arrays.
# ------------------------------------------------------------------------------------------


class _RecordOnly:
  """A source with only len and [i] (no get_batch / arrays), like a generic grain source."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    rec = self._source[i]
    return {'image': rec['image'][..., 0], 'label': int(rec['label'])}  # 2-D image, int


def test_make_eval_arrays(indexed_source):
  images, labels = pipeline.make_eval_arrays(indexed_source, max_examples=300)
  assert images.shape == (300, 3, 2, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, np.arange(300))
  generic_images, generic_labels = pipeline.make_eval_arrays(
      _RecordOnly(indexed_source), max_examples=300, chunk_size=128)
  np.testing.assert_array_equal(generic_images, images)
  np.testing.assert_array_equal(generic_labels, labels)
  assert generic_labels.dtype == np.int32
  assert len(pipeline.make_eval_arrays(indexed_source)[1]) == N
  # The generic path also feeds the training pipeline.
  a = next(train_iter(_RecordOnly(indexed_source), seed=1))
  b = next(train_iter(indexed_source, seed=1))
  np.testing.assert_array_equal(a['image'], b['image'])
  np.testing.assert_array_equal(a['label'], b['label'])


# ------------------------------------------------------------------------------------------
# TFDS.
# ------------------------------------------------------------------------------------------


def test_tfds_source_with_mock_data(indexed_source):
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=12):
    src = sources.get_source('tfds:cifar10', 'train')
    assert isinstance(src, sources.TfdsSource) and len(src) == 12
    rec = src[3]
    assert set(rec) == {'image', 'label'}
    assert rec['image'].dtype == np.uint8 and rec['image'].shape == (32, 32, 3)
    assert rec['label'].dtype == np.int32 and 0 <= rec['label'] < 10
    batch = src.get_batch([3, 0, 3])
    assert batch['image'].shape == (3, 32, 32, 3) and batch['label'].dtype == np.int32
    np.testing.assert_array_equal(batch['image'][0], rec['image'])
    np.testing.assert_array_equal(batch['image'][2], rec['image'])
    it = pipeline.make_train_iterator(src, global_batch_size=8, seed=0, process_index=0,
                                      process_count=1)
    first = next(it)
    assert first['image'].shape == (8, 32, 32, 3) and first['label'].shape == (8,)
    images, labels = pipeline.make_eval_arrays(src)
    assert images.shape == (12, 32, 32, 3) and labels.dtype == np.int32
  assert sources.source_info('tfds:cifar10') == ((32, 32, 3), 10)


def test_tfds_not_prepared_says_how_to_prepare(tmp_path):
  with pytest.raises(FileNotFoundError) as info:
    sources.tfds_source('cifar10', 'train', data_dir=tmp_path)
  msg = str(info.value)
  assert f'tfds build cifar10 --data_dir={tmp_path} --file_format=array_record' in msg
  assert 'download_and_prepare()' in msg
  with pytest.raises(FileNotFoundError) as info:
    sources.tfds_source('imagenet2012', 'train', data_dir=tmp_path)
  assert 'ILSVRC2012_img_train.tar' in str(info.value)
  assert str(tmp_path / 'downloads' / 'manual') in str(info.value)
