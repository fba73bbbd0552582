"""Image-folder sources: the image files under a folder, one record per file.

Two layouts are recognised:

* labelled (the ImageNet / torchvision ``ImageFolder`` layout): ``root/<class>/<file>``. The
  class index is the position of ``<class>`` in the sorted names of the sub-folders, so it
  is the same for every split folder holding the same class folders. Files may sit deeper
  (``root/<class>/<sub>/<file>``); they belong to ``<class>``.
* unlabelled (flat): ``root/<file>``; every label is -1.

Image files are those with the extensions in `IMAGE_EXTENSIONS` (any case); other files and
hidden files and folders (names starting with ``.``) are ignored. Records are sorted (class,
then path), so index ``i`` names the same file on every host and after a restart.

A record holds the file's raw bytes (``encoded=True``); the input pipeline decodes them on
the host. Sources are plain picklable objects for grain worker processes: the paths are
kept as one byte buffer plus offsets (~20 bytes a file for ImageNet), not a list of str.

Empty class folders: a sub-folder without image files is still a class (it keeps its index
and counts in ``num_classes``; a warning names it), so a split in which a class happens to be
empty maps every other class to the same index as the full split.
"""

from __future__ import annotations

import os
import pathlib
from typing import Sequence

from absl import logging
import numpy as np

from ssl_jax import config_lib

__all__ = [
    'FolderSource', 'IMAGE_EXTENSIONS', 'ImageFolderError', 'ImageReadError', 'folder_classes',
    'folder_source', 'resolved_folder',
]

IMAGE_EXTENSIONS = ('.bmp', '.gif', '.jpeg', '.jpg', '.png', '.tif', '.tiff', '.webp')
_EXTENSIONS = frozenset(IMAGE_EXTENSIONS)
# Sub-folder names that mean "split", not "class": a folder holding only these is a dataset
# root whose split folders were not matched, never a class layout (see `resolved_folder`).
_SPLIT_NAMES = frozenset({'train', 'training', 'val', 'valid', 'validation', 'test', 'testing',
                          'eval', 'evaluation', 'dev', 'unlabelled', 'unlabeled'})
# Where a split folder is missing, the folders tried next, in order: ImageNet-style folders
# have train/ and val/ but no labelled test/, and the default evaluation split is 'test'.
_SPLIT_FALLBACKS = {'test': ('val', 'validation'), 'val': ('validation',),
                    'validation': ('val',)}
_LAYOUTS = ('root/<class>/<image> (labelled: one sub-folder per class, as in ImageNet\'s '
            'train/ folder) or root/<image> (unlabelled: the images directly in the folder)')


class ImageFolderError(config_lib.DataError):
  """A folder cannot serve as an image source (no images, mixed layouts, unmatched split);
  a ValueError that the command line prints alone, as a config error."""


class ImageReadError(OSError):
  """An image file of a `FolderSource` could not be read (deleted, no permission, I/O error).

  An OSError whose ``filename`` is the file's path, raised from the original error, so the
  pipeline can skip the record and name the file.
  """


def _is_image(name: str) -> bool:
  return os.path.splitext(name)[1].lower() in _EXTENSIONS


def _is_hidden(name: str) -> bool:
  return name.startswith('.')


def _check_folder(root: pathlib.Path) -> None:
  if not root.exists():
    raise FileNotFoundError(
        f'Image folder {root} does not exist. Pass the folder holding the images, laid out '
        f'as {_LAYOUTS}.')
  if not root.is_dir():
    raise NotADirectoryError(
        f'{root} is a file, not a folder. Pass a folder of images laid out as {_LAYOUTS} '
        '(extract an archive first).')


def _scan_top(root: str) -> tuple[list[str], list[str], list[str]]:
  """(image files, sub-folders, other files) directly in `root`; hidden entries skipped."""
  images, folders, others = [], [], []
  with os.scandir(root) as entries:
    for entry in entries:
      name = entry.name
      if _is_hidden(name):
        continue
      # DirEntry.is_dir/is_file use the d_type of readdir: no stat per file (except links).
      if entry.is_dir():
        folders.append(name)
      elif entry.is_file():
        (images if _is_image(name) else others).append(name)
  return images, folders, others


def _list_images(folder: str) -> list[str]:
  """Image files under `folder` (recursively), as sorted paths relative to it."""
  found = []
  seen = set()  # (device, inode) of visited folders: a symlink loop must not recurse forever
  stack = [(folder, '')]
  while stack:
    path, prefix = stack.pop()
    st = os.stat(path)
    if (st.st_dev, st.st_ino) in seen:
      continue
    seen.add((st.st_dev, st.st_ino))
    with os.scandir(path) as entries:
      for entry in entries:
        name = entry.name
        if _is_hidden(name):
          continue
        if _is_image(name):
          if entry.is_file():
            found.append(prefix + name)
          elif entry.is_dir():  # a folder named like an image file
            stack.append((entry.path, prefix + name + os.sep))
        elif entry.is_dir():
          stack.append((entry.path, prefix + name + os.sep))
  found.sort()
  return found


def _examples(names: Sequence[str], k: int = 3) -> str:
  shown = ', '.join(sorted(names)[:k])
  return shown + (', ...' if len(names) > k else '')


def _no_images_message(root: str, others: Sequence[str]) -> str:
  message = (f'No image files in {root}. Recognised extensions (any case): '
             f'{" ".join(IMAGE_EXTENSIONS)}; hidden files and folders are ignored. Lay the '
             f'images out as {_LAYOUTS}.')
  if others:
    message += f' Found {len(others)} other file(s), e.g. {_examples(others)}.'
  return message


class FolderSource:
  """The image files under a folder as a random-access source of encoded images.

  Args:
    root: the folder, laid out as ``root/<class>/<file>`` (labelled) or ``root/<file>``
      (unlabelled); see the module docstring.
    channels: the channels the decoded images have (the decoder converts every file, e.g. a
      grayscale JPEG, to this many): 3 (RGB) or 1.

  Records are ``{'image': bytes (the file's content), 'label': int32}`` (label -1 when
  unlabelled). Raises FileNotFoundError / NotADirectoryError for a missing path or a file,
  and `ImageFolderError` for a folder without image files or with both top-level images and
  class sub-folders holding images. Reading a record that can no longer be read raises
  `ImageReadError` naming the file.
  """

  encoded = True
  image_shape = None  # variable size: decoded (and resized) by the pipeline

  def __init__(self, root: os.PathLike | str, *, channels: int = 3):
    if channels not in (1, 3):
      raise ValueError(f'channels must be 1 or 3, got {channels}.')
    path = pathlib.Path(root).expanduser()
    _check_folder(path)
    self.root = str(path.resolve())
    self.channels = channels
    top_images, folders, others = _scan_top(self.root)
    folders.sort()
    per_class = [_list_images(os.path.join(self.root, f)) for f in folders]
    with_images = [f for f, files in zip(folders, per_class) if files]
    if top_images and with_images:
      raise ImageFolderError(
          f'{self.root} mixes {len(top_images)} image file(s) at the top level (e.g. '
          f'{_examples(top_images)}) with {len(with_images)} class sub-folder(s) holding '
          f'images (e.g. {_examples(with_images)}). Use one layout: move the top-level images '
          'into a class sub-folder (labelled), or move them into a folder of their own '
          '(unlabelled).')
    if top_images:  # flat: sub-folders without images (e.g. notes/) are ignored
      self.class_names, self._class_dirs = None, ('',)
      files, labels = sorted(top_images), np.full(len(top_images), -1, np.int32)
    elif with_images:
      empty = [f for f, files in zip(folders, per_class) if not files]
      if empty:
        logging.warning('%s: %d class folder(s) without image files (kept as classes so the '
                        'class indices stay the same): %s', self.root, len(empty),
                        _examples(empty, 10))
      self.class_names, self._class_dirs = tuple(folders), tuple(folders)
      files = [name for names in per_class for name in names]
      labels = np.repeat(np.arange(len(folders), dtype=np.int32),
                         [len(names) for names in per_class])
    else:
      raise ImageFolderError(_no_images_message(self.root, others))
    self.has_labels = self.class_names is not None
    self.num_classes = len(self.class_names) if self.has_labels else None
    # Paths relative to their class folder, as one buffer + offsets: pickles to the grain
    # workers as three arrays instead of a list of a million str objects.
    encoded = [os.fsencode(name) for name in files]
    lengths = np.fromiter((len(b) for b in encoded), np.int64, len(encoded))
    self._names = np.frombuffer(b''.join(encoded), np.uint8)
    offset_dtype = np.uint32 if self._names.size < 2**32 else np.int64
    self._offsets = np.zeros(len(encoded) + 1, offset_dtype)
    self._offsets[1:] = np.cumsum(lengths)
    self._labels = labels
    self._labels.flags.writeable = False

  def __len__(self) -> int:
    return self._labels.shape[0]

  def _index(self, index: int) -> int:
    index = int(index)
    n = len(self)
    if not -n <= index < n:
      raise IndexError(f'index {index} out of range for a source of {n} records.')
    return index % n

  def path(self, index: int) -> str:
    """The path of record `index`'s file."""
    i = self._index(index)
    name = os.fsdecode(self._names[self._offsets[i]:self._offsets[i + 1]].tobytes())
    class_dir = self._class_dirs[self._labels[i]] if self.has_labels else ''
    return os.path.join(self.root, class_dir, name)

  def describe(self, index: int) -> str:
    """A human name of record `index` for warnings: its file path."""
    return self.path(index)

  @property
  def labels(self) -> np.ndarray:
    """int32 [N] labels of the records (read-only), -1 when unlabelled."""
    return self._labels

  def __getitem__(self, index: int) -> dict:
    i = self._index(index)
    path = self.path(i)
    try:
      with open(path, 'rb') as f:
        data = f.read()
    except OSError as e:
      raise ImageReadError(e.errno, f'cannot read image file: {e.strerror or e}', path) from e
    return {'image': data, 'label': np.int32(self._labels[i])}

  def __repr__(self) -> str:
    kind = f'{self.num_classes} classes' if self.has_labels else 'unlabelled'
    return f'FolderSource({self.root!r}, n={len(self)}, {kind})'


def resolved_folder(path: os.PathLike | str, split: str | None) -> pathlib.Path:
  """The folder that serves `split` of the folder dataset at `path` (resolved, absolute).

  ``<path>/<split>`` if that is a folder; for 'test' a missing ``test/`` falls back to
  ``val/`` then ``validation/`` (and 'val' and 'validation' to each other); otherwise `path`
  itself, so a folder without split sub-folders serves every split (the same images for
  training and evaluation). Callers compare the results to tell whether two splits are the
  same images.

  Raises `ImageFolderError` when `path` has no ``<split>`` folder but all its sub-folders are
  split names (train, val, test, ...): reading `path` itself would take those for classes.
  """
  root = pathlib.Path(path).expanduser()
  if split:
    for name in (split, *_SPLIT_FALLBACKS.get(split, ())):
      if (root / name).is_dir():
        return (root / name).resolve()
  if root.is_dir():
    _, folders, _ = _scan_top(str(root))
    if folders and all(f.lower() in _SPLIT_NAMES for f in folders):
      raise ImageFolderError(
          f'{root} has no {split!r} sub-folder but has split folders '
          f'({", ".join(sorted(folders))}); set the split to one of them (e.g. '
          f'--config.data.train_split={sorted(folders)[0]}), or point at a folder of images.')
  return root.resolve()


def folder_source(path: os.PathLike | str, split: str | None, *,
                  channels: int = 3) -> FolderSource:
  """`FolderSource` of the folder `resolved_folder(path, split)`: ``<path>/<split>`` if that
  folder exists (test/ falling back to val/), else `path` itself."""
  return FolderSource(resolved_folder(path, split), channels=channels)


def folder_classes(path: os.PathLike | str, split: str | None = 'train'
                   ) -> tuple[str, ...] | None:
  """The class names `folder_source(path, split)` would have, or None for a flat folder.

  Reads only the top level of the folder (no file listing), so it is cheap for ImageNet.
  Raises like `FolderSource` for a missing path, a file or a folder with nothing in it.
  """
  root = resolved_folder(path, split)
  _check_folder(root)
  images, folders, others = _scan_top(str(root))
  if images:
    return None
  if folders:
    return tuple(sorted(folders))
  raise ImageFolderError(_no_images_message(str(root), others))
