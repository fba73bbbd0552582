"""Random-access data sources: len(source) and source[i] -> {'image', 'label'}.

Every source returns records as ``{'image': uint8 [H, W, C], 'label': int32 scalar}`` and
may offer ``get_batch(indices) -> {'image': uint8 [n, H, W, C], 'label': int32 [n]}``, a
vectorised read that the input pipeline (`ssl_jax.data.pipeline`) uses when present.
Sources are plain picklable objects, so they can be handed to grain (`grain.MapDataset.source`)
and to grain worker processes.

* `fashion_mnist(split)`: Fashion-MNIST from the IDX files of Debian's
  ``dataset-fashion-mnist`` package (or any folder holding the four files), optionally
  downloaded once into a cache folder. Never falls back to random data.
* `tfds_source(name, split)`: any TFDS dataset prepared in the ``array_record`` format.
* `get_source(name, split)`: the registry behind ``--config.data.name``:
  ``'fashion_mnist'`` or ``'tfds:<name>'``.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import pathlib
import tempfile
import urllib.error
import urllib.request
import zlib
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

__all__ = [
    'ArraySource', 'FASHION_MNIST_CLASSES', 'IdxFormatError', 'KNOWN_SOURCES', 'SourceInfo',
    'TfdsSource', 'fashion_mnist', 'fashion_mnist_search_dirs', 'get_source', 'read_idx',
    'class_names', 'source_info', 'tfds_source',
]

# --------------------------------------------------------------------------------------------
# IDX files (the MNIST / Fashion-MNIST format, http://yann.lecun.com/exdb/mnist/).
# --------------------------------------------------------------------------------------------

# Data type code (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype('u1'),
    0x09: np.dtype('i1'),
    0x0B: np.dtype('>i2'),
    0x0C: np.dtype('>i4'),
    0x0D: np.dtype('>f4'),
    0x0E: np.dtype('>f8'),
}


class IdxFormatError(ValueError):
  """An IDX file is truncated, corrupt or not an IDX file at all."""


def _read_idx_payload(path: os.PathLike | str) -> bytes:
  """The file's bytes, gunzipped if the file is gzip (detected by content, not by name)."""
  raw = pathlib.Path(path).read_bytes()
  if raw[:2] != b'\x1f\x8b':
    return raw
  try:
    return gzip.decompress(raw)
  except EOFError as e:  # the gzip stream ends early
    raise IdxFormatError(
        f'{path}: the gzip data is truncated ({e}); the file is incomplete. '
        'Delete it and get it again.') from e
  except (OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; CRC or deflate errors
    raise IdxFormatError(
        f'{path}: the gzip data is corrupt ({e}). Delete the file and get it again.') from e


def _parse_idx(buf: bytes, path: os.PathLike | str = '<bytes>') -> np.ndarray:
  """Parses the (uncompressed) bytes of an IDX file into a writable native-endian array."""
  if len(buf) < 4:
    raise IdxFormatError(f'{path}: only {len(buf)} bytes; an IDX file has a 4-byte magic '
                         'number. The file is truncated or not an IDX file.')
  zero0, zero1, code, ndim = buf[0], buf[1], buf[2], buf[3]
  if zero0 != 0 or zero1 != 0:
    raise IdxFormatError(
        f'{path}: bad magic number 0x{buf[:4].hex()} (must start with 0x0000); not an IDX '
        'file (or a gzip file that was decompressed twice / not at all).')
  if code not in _IDX_DTYPES:
    raise IdxFormatError(
        f'{path}: unknown IDX data type code 0x{code:02x} in magic number 0x{buf[:4].hex()}; '
        f'known codes: {", ".join(f"0x{c:02x}" for c in _IDX_DTYPES)}.')
  if ndim == 0:
    raise IdxFormatError(f'{path}: the magic number says 0 dimensions; corrupt IDX header.')
  header_len = 4 + 4 * ndim
  if len(buf) < header_len:
    raise IdxFormatError(
        f'{path}: truncated header: {ndim} dimensions need {header_len} header bytes, the '
        f'file has {len(buf)}.')
  shape = tuple(int(d) for d in np.frombuffer(buf, dtype='>u4', count=ndim, offset=4))
  dtype = _IDX_DTYPES[code]
  expected = math.prod(shape) * dtype.itemsize
  actual = len(buf) - header_len
  if actual < expected:
    raise IdxFormatError(
        f'{path}: truncated: shape {shape} of {dtype.name} needs {expected} data bytes after '
        f'the {header_len}-byte header but the file has {actual}. Delete it and get it again.')
  if actual > expected:
    raise IdxFormatError(
        f'{path}: corrupt: {actual - expected} unexpected trailing bytes after the data of '
        f'shape {shape} of {dtype.name}.')
  # bytearray -> the result is writable (np.frombuffer of bytes would be read-only).
  data = np.frombuffer(bytearray(buf[header_len:]), dtype=dtype).reshape(shape)
  return data.astype(dtype.newbyteorder('='), copy=False)


def read_idx(path: os.PathLike | str) -> np.ndarray:
  """Reads an IDX file (gzipped or not) into a native-endian numpy array.

  Validates the magic number (two zero bytes, a known data type code, >= 1 dimension), the
  header length and that the data size matches the dimensions exactly; any mismatch raises
  `IdxFormatError` (a ValueError) naming the file and what is wrong.
  """
  return _parse_idx(_read_idx_payload(path), path)


# --------------------------------------------------------------------------------------------
# In-memory source.
# --------------------------------------------------------------------------------------------

_INT32 = np.iinfo(np.int32)


def _as_labels(labels: Any, n: int | None = None) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f'labels must be 1-D [N], got shape {labels.shape}.')
  if n is not None and labels.shape[0] != n:
    raise ValueError(f'{n} images but {labels.shape[0]} labels.')
  if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
    raise TypeError(f'labels must have an integer dtype, got {labels.dtype}.')
  if labels.size and (labels.min() < _INT32.min or labels.max() > _INT32.max):
    raise ValueError('labels do not fit in int32.')
  return labels.astype(np.int32, copy=False)


class ArraySource:
  """A random-access source over in-memory arrays.

  Args:
    images: uint8 [N, H, W] (a channel axis is added) or [N, H, W, C].
    labels: integer [N]; stored as int32.

  The arrays are kept without copying (read-only inputs stay read-only).
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    images = np.asarray(images)
    if images.dtype != np.uint8:
      raise TypeError(f'images must be uint8, got {images.dtype}; convert with '
                      'np.clip(x, 0, 255).astype(np.uint8) (or keep the original bytes).')
    if images.ndim == 3:
      images = images[..., None]
    if images.ndim != 4:
      raise ValueError(f'images must be [N, H, W] or [N, H, W, C], got shape {images.shape}.')
    self.images = images
    self.labels = _as_labels(labels, images.shape[0])

  def __len__(self) -> int:
    return self.images.shape[0]

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)  # a slice or an array is an error here: one record per index.
    n = len(self)
    if not -n <= index < n:
      raise IndexError(f'index {index} out of range for a source of {n} records.')
    return {'image': self.images[index], 'label': self.labels[index]}

  def get_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
    """Vectorised read: {'image': uint8 [n, H, W, C], 'label': int32 [n]} (fresh arrays)."""
    indices = np.asarray(indices, dtype=np.int64)
    return {'image': self.images[indices], 'label': self.labels[indices]}

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.images.shape[1:])

  def __repr__(self) -> str:
    return f'ArraySource(n={len(self)}, image_shape={self.image_shape})'


# --------------------------------------------------------------------------------------------
# Fashion-MNIST.
# --------------------------------------------------------------------------------------------

FASHION_MNIST_URL = 'http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/'
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
                         'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
_FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz', 60000),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz', 10000),
}
# SHA-256 of the *uncompressed* IDX bytes: independent of how the .gz was made (Debian's
# files are the upstream ones recompressed without the file name in the gzip header).
_FASHION_MNIST_SHA256 = {
    'train-images-idx3-ubyte.gz':
        'c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888',
    'train-labels-idx1-ubyte.gz':
        'bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9',
    't10k-images-idx3-ubyte.gz':
        '5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b',
    't10k-labels-idx1-ubyte.gz':
        '0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34',
}
# Where `apt-get install dataset-fashion-mnist` puts the files. A module attribute (not a
# constant baked into a function) so tests can point it elsewhere.
SYSTEM_DATA_DIRS: tuple[str, ...] = ('/usr/share/datasets/fashion-mnist',)
DATA_DIR_ENV = 'SSL_JAX_DATA_DIR'


def fashion_mnist_cache_dir() -> pathlib.Path:
  """~/.cache/ssl_jax/fashion-mnist: where download=True puts the files by default."""
  return pathlib.Path.home() / '.cache' / 'ssl_jax' / 'fashion-mnist'


def fashion_mnist_search_dirs(data_dir: os.PathLike | str | None = None) -> list[pathlib.Path]:
  """The folders searched for the IDX files, in order.

  An explicit `data_dir` is the only place searched (its ``fashion-mnist/`` subfolder too);
  otherwise ``$SSL_JAX_DATA_DIR/fashion-mnist`` (and ``$SSL_JAX_DATA_DIR``) if the variable
  is set, then `SYSTEM_DATA_DIRS`, then `fashion_mnist_cache_dir()`.
  """
  if data_dir is not None:
    root = pathlib.Path(data_dir).expanduser()
    return [root, root / 'fashion-mnist']
  dirs = []
  env = os.environ.get(DATA_DIR_ENV)
  if env:
    root = pathlib.Path(env).expanduser()
    dirs += [root / 'fashion-mnist', root]
  dirs += [pathlib.Path(d) for d in SYSTEM_DATA_DIRS]
  dirs.append(fashion_mnist_cache_dir())
  return dirs


def _find_file(folder: pathlib.Path, gz_name: str) -> pathlib.Path | None:
  for name in (gz_name, gz_name[:-len('.gz')]):  # accept the files gunzipped, too
    if (folder / name).is_file():
      return folder / name
  return None


def _find_split(dirs: Sequence[pathlib.Path], split: str):
  images_name, labels_name, _ = _FASHION_MNIST_FILES[split]
  for folder in dirs:
    images, labels = _find_file(folder, images_name), _find_file(folder, labels_name)
    if images is not None and labels is not None:
      return images, labels
  return None


def _missing_message(split: str, dirs: Sequence[pathlib.Path], data_dir) -> str:
  images_name, labels_name, _ = _FASHION_MNIST_FILES[split]
  all_files = ', '.join(_FASHION_MNIST_SHA256)
  looked = '\n'.join(f'    {d}' for d in dirs)
  return (
      f'Fashion-MNIST ({split} split) not found: no folder has both {images_name} and '
      f'{labels_name}. Looked in:\n{looked}\n'
      'Fix it with one of:\n'
      '  * Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist\n'
      f'    (installs the four files into {SYSTEM_DATA_DIRS[0]});\n'
      f'  * put the four files ({all_files}) in a folder and pass data_dir=<folder> '
      f'(--config.data.data_dir=<folder>), or set {DATA_DIR_ENV}=<root> with the files in '
      '<root>/fashion-mnist/;\n'
      '  * pass download=True (--config.data.download=True) to download them once from '
      f'{FASHION_MNIST_URL} into '
      f'{pathlib.Path(data_dir).expanduser() if data_dir is not None else fashion_mnist_cache_dir()}.')


def _download_one(url: str, dest: pathlib.Path, sha256: str | None, timeout: float = 120.0):
  """Downloads `url` to `dest` atomically: a temporary file in the same folder, verified
  (complete, parses as IDX, content checksum), then renamed. Nothing is left on failure."""
  dest.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f'.{dest.name}.', suffix='.part')
  tmp = pathlib.Path(tmp_name)
  try:
    with os.fdopen(fd, 'wb') as f:
      try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
          expected = response.headers.get('Content-Length')
          while chunk := response.read(1 << 20):
            f.write(chunk)
      except (urllib.error.URLError, OSError) as e:
        raise OSError(f'Downloading {url} failed: {e}') from e
      f.flush()
      os.fsync(f.fileno())
    size = tmp.stat().st_size
    if expected is not None and size != int(expected):
      raise OSError(f'Downloading {url} failed: got {size} bytes, the server announced '
                    f'{expected}.')
    try:
      payload = _read_idx_payload(tmp)
      _parse_idx(payload, url)
    except IdxFormatError as e:
      raise OSError(f'Downloaded {url} is not a valid IDX file: {e}') from e
    if sha256 is not None and hashlib.sha256(payload).hexdigest() != sha256:
      raise OSError(f'Downloaded {url} has the wrong content (SHA-256 of the uncompressed '
                    f'data {hashlib.sha256(payload).hexdigest()}, expected {sha256}).')
    os.replace(tmp, dest)
  finally:
    tmp.unlink(missing_ok=True)


def _download_fashion_mnist(folder: pathlib.Path) -> None:
  for name, sha256 in _FASHION_MNIST_SHA256.items():
    if _find_file(folder, name) is None:
      _download_one(FASHION_MNIST_URL + name, folder / name, sha256)


@functools.lru_cache(maxsize=4)
def _load_cached(images_path: str, labels_path: str, n: int, signature) -> ArraySource:
  del signature  # part of the cache key only: a replaced file is read again.
  images, labels = read_idx(images_path), read_idx(labels_path)
  if images.dtype != np.uint8 or images.shape != (n, 28, 28):
    raise IdxFormatError(f'{images_path}: expected uint8 images of shape ({n}, 28, 28), got '
                         f'{images.dtype} {images.shape}; not the Fashion-MNIST file.')
  if labels.dtype != np.uint8 or labels.shape != (n,) or labels.max() > 9:
    raise IdxFormatError(f'{labels_path}: expected {n} uint8 labels in 0..9, got '
                         f'{labels.dtype} {labels.shape}; not the Fashion-MNIST file.')
  # Shared between every caller (trainer, evaluator): make accidental writes an error.
  images.flags.writeable = False
  labels = labels.astype(np.int32)
  labels.flags.writeable = False
  return ArraySource(images, labels)


def fashion_mnist(split: str, data_dir: os.PathLike | str | None = None,
                  download: bool = False) -> ArraySource:
  """Fashion-MNIST as an `ArraySource`: 'train' (60000) or 'test' (10000) 28x28x1 images.

  Searches `fashion_mnist_search_dirs(data_dir)`. With ``download=True`` and no files found,
  downloads the four files from `FASHION_MNIST_URL` into `data_dir` (if given) or
  `fashion_mnist_cache_dir()`. Otherwise raises FileNotFoundError saying how to get them.
  The parsed arrays are cached (read-only), so the trainer and evaluator share one copy.
  """
  if split not in _FASHION_MNIST_FILES:
    raise ValueError(f'Fashion-MNIST has splits {sorted(_FASHION_MNIST_FILES)}, not {split!r}.')
  dirs = fashion_mnist_search_dirs(data_dir)
  found = _find_split(dirs, split)
  if found is None and download:
    target = (pathlib.Path(data_dir).expanduser() if data_dir is not None
              else fashion_mnist_cache_dir())
    _download_fashion_mnist(target)
    found = _find_split([target], split)
  if found is None:
    raise FileNotFoundError(_missing_message(split, dirs, data_dir))
  images_path, labels_path = (p.resolve() for p in found)
  signature = tuple((s.st_mtime_ns, s.st_size)
                    for s in (images_path.stat(), labels_path.stat()))
  return _load_cached(str(images_path), str(labels_path), _FASHION_MNIST_FILES[split][2],
                      signature)


# --------------------------------------------------------------------------------------------
# TFDS.
# --------------------------------------------------------------------------------------------


def _to_record(record: dict, image_key: str, label_key: str) -> dict[str, np.ndarray]:
  image = np.asarray(record[image_key])
  if image.dtype != np.uint8:
    raise TypeError(f'{image_key!r} must be uint8 images, got {image.dtype}.')
  if image.ndim == 2:
    image = image[..., None]
  label = np.asarray(record[label_key])
  if label.ndim != 0 or not np.issubdtype(label.dtype, np.integer):
    raise TypeError(f'{label_key!r} must be an integer scalar, got {label.dtype} '
                    f'{label.shape}.')
  return {'image': image, 'label': np.int32(label)}


class TfdsSource:
  """Wraps a TFDS data source (`tfds.data_source`) to yield {'image', 'label'} records."""

  def __init__(self, data_source: Any, *, image_key: str = 'image', label_key: str = 'label',
               name: str | None = None, split: str | None = None):
    self.data_source = data_source
    self.image_key, self.label_key = image_key, label_key
    self.name, self.split = name, split

  def __len__(self) -> int:
    return len(self.data_source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return _to_record(self.data_source[int(index)], self.image_key, self.label_key)

  def get_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
    """Reads the records with one batched (parallel) read where the source supports it."""
    keys = [int(i) for i in indices]
    read_many = getattr(self.data_source, '__getitems__', None)
    records = None
    if read_many is not None:
      try:
        records = read_many(keys)
      except TypeError:
        # tfds.testing.mock_data (4.9.10) installs a broken __getitems__; read one by one.
        records = None
    if records is None:
      records = [self.data_source[k] for k in keys]
    records = [_to_record(r, self.image_key, self.label_key) for r in records]
    try:
      images = np.stack([r['image'] for r in records])
    except ValueError as e:
      raise ValueError(f'{self!r}: images of different shapes cannot be batched; resize them '
                       'to a fixed size first.') from e
    return {'image': images, 'label': np.array([r['label'] for r in records], np.int32)}

  def __repr__(self) -> str:
    return f'TfdsSource(name={self.name!r}, split={self.split!r}, n={len(self)})'


def _tfds_default_data_dir(data_dir) -> str:
  if data_dir is not None:
    return str(data_dir)
  return os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets')


def _tfds_not_prepared_message(name: str, data_dir, builder, reason: str) -> str:
  root = _tfds_default_data_dir(data_dir)
  dir_flag = f' --data_dir={data_dir}' if data_dir is not None else ''
  dir_kwarg = f', data_dir={str(data_dir)!r}' if data_dir is not None else ''
  base = name.split('/')[0].split(':')[0]
  lines = [f'TFDS dataset {name!r} is {reason} in {root}.']
  if base == 'imagenet2012':
    manual = getattr(builder, 'manual_dir', None) or f'{root}/downloads/manual'
    lines.append(
        'ImageNet cannot be downloaded automatically: place ILSVRC2012_img_train.tar and '
        f'ILSVRC2012_img_val.tar (from https://image-net.org) in {manual}/, then run')
  else:
    lines.append('Prepare it (random access needs the array_record format) with')
  lines.append(f'    tfds build {name}{dir_flag} --file_format=array_record')
  lines.append('or in Python:')
  lines.append(f'    tfds.builder({name!r}{dir_kwarg}, file_format="array_record")'
               '.download_and_prepare()')
  if base != 'imagenet2012':
    lines.append('(or pass download=True / --config.data.download=True to let TFDS do it).')
  return '\n'.join(lines)


def tfds_source(name: str, split: str, data_dir: os.PathLike | str | None = None,
                download: bool = False, *, image_key: str = 'image',
                label_key: str = 'label') -> TfdsSource:
  """A prepared TFDS dataset as a source of {'image': uint8 HxWxC, 'label': int32}.

  Uses `tfds.data_source` (random access; needs the ``array_record`` file format). If the
  dataset is not prepared, raises FileNotFoundError saying how to prepare it. With
  ``download=True`` TFDS downloads and prepares it first.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)

  try:
    ds = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
  except tfds.core.registered.DatasetNotFoundError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (diagnosed below, else re-raised)
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
      raise FileNotFoundError(
          _tfds_not_prepared_message(name, data_dir, builder, 'not prepared')) from e
    file_format = getattr(builder.info, 'file_format', None)
    if file_format is not None and 'array_record' not in str(file_format).lower():
      raise FileNotFoundError(_tfds_not_prepared_message(
          name, data_dir, builder,
          f'prepared only in the {file_format} format (no random access; delete '
          f'{builder.data_dir} or use another data_dir)')) from e
    raise
  return TfdsSource(ds, image_key=image_key, label_key=label_key, name=name, split=split)


# --------------------------------------------------------------------------------------------
# Registry.
# --------------------------------------------------------------------------------------------


class SourceInfo(NamedTuple):
  image_shape: tuple  # (H, W, C); H and W are None for variable-size TFDS images
  num_classes: int


KNOWN_SOURCES: dict[str, Callable[..., Any]] = {'fashion_mnist': fashion_mnist}
_STATIC_INFO = {'fashion_mnist': SourceInfo((28, 28, 1), 10)}
TFDS_PREFIX = 'tfds:'


def _unknown(name: str) -> ValueError:
  return ValueError(f'Unknown data source {name!r}; known: {sorted(KNOWN_SOURCES)} or '
                    f"'{TFDS_PREFIX}<tfds dataset name>' (e.g. '{TFDS_PREFIX}cifar10').")


def get_source(name: str, split: str, data_dir: os.PathLike | str | None = None,
               download: bool = False):
  """'fashion_mnist' -> `fashion_mnist`; 'tfds:<name>' -> `tfds_source`."""
  if name.startswith(TFDS_PREFIX) and len(name) > len(TFDS_PREFIX):
    return tfds_source(name[len(TFDS_PREFIX):], split, data_dir=data_dir, download=download)
  if name not in KNOWN_SOURCES:
    raise _unknown(name)
  return KNOWN_SOURCES[name](split, data_dir=data_dir, download=download)


def source_info(name: str, data_dir: os.PathLike | str | None = None, *,
                image_key: str = 'image', label_key: str = 'label') -> SourceInfo:
  """(image_shape, num_classes) of a source without reading its data."""
  if name.startswith(TFDS_PREFIX) and len(name) > len(TFDS_PREFIX):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    features = tfds.builder(name[len(TFDS_PREFIX):], data_dir=data_dir).info.features
    return SourceInfo(tuple(features[image_key].shape), int(features[label_key].num_classes))
  if name not in _STATIC_INFO:
    raise _unknown(name)
  return _STATIC_INFO[name]


def class_names(name: str, data_dir: os.PathLike | str | None = None,
                label_key: str = 'label') -> tuple[str, ...] | None:
  """Human-readable class names (for plot legends), or None when the source has none."""
  if name == 'fashion_mnist':
    return FASHION_MNIST_CLASSES
  if name.startswith(TFDS_PREFIX) and len(name) > len(TFDS_PREFIX):
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

      builder = tfds.builder(name[len(TFDS_PREFIX):], data_dir=data_dir)
      return tuple(builder.info.features[label_key].names)
    except Exception:  # pylint: disable=broad-except
      return None  # legends fall back to class indices
  return None
