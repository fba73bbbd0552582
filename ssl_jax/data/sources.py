"""Random-access data sources: len(source) and source[i] -> {'image', 'label'}.

The source protocol:

* ``source[i] -> {'image': ..., 'label': int32 scalar}``; the label is -1 for an unlabelled
  record.
* ``source.encoded``: True -> ``record['image']`` is an encoded file (JPEG, PNG, ...) as
  `bytes`, decoded on the host by the input pipeline (variable-size datasets); False -> a
  uint8 [H, W, C] array.
* ``source.image_shape``: (H, W, C) for fixed-size sources, None for encoded ones.
* ``source.channels``: the channels the model sees (3 for encoded colour datasets: the
  decoder converts grayscale files to RGB).
* ``source.has_labels``, ``source.num_classes`` (None when there is no label space) and
  ``source.class_names`` (None when unknown).
* ``source.describe(i)``: a human name of record i for warnings (a file path, or e.g.
  ``'imagenet2012/train[1234]'``).
* optionally ``get_batch(indices) -> {'image': uint8 [n, H, W, C], 'label': int32 [n]}``, a
  vectorised read of a fixed-size source that the input pipeline (`ssl_jax.data.pipeline`)
  uses when present.

Sources are plain picklable objects, so they can be handed to grain (`grain.MapDataset.source`)
and to grain worker processes.

* `fashion_mnist(split)`: Fashion-MNIST from the IDX files of Debian's
  ``dataset-fashion-mnist`` package (or any folder holding the four files), optionally
  downloaded once into a cache folder. Never falls back to random data.
* `tfds_source(name, split)`: any TFDS dataset prepared in the ``array_record`` format.
* `folder.FolderSource` / `folder.folder_source(path, split)`: image files in a folder
  (``root/<class>/<file>`` or ``root/<file>``).
* `get_source(name, split)`: the registry behind ``--config.data.name``:
  ``'fashion_mnist'``, ``'tfds:<name>'`` or ``'folder:<path>'``, and the image-caption
  sources of `ssl_jax.data.captions` (records with 'texts' too): ``'fashion_mnist_captions'``,
  ``'pairs:<file>'`` and ``'tfds:coco_captions'``.
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

from ssl_jax import config_lib
from ssl_jax.data import folder

__all__ = [
    'ArraySource', 'CAPTION_SOURCES', 'FASHION_MNIST_CLASSES', 'FOLDER_PREFIX', 'IdxFormatError',
    'KNOWN_SOURCES', 'PAIRS_PREFIX', 'SourceInfo', 'TFDS_PREFIX', 'TfdsSource', 'fashion_mnist', 'fashion_mnist_search_dirs',
    'get_source', 'is_known_name', 'read_idx', 'class_names', 'source_info', 'tfds_source',
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
    labels: integer [N]; stored as int32 (-1: unlabelled).
    num_classes, class_names: the label space, when known (class_names implies it).
    name: names the records in `describe` (``'<name>[i]'``).

  The arrays are kept without copying (read-only inputs stay read-only).
  """

  encoded = False

  def __init__(self, images: np.ndarray, labels: np.ndarray, *, num_classes: int | None = None,
               class_names: Sequence[str] | None = None, name: str = 'ArraySource'):
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
    self.class_names = tuple(class_names) if class_names is not None else None
    if num_classes is None and self.class_names is not None:
      num_classes = len(self.class_names)
    self.num_classes = num_classes
    # Unlabelled only when every label is -1 (one vectorised pass; no data is copied).
    self.has_labels = not (self.labels.size and bool(np.all(self.labels == -1)))
    self.name = name

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

  @property
  def channels(self) -> int:
    return self.images.shape[-1]

  def describe(self, index: int) -> str:
    return f'{self.name}[{int(index)}]'

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
def _load_cached(images_path: str, labels_path: str, n: int, signature,
                 name: str = 'fashion_mnist') -> ArraySource:
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
  return ArraySource(images, labels, class_names=FASHION_MNIST_CLASSES, name=name)


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
                      signature, f'fashion_mnist/{split}')


# --------------------------------------------------------------------------------------------
# TFDS.
# --------------------------------------------------------------------------------------------


# Split names whose records carry no label (stl10's 'unlabelled': label -1).
_UNLABELLED_SPLITS = frozenset({'unlabelled', 'unlabeled'})


def _split_names(split: Any) -> list[str]:
  """'train[:10%]+unlabelled' -> ['train', 'unlabelled']; [] for a non-str split."""
  if not isinstance(split, str):
    return []
  return [part.split('[')[0].strip() for part in split.split('+')]


def _to_record(record: dict, image_key: str, label_key: str | None,
               encoded: bool = False) -> dict[str, Any]:
  image = record[image_key]
  if encoded:
    if isinstance(image, np.ndarray) and image.ndim == 0:  # a 0-d object/bytes array
      image = image.item()
    if not isinstance(image, (bytes, bytearray, memoryview)):
      raise TypeError(f'{image_key!r} must be the encoded image as bytes, got '
                      f'{type(image).__name__}.')
    image = bytes(image)
  else:
    image = np.asarray(image)
    if image.dtype != np.uint8:
      raise TypeError(f'{image_key!r} must be uint8 images, got {image.dtype}.')
    if image.ndim == 2:
      image = image[..., None]
  if label_key is None:
    return {'image': image, 'label': np.int32(-1)}
  label = np.asarray(record[label_key])
  if label.ndim != 0 or not np.issubdtype(label.dtype, np.integer):
    raise TypeError(f'{label_key!r} must be an integer scalar, got {label.dtype} '
                    f'{label.shape}.')
  return {'image': image, 'label': np.int32(label)}


class TfdsSource:
  """Wraps a TFDS data source (`tfds.data_source`) to yield {'image', 'label'} records.

  `tfds_source` fills in the protocol attributes from the dataset's features. With
  ``encoded=True`` the data source must have been opened with the image decoding skipped
  (records carry the encoded bytes) and `get_batch` is an error. ``label_key=None``: the
  dataset has no labels (every label is -1).
  """

  def __init__(self, data_source: Any, *, image_key: str = 'image',
               label_key: str | None = 'label', name: str | None = None,
               split: str | None = None, encoded: bool = False, has_labels: bool | None = None,
               num_classes: int | None = None, class_names: Sequence[str] | None = None,
               image_shape: tuple[int, int, int] | None = None, channels: int | None = None):
    self.data_source = data_source
    self.image_key, self.label_key = image_key, label_key
    self.name, self.split = name, split
    self.encoded = encoded
    self.has_labels = label_key is not None if has_labels is None else bool(has_labels)
    self.class_names = tuple(class_names) if class_names is not None else None
    if num_classes is None and self.class_names is not None:
      num_classes = len(self.class_names)
    self.num_classes = num_classes
    if image_shape is None and not encoded and len(data_source):
      image_shape = tuple(self[0]['image'].shape)  # wrapped by hand: ask the data
    self.image_shape = tuple(image_shape) if image_shape is not None else None
    if channels is None:
      channels = self.image_shape[-1] if self.image_shape is not None else 3
    self.channels = int(channels)

  def __len__(self) -> int:
    return len(self.data_source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return _to_record(self.data_source[int(index)], self.image_key, self.label_key,
                      self.encoded)

  def describe(self, index: int) -> str:
    return f'{self.name or "tfds"}/{self.split}[{int(index)}]'

  def get_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
    """Reads the records with one batched (parallel) read where the source supports it."""
    if self.encoded:
      raise TypeError(
          f'{self!r} holds encoded images of varying size, which cannot be stacked into a '
          'batch: read records with source[i] and decode them on the host (the input '
          'pipeline does this for sources with encoded=True).')
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
    return (f'TfdsSource(name={self.name!r}, split={self.split!r}, n={len(self)}'
            f'{", encoded" if self.encoded else ""})')


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


def _image_feature_info(features: Any, name: str, image_key: str):
  """(is the image stored encoded with a variable size, image shape or None, channels)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if image_key not in features:
    raise KeyError(f'TFDS dataset {name!r} has no {image_key!r} feature; its features are '
                   f'{sorted(features.keys())}. Pass image_key=<one of them>.')
  feature = features[image_key]
  shape = tuple(feature.shape)
  variable = any(d is None for d in shape)
  # Only an Image feature is stored as an encoded file that SkipDecoding hands over as bytes.
  encoded = variable and isinstance(feature, tfds.features.Image)
  channels = shape[-1] if shape and shape[-1] is not None else 3
  return encoded, (None if variable else shape), channels


def _label_feature_info(features: Any, label_key: str):
  """(has the label feature, num_classes or None, class names or None)."""
  if label_key not in features:
    return False, None, None
  feature = features[label_key]
  num_classes = getattr(feature, 'num_classes', None)
  names = getattr(feature, 'names', None)
  return True, (int(num_classes) if num_classes is not None else None), (
      tuple(names) if names else None)


def tfds_source(name: str, split: str, data_dir: os.PathLike | str | None = None,
                download: bool = False, *, image_key: str = 'image',
                label_key: str = 'label') -> TfdsSource:
  """A prepared TFDS dataset as a source of {'image', 'label': int32} records.

  Fixed-size datasets (cifar10, mnist, stl10) give decoded uint8 [H, W, C] images. Datasets
  whose image feature has a variable height/width (imagenet2012, imagenette, ...) are opened
  with the image decoding skipped (``decoders={image_key: tfds.decode.SkipDecoding()}``):
  records carry the encoded JPEG/PNG bytes, to be decoded on the host (``encoded=True``).

  ``has_labels`` is False when the dataset has no `label_key`, when any part of the split is
  an unlabelled split (stl10's 'unlabelled'), or when the first record's label is -1
  (imagenet2012's 'test'). Labels are passed through as stored; -1 without a label feature.

  Uses `tfds.data_source` (random access; needs the ``array_record`` file format). If the
  dataset is not prepared, raises FileNotFoundError saying how to prepare it. With
  ``download=True`` TFDS downloads and prepares it first.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)

  # The metadata alone (dataset_info.json, or the builder code when not prepared) decides
  # whether to skip the image decoding, which has to be chosen when the source is opened.
  builder = tfds.builder(name, data_dir=data_dir)
  features = builder.info.features
  encoded, image_shape, channels = _image_feature_info(features, name, image_key)
  has_label_key, num_classes, names = _label_feature_info(features, label_key)
  decoders = {image_key: tfds.decode.SkipDecoding()} if encoded else None
  try:
    ds = tfds.data_source(name, split=split, data_dir=data_dir, download=download,
                          decoders=decoders)
  except tfds.core.registered.DatasetNotFoundError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (diagnosed below, else re-raised)
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
  has_labels = has_label_key and not _UNLABELLED_SPLITS & set(_split_names(split))
  if has_labels and len(ds):
    # Splits whose labels were withheld store -1 (imagenet2012 'test'): one record tells.
    has_labels = int(np.asarray(ds[0][label_key])) != -1
  return TfdsSource(ds, image_key=image_key, label_key=label_key if has_label_key else None,
                    name=name, split=split, encoded=encoded, has_labels=has_labels,
                    num_classes=num_classes, class_names=names, image_shape=image_shape,
                    channels=channels)


# --------------------------------------------------------------------------------------------
# Registry.
# --------------------------------------------------------------------------------------------


class SourceInfo(NamedTuple):
  image_shape: tuple  # (H, W, C); H and W are None for variable-size (encoded) images
  num_classes: int | None  # None: no label space (an unlabelled folder)


KNOWN_SOURCES: dict[str, Callable[..., Any]] = {'fashion_mnist': fashion_mnist}
# Named caption sources (`ssl_jax.data.captions`), built with the text settings: not in
# KNOWN_SOURCES, whose entries take only (split, data_dir, download).
CAPTION_SOURCES = ('fashion_mnist_captions',)
_STATIC_INFO = {'fashion_mnist': SourceInfo((28, 28, 1), 10),
                'fashion_mnist_captions': SourceInfo((28, 28, 1), 10)}
TFDS_PREFIX = 'tfds:'
FOLDER_PREFIX = 'folder:'
PAIRS_PREFIX = 'pairs:'


def _after(name: str, prefix: str) -> str | None:
  """The part of `name` after `prefix`, or None if `name` is not '<prefix><something>'."""
  if isinstance(name, str) and name.startswith(prefix) and len(name) > len(prefix):
    return name[len(prefix):]
  return None


def is_known_name(name: str) -> bool:
  """Whether `get_source` accepts `name`: a `KNOWN_SOURCES` or `CAPTION_SOURCES` name,
  'tfds:<x>', 'folder:<x>' or 'pairs:<x>'.

  Checks the form only: the TFDS dataset, the folder or the file may still not exist.
  """
  return (name in KNOWN_SOURCES or name in CAPTION_SOURCES
          or any(_after(name, p) is not None for p in (TFDS_PREFIX, FOLDER_PREFIX,
                                                         PAIRS_PREFIX)))


def _unknown(name: str) -> ValueError:
  return ValueError(
      f'Unknown data source {name!r}; use one of {sorted(KNOWN_SOURCES)}, '
      f"'{TFDS_PREFIX}<tfds dataset name>' (e.g. '{TFDS_PREFIX}cifar10', "
      f"'{TFDS_PREFIX}imagenet2012') or '{FOLDER_PREFIX}<path>' (a folder of images: "
      '<path>/<class>/<image> or <path>/<image>, optionally in <path>/<split>/ sub-folders); '
      f"for image-text data one of {list(CAPTION_SOURCES)}, '{PAIRS_PREFIX}<file.jsonl|csv>' "
      f"or '{TFDS_PREFIX}coco_captions'.")


def _folder_path(path: str, data_dir: os.PathLike | str | None) -> pathlib.Path:
  """'folder:<path>': ~ expanded; a relative path is taken under data_dir when one is given."""
  folder_path = pathlib.Path(path).expanduser()
  if not folder_path.is_absolute() and data_dir is not None:
    folder_path = pathlib.Path(data_dir).expanduser() / folder_path
  return folder_path


class MissingDataError(config_lib.DataError, FileNotFoundError):
  """A dataset that is not where it was looked for; the message says how to get it. A
  FileNotFoundError, and a config error that the command line prints without a traceback."""


def get_source(name: str, split: str, data_dir: os.PathLike | str | None = None,
               download: bool = False, text: Any = None):
  """'fashion_mnist' -> `fashion_mnist`; 'tfds:<name>' -> `tfds_source`; 'folder:<path>' ->
  `folder.folder_source` (``<path>/<split>`` if that folder exists, else ``<path>`` for every
  split; a relative path is under `data_dir`; `download` does not apply).

  Image-caption sources (`ssl_jax.data.captions`; records also carry 'texts'):
  'fashion_mnist_captions' -> `captions.fashion_mnist_captions`; 'pairs:<file>' ->
  `captions.pairs_source` (a relative path is under `data_dir`); 'tfds:coco_captions' (the
  datasets in `captions.CAPTION_TFDS_DATASETS`) -> `captions.tfds_captions_source`. `text`
  (``config.text``: a mapping or ConfigDict with tokenizer, context_length,
  captions_per_image, other fields ignored; missing
  fields and ``text=None`` take `captions.TextSpec`'s defaults: 'bytes', 32, 5) sets how
  they tokenize; image sources ignore it.

  Data that is missing raises `MissingDataError`, a folder that cannot serve
  `folder.ImageFolderError`: both name the fix."""
  try:
    return _get_source(name, split, data_dir, download, text)
  except (FileNotFoundError, NotADirectoryError) as e:
    if isinstance(e, MissingDataError):
      raise
    raise MissingDataError(str(e)) from e


def _get_source(name: str, split: str, data_dir, download: bool, text: Any = None):
  if name in CAPTION_SOURCES or _is_caption_tfds(name) or _after(name, PAIRS_PREFIX):
    from ssl_jax.data import captions  # pylint: disable=g-import-not-at-top  (imports us)

    if name == 'fashion_mnist_captions':
      return captions.fashion_mnist_captions(split, data_dir=data_dir, download=download,
                                             text=text)
    if (path := _after(name, PAIRS_PREFIX)) is not None:
      return captions.pairs_source(_folder_path(path, data_dir), split, text=text)
    return captions.tfds_captions_source(_after(name, TFDS_PREFIX), split, data_dir=data_dir,
                                         download=download, text=text)
  if (tfds_name := _after(name, TFDS_PREFIX)) is not None:
    return tfds_source(tfds_name, split, data_dir=data_dir, download=download)
  if (path := _after(name, FOLDER_PREFIX)) is not None:
    return folder.folder_source(_folder_path(path, data_dir), split)
  if name not in KNOWN_SOURCES:
    raise _unknown(name)
  return KNOWN_SOURCES[name](split, data_dir=data_dir, download=download)


def _is_caption_tfds(name: str) -> bool:
  """'tfds:coco_captions' (any version/config): a TFDS dataset served with its captions."""
  tfds_name = _after(name, TFDS_PREFIX)
  return tfds_name is not None and tfds_name.split('/')[0].split(':')[0] in _CAPTION_TFDS


_CAPTION_TFDS = frozenset({'coco_captions'})  # = captions.CAPTION_TFDS_DATASETS' keys


def source_info(name: str, data_dir: os.PathLike | str | None = None, *, split: str = 'train',
                image_key: str = 'image', label_key: str = 'label') -> SourceInfo:
  """(image_shape, num_classes) of a source without reading its data.

  For 'folder:<path>' this lists the top level of the folder serving `split` (classes are
  its sub-folders); num_classes is None for a flat (unlabelled) folder. For 'pairs:<file>'
  it reads the pairs file (not the images): num_classes is the largest label + 1, None
  without labels.
  """
  if (path := _after(name, PAIRS_PREFIX)) is not None:
    from ssl_jax.data import captions  # pylint: disable=g-import-not-at-top

    _, _, labels = captions.read_pairs(captions.pairs_path(_folder_path(path, data_dir), split))
    return SourceInfo((None, None, 3), int(labels.max()) + 1 if (labels != -1).any() else None)
  if (tfds_name := _after(name, TFDS_PREFIX)) is not None:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    features = tfds.builder(tfds_name, data_dir=data_dir).info.features
    _, num_classes, _ = _label_feature_info(features, label_key)
    return SourceInfo(tuple(features[image_key].shape), num_classes)
  if (path := _after(name, FOLDER_PREFIX)) is not None:
    names = folder.folder_classes(_folder_path(path, data_dir), split)
    return SourceInfo((None, None, 3), len(names) if names is not None else None)
  if name not in _STATIC_INFO:
    raise _unknown(name)
  return _STATIC_INFO[name]


def class_names(name: str, data_dir: os.PathLike | str | None = None,
                label_key: str = 'label', *, split: str = 'train') -> tuple[str, ...] | None:
  """Human-readable class names (for plot legends), or None when the source has none."""
  if name in ('fashion_mnist', 'fashion_mnist_captions'):
    return FASHION_MNIST_CLASSES
  if (tfds_name := _after(name, TFDS_PREFIX)) is not None:
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

      builder = tfds.builder(tfds_name, data_dir=data_dir)
      return tuple(builder.info.features[label_key].names)
    except Exception:  # pylint: disable=broad-except
      return None  # legends fall back to class indices
  if (path := _after(name, FOLDER_PREFIX)) is not None:
    try:
      return folder.folder_classes(_folder_path(path, data_dir), split)
    except (OSError, folder.ImageFolderError):
      return None  # get_source reports a broken folder; legends fall back to indices
  return None
