"""Tests of image-folder sources (ssl_jax.data.folder), the 'folder:' registry names and the
encoded / unlabelled TFDS sources. Every test says which bug it catches."""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import random

import numpy as np
from PIL import Image
import pytest

from ssl_jax.data import folder, sources

_PIL_FORMATS = {'.jpg': 'JPEG', '.jpeg': 'JPEG', '.png': 'PNG', '.bmp': 'BMP', '.gif': 'GIF',
                '.webp': 'WEBP', '.tif': 'TIFF', '.tiff': 'TIFF'}


def write_image(path: pathlib.Path, size=(7, 5), seed: int = 0) -> bytes:
  """A small real image in the format its extension names; returns the file's bytes."""
  path.parent.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format=_PIL_FORMATS[path.suffix.lower()])
  path.write_bytes(buf.getvalue())
  return buf.getvalue()


def make_labelled(root: pathlib.Path, layout: dict[str, list[str]]) -> dict[str, bytes]:
  """root/<class>/<file> for each class; files written in a shuffled order."""
  items = [(c, f) for c, files in layout.items() for f in files]
  random.Random(0).shuffle(items)  # listing must not depend on creation order
  written = {}
  for i, (c, f) in enumerate(items):
    written[f'{c}/{f}'] = write_image(root / c / f, seed=i)
  for c in layout:
    (root / c).mkdir(parents=True, exist_ok=True)
  return written


# ------------------------------------------------------------------------------------------
# Layouts.
# ------------------------------------------------------------------------------------------


def test_labelled_layout_labels_from_sorted_class_folders(tmp_path):
  # Catches: class index not the sorted position (e.g. scandir order), records not sorted,
  # a file credited to the wrong class, nested files dropped, bytes not the file's content.
  written = make_labelled(tmp_path, {
      'dog': ['b.jpg', 'a.jpg', 'c.png'],
      'cat': ['z.png', 'y.jpg'],
      'ant': ['only.png', 'sub/deeper.jpg'],
  })
  src = folder.FolderSource(tmp_path)
  assert src.class_names == ('ant', 'cat', 'dog') and src.num_classes == 3
  assert src.has_labels and src.encoded and src.image_shape is None and src.channels == 3
  assert len(src) == 7
  rel = [os.path.relpath(src.path(i), tmp_path) for i in range(len(src))]
  assert rel == ['ant/only.png', 'ant/sub/deeper.jpg', 'cat/y.jpg', 'cat/z.png', 'dog/a.jpg',
                 'dog/b.jpg', 'dog/c.png']
  for i, r in enumerate(rel):
    record = src[i]
    assert set(record) == {'image', 'label'}
    assert isinstance(record['image'], bytes) and record['image'] == written[r]
    assert record['label'].dtype == np.int32
    assert record['label'] == src.class_names.index(r.split('/')[0])
  np.testing.assert_array_equal(src.labels, [0, 0, 1, 1, 2, 2, 2])
  # Same folder listed again (another host, a restart): the same index -> the same file.
  again = folder.FolderSource(str(tmp_path) + os.sep)
  assert [again.path(i) for i in range(len(again))] == [src.path(i) for i in range(len(src))]


def test_flat_layout_is_unlabelled(tmp_path):
  # Catches: flat images given a class / label, a folder without images taken as a class
  # (and the flat images then reported as a mixed layout), non-image files listed.
  for name in ('b.png', 'a.jpg', 'c.jpeg'):
    write_image(tmp_path / name)
  (tmp_path / 'notes').mkdir()
  (tmp_path / 'notes' / 'readme.txt').write_text('not an image')
  (tmp_path / 'labels.csv').write_text('a,1')
  src = folder.FolderSource(tmp_path)
  assert not src.has_labels and src.num_classes is None and src.class_names is None
  assert [pathlib.Path(src.path(i)).name for i in range(len(src))] == ['a.jpg', 'b.png',
                                                                        'c.jpeg']
  assert all(src[i]['label'] == -1 and src[i]['label'].dtype == np.int32 for i in range(3))
  assert src.encoded and src.image_shape is None


def test_extensions_any_case_and_hidden_entries_ignored(tmp_path):
  # Catches: case-sensitive extension matching (ImageNet's .JPEG), a missing extension,
  # hidden files (.DS_Store, macOS ._ files) or hidden folders (.cache/) listed as images.
  names = ['a.JPEG', 'b.Jpg', 'c.png', 'd.BMP', 'e.gif', 'f.webp', 'g.TIF', 'h.tiff', 'i.jpeg']
  for name in names:
    write_image(tmp_path / 'cls' / name)
  write_image(tmp_path / 'cls' / '._a.JPEG')  # macOS resource fork next to a.JPEG
  write_image(tmp_path / 'cls' / '.hidden.png')
  write_image(tmp_path / 'cls' / '.thumbs' / 'x.png')
  write_image(tmp_path / '.cache' / 'y.png')  # a hidden top-level folder is not a class
  (tmp_path / 'cls' / 'notes.txt').write_text('x')
  (tmp_path / 'cls' / 'jpg').write_text('no extension')
  (tmp_path / '.DS_Store').write_bytes(b'\0')
  src = folder.FolderSource(tmp_path)
  assert src.class_names == ('cls',)
  assert sorted(pathlib.Path(src.path(i)).name for i in range(len(src))) == sorted(names)
  assert set(folder.IMAGE_EXTENSIONS) == {'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp',
                                          '.tif', '.tiff'}


def test_empty_class_folder_keeps_class_indices(tmp_path):
  # Catches: an empty class folder dropped, which would shift the indices of the classes
  # after it relative to a split where it has images.
  make_labelled(tmp_path, {'a': ['1.png'], 'b': [], 'c': ['2.png']})
  (tmp_path / 'b' / 'readme.txt').write_text('no images here')
  src = folder.FolderSource(tmp_path)
  assert src.class_names == ('a', 'b', 'c') and src.num_classes == 3
  assert len(src) == 2 and [int(src[i]['label']) for i in range(2)] == [0, 2]


def test_folder_source_split_rule(tmp_path):
  # Catches: the split sub-folder not used; a missing split silently reading the dataset
  # root (which would make 'train' and 'val' classes); the test -> val fallback missing.
  make_labelled(tmp_path / 'split' / 'train', {'a': ['1.png', '2.png'], 'b': ['3.png']})
  make_labelled(tmp_path / 'split' / 'val', {'a': ['4.png'], 'b': ['5.png']})
  root = tmp_path / 'split'
  train = folder.folder_source(root, 'train')
  assert train.root == str((root / 'train').resolve()) and len(train) == 3
  assert train.class_names == ('a', 'b')
  val = folder.folder_source(root, 'val')
  assert len(val) == 2 and val.class_names == train.class_names
  # No test/: the labelled val/ serves evaluation.
  assert folder.resolved_folder(root, 'test') == (root / 'val').resolve()
  assert folder.resolved_folder(root, 'validation') == (root / 'val').resolve()
  assert folder.resolved_folder(root, 'train') != folder.resolved_folder(root, 'test')
  with pytest.raises(folder.ImageFolderError,
                     match=r"no 'training' sub-folder but has split folders \(train, val\)"):
    folder.folder_source(root, 'training')
  # A folder without split sub-folders serves every split, labelled or flat.
  make_labelled(tmp_path / 'classes', {'train_like': ['1.png'], 'other': ['2.png']})
  for split in ('train', 'test', None):
    assert folder.resolved_folder(tmp_path / 'classes', split) == (tmp_path / 'classes')
  assert folder.folder_source(tmp_path / 'classes', 'test').class_names == ('other',
                                                                            'train_like')
  write_image(tmp_path / 'flat' / 'x.png')
  assert folder.resolved_folder(tmp_path / 'flat', 'train') == folder.resolved_folder(
      tmp_path / 'flat', 'test')


# ------------------------------------------------------------------------------------------
# Errors.
# ------------------------------------------------------------------------------------------

_LAYOUT_HINT = r'root/<class>/<image>.*root/<image>'


def test_error_nonexistent_path(tmp_path):
  # Catches: a missing folder reported late (at the first read) or without the path.
  missing = tmp_path / 'nope'
  with pytest.raises(FileNotFoundError, match=_LAYOUT_HINT) as info:
    folder.FolderSource(missing)
  assert str(missing) in str(info.value) and 'does not exist' in str(info.value)


def test_error_file_instead_of_folder(tmp_path):
  # Catches: a file (e.g. an archive) accepted or failing with a bare scandir error.
  path = tmp_path / 'images.tar'
  path.write_bytes(b'x')
  with pytest.raises(NotADirectoryError, match=r'is a file, not a folder.*extract') as info:
    folder.FolderSource(path)
  assert str(path) in str(info.value)


def test_error_empty_folder(tmp_path):
  # Catches: an empty folder giving a source of 0 records (fails much later, obscurely).
  with pytest.raises(folder.ImageFolderError, match=_LAYOUT_HINT) as info:
    folder.FolderSource(tmp_path)
  msg = str(info.value)
  assert f'No image files in {tmp_path}' in msg
  assert all(ext in msg for ext in folder.IMAGE_EXTENSIONS)


def test_error_only_non_image_files(tmp_path):
  # Catches: unrecognised files silently ignored with no hint (e.g. images saved as .jfif
  # or .npy), and empty class folders alone passing as a dataset.
  (tmp_path / 'a.jfif').write_bytes(b'x')
  (tmp_path / 'b.npy').write_bytes(b'x')
  (tmp_path / 'cls').mkdir()
  (tmp_path / 'cls' / 'c.txt').write_text('x')
  with pytest.raises(folder.ImageFolderError,
                     match=r'Recognised extensions.*Found 2 other file\(s\), e.g. a.jfif, '
                     r'b.npy'):
    folder.FolderSource(tmp_path)


def test_error_mixed_layout(tmp_path):
  # Catches: top-level images silently dropped (or labelled) next to class folders.
  write_image(tmp_path / 'stray.jpg')
  make_labelled(tmp_path, {'a': ['1.png'], 'b': ['2.png']})
  with pytest.raises(folder.ImageFolderError,
                     match=r'mixes 1 image file\(s\) at the top level \(e.g. stray.jpg\) with 2 '
                     r'class sub-folder\(s\).*move the top-level images'):
    folder.FolderSource(tmp_path)


# ------------------------------------------------------------------------------------------
# Records, pickling, describe.
# ------------------------------------------------------------------------------------------


def test_pickle_round_trip_is_small(tmp_path):
  # Catches: per-file Python objects (a list of absolute-path str) shipped to every grain
  # worker: 10k files must pickle to well under 2 MB (about 20 bytes a name here), and the
  # unpickled source must read the same files.
  classes = [f'n{c:04d}' for c in range(10)]
  for c in classes:
    (tmp_path / c).mkdir()
    for i in range(1000):
      (tmp_path / c / f'{c}_{i}.JPEG').touch()
  write_image(tmp_path / classes[3] / 'real.png', seed=3)
  src = folder.FolderSource(tmp_path)
  assert len(src) == 10001
  data = pickle.dumps(src)
  assert len(data) < 2 * 2**20
  assert len(data) / len(src) < 30  # the names alone are ~15 bytes; full paths would be ~70
  copy = pickle.loads(data)
  assert len(copy) == len(src) and copy.class_names == src.class_names
  for i in (0, 1234, 3000, len(src) - 1):
    assert copy.path(i) == src.path(i)
    assert copy[i]['image'] == src[i]['image'] and copy[i]['label'] == src[i]['label']
  i = next(i for i in range(len(src)) if src.path(i).endswith('real.png'))
  assert Image.open(io.BytesIO(copy[i]['image'])).size == (7, 5)


def test_describe_index_and_unreadable_file(tmp_path):
  # Catches: describe not naming the file; negative / out-of-range indices misread; a file
  # deleted after listing raising an error without its path (or a non-OSError the pipeline
  # would not skip).
  make_labelled(tmp_path, {'a': ['1.png', '2.png']})
  src = folder.FolderSource(tmp_path)
  assert src.describe(1) == str((tmp_path / 'a' / '2.png').resolve())
  assert src.describe(-1) == src.describe(1)
  assert src[-2]['image'] == src[0]['image']
  with pytest.raises(IndexError):
    src[2]
  (tmp_path / 'a' / '2.png').unlink()
  with pytest.raises(folder.ImageReadError) as info:
    src[1]
  assert isinstance(info.value, OSError)
  assert info.value.filename == src.describe(1) and src.describe(1) in str(info.value)


# ------------------------------------------------------------------------------------------
# Registry.
# ------------------------------------------------------------------------------------------


def test_registry_folder_names(tmp_path):
  # Catches: 'folder:' names not routed, the split rule not applied through the registry, a
  # relative path not taken under data_dir, source_info/class_names missing folder names.
  make_labelled(tmp_path / 'ds' / 'train', {'a': ['1.png'], 'b': ['2.png', '3.png']})
  make_labelled(tmp_path / 'ds' / 'val', {'a': ['4.png'], 'b': ['5.png']})
  src = sources.get_source(f'folder:{tmp_path / "ds"}', 'train')
  assert isinstance(src, folder.FolderSource) and len(src) == 3
  assert len(sources.get_source('folder:ds', 'test', data_dir=tmp_path)) == 2
  assert sources.source_info(f'folder:{tmp_path / "ds"}') == ((None, None, 3), 2)
  assert sources.class_names('folder:ds', tmp_path) == ('a', 'b')
  write_image(tmp_path / 'flat' / 'x.png')
  assert sources.source_info(f'folder:{tmp_path / "flat"}') == ((None, None, 3), None)
  assert sources.class_names(f'folder:{tmp_path / "flat"}') is None
  assert sources.class_names(f'folder:{tmp_path / "missing"}') is None  # legends: indices
  with pytest.raises(FileNotFoundError):
    sources.get_source(f'folder:{tmp_path / "missing"}', 'train')


def test_is_known_name_and_unknown_name_message():
  # Catches: config validation rejecting valid 'folder:'/'tfds:' names or accepting empty
  # ones; an error message that does not show the three accepted forms.
  for name in ('fashion_mnist', 'tfds:cifar10', 'tfds:imagenet2012/subset', 'folder:/data/x',
               'folder:relative'):
    assert sources.is_known_name(name), name
  for name in ('mnistt', '', 'tfds:', 'folder:', 'folder', 'Folder:/x'):
    assert not sources.is_known_name(name), name
  with pytest.raises(ValueError) as info:
    sources.get_source('mnistt', 'train')
  msg = str(info.value)
  assert "Unknown data source 'mnistt'" in msg
  assert 'fashion_mnist' in msg and "'tfds:<" in msg and "'folder:<path>'" in msg
  with pytest.raises(ValueError, match='folder:<path>'):
    sources.source_info('folder:')


def test_array_sources_have_the_new_attributes():
  # Catches: the existing in-memory sources lacking the protocol attributes the pipeline now
  # reads (encoded, channels, has_labels, num_classes, class_names, describe).
  src = sources.ArraySource(np.zeros((3, 4, 5), np.uint8), [0, 1, 2])
  assert not src.encoded and src.channels == 1 and src.image_shape == (4, 5, 1)
  assert src.has_labels and src.num_classes is None and src.class_names is None
  assert src.describe(2) == 'ArraySource[2]'
  unlabelled = sources.ArraySource(np.zeros((2, 4, 4, 3), np.uint8), [-1, -1])
  assert not unlabelled.has_labels and unlabelled.channels == 3
  named = sources.ArraySource(np.zeros((2, 4, 4, 3), np.uint8), [0, 1],
                              class_names=('x', 'y'), name='toy/train')
  assert named.num_classes == 2 and named.describe(1) == 'toy/train[1]'
  fmnist_dir = pathlib.Path('/usr/share/datasets/fashion-mnist')
  if (fmnist_dir / 't10k-images-idx3-ubyte.gz').is_file():
    test = sources.fashion_mnist('test')
    assert test.num_classes == 10 and test.class_names == sources.FASHION_MNIST_CLASSES
    assert test.has_labels and not test.encoded and test.channels == 1
    assert test.describe(7) == 'fashion_mnist/test[7]'


# ------------------------------------------------------------------------------------------
# TFDS.
# ------------------------------------------------------------------------------------------
# What tfds 4.9.10's mock_data does (tensorflow_datasets/testing/mocking.py): its random
# generator fills every None dimension with a random size in [5, 50) drawn per example, so
# imagenet2012's (None, None, 3) images have VARIABLE sizes. Without decoders it hands over
# decoded arrays; with any decoder (SkipDecoding) it switches to EncodedRandomFakeGenerator,
# which runs features.encode_example: the image is then real JPEG bytes (imagenet2012's
# encoding_format), exactly what a prepared dataset's SkipDecoding gives (bytes). So the mock
# exercises the source's real path; no PNG re-encoding is needed.


def _jpeg_size(data: bytes) -> tuple[int, int]:
  image = Image.open(io.BytesIO(data))
  assert image.format == 'JPEG'
  return image.size


def test_tfds_variable_size_dataset_gives_encoded_bytes():
  # Catches: a variable-size dataset opened with decoding (records of varying-shape arrays
  # the pipeline cannot use), bytes not passed through, has_labels/num_classes wrong,
  # get_batch silently stacking encoded images.
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=12):
    src = sources.get_source('tfds:imagenet2012', 'train')
    assert isinstance(src, sources.TfdsSource) and len(src) == 12
    assert src.encoded and src.image_shape is None and src.channels == 3
    assert src.has_labels and src.num_classes == 1000 and len(src.class_names) == 1000
    sizes = set()
    for i in range(len(src)):
      record = src[i]
      assert set(record) == {'image', 'label'}
      assert isinstance(record['image'], bytes)
      sizes.add(_jpeg_size(record['image']))
      assert record['label'].dtype == np.int32 and 0 <= record['label'] < 1000
    assert len(sizes) > 3  # TFDS mock data of variable size
    assert src.describe(1234) == 'imagenet2012/train[1234]'
    with pytest.raises(TypeError, match='encoded images of varying size'):
      src.get_batch([0, 1])
    copy = pickle.loads(pickle.dumps(src))  # handed to grain workers
    assert copy.encoded and copy[3]['image'] == src[3]['image']
  assert sources.source_info('tfds:imagenet2012') == ((None, None, 3), 1000)


def test_tfds_withheld_labels_and_the_mock_hook():
  # Catches: the decoders not passed to as_data_source (checked by the hook), and a split
  # whose labels are all -1 (imagenet2012 'test') reported as labelled. Uses mock_data's
  # as_data_source_fn hook to serve hand-made JPEGs of chosen sizes with label -1.
  import tensorflow_datasets as tfds
  sizes = [(17, 9), (40, 23), (8, 31)]
  seen_decoders = []

  def as_data_source(self, split, decoders=None, **kwargs):
    del self, split, kwargs
    seen_decoders.append(decoders)
    records = []
    for i, (w, h) in enumerate(sizes):
      buf = io.BytesIO()
      Image.new('RGB', (w, h), (i, 2 * i, 3 * i)).save(buf, format='JPEG')
      records.append({'image': buf.getvalue(), 'label': np.int64(-1),
                      'file_name': f'{i}.JPEG'})
    return records

  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    src = sources.get_source('tfds:imagenet2012', 'test')
  assert isinstance(seen_decoders[0]['image'], tfds.decode.SkipDecoding)
  assert src.encoded and not src.has_labels and src.num_classes == 1000
  assert [_jpeg_size(src[i]['image']) for i in range(3)] == sizes
  assert all(src[i]['label'] == -1 for i in range(3))


def test_tfds_unlabelled_split():
  # Catches: stl10's 'unlabelled' split (fixed size, labels -1 in the real data; random in
  # the mock) reported as labelled, alone or within a split expression.
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=4):
    unlabelled = sources.get_source('tfds:stl10', 'unlabelled')
    assert not unlabelled.has_labels and unlabelled.num_classes == 10
    assert not unlabelled.encoded and unlabelled.image_shape == (96, 96, 3)
    assert unlabelled[0]['image'].shape == (96, 96, 3)
    assert not sources.get_source('tfds:stl10', 'train[:50%]+unlabelled').has_labels
    assert sources.get_source('tfds:stl10', 'train').has_labels


def test_tfds_fixed_size_dataset_still_decoded():
  # Catches: fixed-size datasets switched to encoded bytes (breaks the array path and
  # get_batch), or the new attributes missing on them.
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=5):
    src = sources.get_source('tfds:cifar10', 'train')
    assert not src.encoded and src.image_shape == (32, 32, 3) and src.channels == 3
    # (The mock has no label.txt metadata: the names are '0'..'9'.)
    assert src.has_labels and src.num_classes == 10 and len(src.class_names) == 10
    record = src[2]
    assert isinstance(record['image'], np.ndarray) and record['image'].dtype == np.uint8
    assert record['image'].shape == (32, 32, 3)
    assert src.get_batch([0, 2])['image'].shape == (2, 32, 32, 3)
    assert src.describe(2) == 'cifar10/train[2]'
