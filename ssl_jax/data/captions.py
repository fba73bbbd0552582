"""Image-caption sources for image-text contrastive learning (CLIP, SigLIP, LiT).

A caption source follows the image source protocol (`ssl_jax.data.sources`) and adds the
tokenized captions of each image:

* ``source[i] -> {'image', 'label', 'texts': int32 [K, context_length]}``: the K captions of
  image i, tokenized (`ssl_jax.data.text`: EOT-terminated, zero-padded). K is fixed per
  source (``captions_per_image``) so batches stack: an image with fewer captions repeats
  them cyclically (2 captions, K=5: c0 c1 c0 c1 c0), one with more keeps its first K. The
  model samples one of the K per example and step, so a repeated caption is just drawn more
  often.
* ``get_batch(indices)`` (fixed-size images only) adds ``'texts': int32 [n, K, L]``.
* ``source.captions(i) -> list[str]``: image i's raw captions, all of them (not cycled or cut
  to K), for training a SentencePiece model and for retrieval evaluation.
* ``source.text_spec``: the `TextSpec` (tokenizer spec, context length, K) the texts were
  made with; ``source.tokenizer`` the tokenizer itself.

Sources:

* `fashion_mnist_captions`: a built-in demo on Fashion-MNIST whose captions are generated
  from each class's names and descriptions. The 'train' split and the held-out 'test' split
  use disjoint phrasing templates and adjectives, so test retrieval is on captions never seen
  in training. `FASHION_MNIST_ZERO_SHOT_TEMPLATES` are held-out prompts for zero-shot
  classification with `zero_shot_class_names`.
* `pairs_source`: a JSONL or CSV file of (image file, caption) pairs.
* `tfds_captions_source`: TFDS 'coco_captions' (the Karpathy splits of COCO 2014).

`sources.get_source` serves them as 'fashion_mnist_captions', 'pairs:<file>' and
'tfds:coco_captions', with the text settings in its ``text`` argument (`text_spec`).
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from ssl_jax import config_lib
from ssl_jax.data import folder
from ssl_jax.data import sources
from ssl_jax.data import text as text_lib

__all__ = [
    'CAPTION_TFDS_DATASETS', 'FASHION_MNIST_ZERO_SHOT_NAMES',
    'FASHION_MNIST_ZERO_SHOT_TEMPLATES', 'FashionMnistCaptions', 'GENERIC_ZERO_SHOT_TEMPLATES',
    'PairsFileError', 'PairsSource', 'TextSpec', 'TfdsCaptionSource', 'demo_caption_table',
    'fashion_mnist_captions', 'pairs_path', 'pairs_source', 'read_pairs', 'text_spec',
    'tfds_captions_source', 'zero_shot_class_names',
]


# --------------------------------------------------------------------------------------------
# Text settings.
# --------------------------------------------------------------------------------------------


class TextSpec(NamedTuple):
  """How a caption source tokenizes: the defaults are what a source asked for without text
  settings uses (byte tokens fit the demo captions, <= 31 bytes, in 32; COCO has 5 captions
  per image)."""
  tokenizer: str = 'bytes'
  context_length: int = 32
  captions_per_image: int = 5


def text_spec(text: Any = None) -> TextSpec:
  """A `TextSpec` from None (the defaults), a TextSpec, a mapping or a ConfigDict with any
  of the fields tokenizer, context_length, captions_per_image (other fields are ignored:
  the same config block may hold the text model's settings)."""
  if text is None:
    return TextSpec()
  if isinstance(text, TextSpec):
    spec = text
  else:
    values = {}
    for field in TextSpec._fields:
      if isinstance(text, Mapping) or hasattr(text, 'get'):
        value = text.get(field, None)
      else:
        value = getattr(text, field, None)
      if value is not None:
        values[field] = value
    spec = TextSpec(**values)
  if not isinstance(spec.tokenizer, str):
    raise ValueError(f"text.tokenizer must be a string ('bytes' or "
                     f"'sentencepiece:<path.model>'), got {spec.tokenizer!r}.")
  for field, minimum in (('context_length', 2), ('captions_per_image', 1)):
    value = getattr(spec, field)
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
      raise ValueError(f'text.{field} must be an integer >= {minimum}, got {value!r} '
                       f'(--config.text.{field}).')
  return spec._replace(context_length=int(spec.context_length),
                       captions_per_image=int(spec.captions_per_image))


def _cycle(captions: Sequence[str], k: int, what: str) -> list[str]:
  """Exactly k captions: the first k, repeated cyclically when there are fewer."""
  if not captions:
    raise ValueError(f'{what} has no captions; every image needs at least one.')
  return [captions[j % len(captions)] for j in range(k)]


class _CaptionSource:
  """Shared by the caption sources: the tokenizer, the text settings, the texts of a record."""

  def _init_text(self, tokenizer: Any, text: Any) -> None:
    spec = text_spec(text)
    if tokenizer is None:
      tokenizer = text_lib.get_tokenizer(spec.tokenizer)
    elif isinstance(tokenizer, str):
      spec = spec._replace(tokenizer=tokenizer)
      tokenizer = text_lib.get_tokenizer(tokenizer)
    else:
      spec = spec._replace(tokenizer=getattr(tokenizer, 'spec', spec.tokenizer))
    self.tokenizer, self.text_spec = tokenizer, spec

  @property
  def captions_per_image(self) -> int:
    return self.text_spec.captions_per_image

  @property
  def context_length(self) -> int:
    return self.text_spec.context_length

  def _texts(self, caption_lists: Sequence[Sequence[str]], indices: Sequence[int]
             ) -> np.ndarray:
    """int32 [n, K, L]: each image's captions cycled to K and tokenized."""
    k = self.captions_per_image
    flat = [c for caps, i in zip(caption_lists, indices)
            for c in _cycle(caps, k, self.describe(i))]
    ids = self.tokenizer.encode(flat, self.context_length)
    return ids.reshape(len(caption_lists), k, self.context_length)


# --------------------------------------------------------------------------------------------
# The Fashion-MNIST demo.
# --------------------------------------------------------------------------------------------

# Per class (sources.FASHION_MNIST_CLASSES order): names and synonyms (shared by the
# splits: retrieval has to find the class), then the adjectives of the training captions and
# the held-out adjectives of the test captions (disjoint). Adjectives name things a 28x28
# grayscale image can show (shade, shape, pattern) or a plausible description of the item.
_NAMES = (
    ('t-shirt', 'tee', 'top', 'tee shirt'),
    ('trouser', 'trousers', 'pants', 'slacks'),
    ('pullover', 'sweater', 'jumper'),
    ('dress', 'frock', 'gown'),
    ('coat', 'jacket', 'overcoat'),
    ('sandal', 'sandals', 'flip-flop'),
    ('shirt', 'blouse', 'button-down'),
    ('sneaker', 'trainer', 'running shoe'),
    ('bag', 'handbag', 'purse', 'tote'),
    ('ankle boot', 'boot', 'bootie'),
)
_GENERIC_TRAIN_ADJECTIVES = ('dark', 'light', 'plain', 'black', 'white')
_GENERIC_TEST_ADJECTIVES = ('grey', 'pale', 'simple', 'muted')
_TRAIN_ADJECTIVES = (
    ('striped', 'printed', 'loose'),
    ('long', 'slim', 'wide'),
    ('knitted', 'warm', 'woolly'),
    ('long', 'summer', 'flowing'),
    ('warm', 'winter', 'long'),
    ('strappy', 'summer', 'flat'),
    ('collared', 'formal', 'buttoned'),
    ('sporty', 'low-top', 'canvas'),
    ('leather', 'small', 'large'),
    ('heeled', 'winter', 'leather'),
)
_TEST_ADJECTIVES = (
    ('graphic', 'baggy'),
    ('baggy', 'tailored'),
    ('cozy', 'chunky'),
    ('evening', 'short'),
    ('heavy', 'belted'),
    ('open', 'beach'),
    ('checked', 'office'),
    ('athletic', 'casual'),
    ('boxy', 'roomy'),
    ('chunky', 'suede'),
)
# Phrasings: {a} is the article of the word after it, {adj} an adjective, {name} a name.
_TRAIN_TEMPLATES = (
    '{a} {adj} {name}',
    '{adj} {name}',
    '{a} {name} that is {adj}',
    'photo of {a} {adj} {name}',
    '{name}, {adj}',
    'this {name} is {adj}',
)
_TEST_TEMPLATES = (  # held out: no fixed word of these is in a training template
    'my {adj} {name}',
    'one {adj} {name}',
    'image: {adj} {name}',
    'the {name} looks {adj}',
    'here, {a} {adj} {name}',
)
# Zero-shot names: the first name of each class.
FASHION_MNIST_ZERO_SHOT_NAMES = tuple(names[0] for names in _NAMES)
# Held-out prompts for zero-shot classification of the demo (in neither split's phrasings).
FASHION_MNIST_ZERO_SHOT_TEMPLATES = (
    'a picture of a {}.',
    'a {} on a plain background.',
    'a grayscale photo of a {}.',
    'a product shot of a {}.',
    'a catalog image of a {}.',
)
# A handful of CLIP's ImageNet prompt templates (Radford et al. 2021, the 80-prompt set).
GENERIC_ZERO_SHOT_TEMPLATES = (
    'a photo of a {}.',
    'a blurry photo of a {}.',
    'a photo of the large {}.',
    'a photo of the small {}.',
    'a good photo of a {}.',
    'a low resolution photo of a {}.',
    'a bad photo of a {}.',
    'a cropped photo of a {}.',
    'a close-up photo of a {}.',
    'a bright photo of a {}.',
    'a dark photo of a {}.',
    'a black and white photo of a {}.',
)


def _article(word: str) -> str:
  return 'an' if word[:1].lower() in 'aeiou' else 'a'


def _fill(template: str, adj: str, name: str) -> str:
  after = template.split('{a}', 1)[1].lstrip() if '{a}' in template else ''
  next_word = adj if after.startswith('{adj}') else name
  return template.format(a=_article(next_word), adj=adj, name=name)


def demo_caption_table(split: str) -> tuple[tuple[str, ...], ...]:
  """The demo's captions per class for `split` ('train', or any other split: the held-out
  phrasings), each class's in a fixed shuffled order (seeded by class), no duplicates."""
  held_out = split != 'train'
  templates = _TEST_TEMPLATES if held_out else _TRAIN_TEMPLATES
  generic = _GENERIC_TEST_ADJECTIVES if held_out else _GENERIC_TRAIN_ADJECTIVES
  specific = _TEST_ADJECTIVES if held_out else _TRAIN_ADJECTIVES
  table = []
  for c, names in enumerate(_NAMES):
    adjectives = dict.fromkeys(specific[c] + generic)  # ordered, deduplicated
    phrases = list(dict.fromkeys(_fill(t, adj, name) for t in templates for adj in adjectives
                                 for name in names))
    order = np.random.default_rng([c, int(held_out)]).permutation(len(phrases))
    table.append(tuple(phrases[j] for j in order))
  return tuple(table)


def _spread(indices: np.ndarray) -> np.ndarray:
  """A well-mixed uint64 hash of record indices (Knuth's multiplicative hash): neighbouring
  images of a class start at unrelated places in the class's caption list."""
  return (np.asarray(indices, np.uint64) * np.uint64(2654435761)) % np.uint64(2**32)


class FashionMnistCaptions(_CaptionSource):
  """Fashion-MNIST with generated captions (see `fashion_mnist_captions`)."""

  encoded = False
  has_labels = True
  class_names = sources.FASHION_MNIST_CLASSES
  num_classes = len(sources.FASHION_MNIST_CLASSES)
  zero_shot_names = FASHION_MNIST_ZERO_SHOT_NAMES
  zero_shot_templates = FASHION_MNIST_ZERO_SHOT_TEMPLATES  # held out from both splits

  def __init__(self, images: sources.ArraySource, split: str, tokenizer: Any = None,
               text: Any = None):
    self._init_text(tokenizer, text)
    self.images_source, self.split = images, split
    self.table = demo_caption_table(split)
    self._counts = np.array([len(p) for p in self.table], np.int64)
    # Every phrase tokenized once: a batch's texts are then one gather.
    self._ids = np.zeros((len(self.table), self._counts.max(), self.context_length), np.int32)
    for c, phrases in enumerate(self.table):
      self._ids[c, :len(phrases)] = self.tokenizer.encode(phrases, self.context_length)

  def __len__(self) -> int:
    return len(self.images_source)

  @property
  def labels(self) -> np.ndarray:
    return self.images_source.labels

  @property
  def image_shape(self):
    return self.images_source.image_shape

  @property
  def channels(self) -> int:
    return self.images_source.channels

  def describe(self, index: int) -> str:
    return self.images_source.describe(index)

  def _choice(self, indices: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[n, K] positions in each image's class list: K consecutive captions from a place
    set by the image's index (cyclic when a class has fewer than K)."""
    k = np.arange(self.captions_per_image, dtype=np.uint64)
    start = _spread(indices)[:, None]
    return ((start + k) % self._counts[labels][:, None].astype(np.uint64)).astype(np.int64)

  def _normalised(self, indices) -> np.ndarray:
    indices = np.asarray(indices, np.int64).reshape(-1)
    n = len(self)
    if indices.size and (indices.min() < -n or indices.max() >= n):
      raise IndexError(f'index out of range for a source of {n} records.')
    return indices % n

  def captions(self, index: int) -> list[str]:
    i = int(self._normalised([index])[0])
    label = int(self.labels[i])
    return [self.table[label][j] for j in self._choice(np.array([i]), np.array([label]))[0]]

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self.images_source[index]
    i = self._normalised([index])
    label = self.labels[i]
    return dict(record, texts=self._ids[label[:, None], self._choice(i, label)][0])

  def get_batch(self, indices) -> dict[str, np.ndarray]:
    """{'image': uint8 [n, 28, 28, 1], 'label': int32 [n], 'texts': int32 [n, K, L]}."""
    i = self._normalised(indices)
    batch = self.images_source.get_batch(i)
    label = batch['label']
    return dict(batch, texts=self._ids[label[:, None], self._choice(i, label)])

  def __repr__(self) -> str:
    return (f'FashionMnistCaptions(split={self.split!r}, n={len(self)}, '
            f'text={tuple(self.text_spec)})')


def fashion_mnist_captions(split: str, tokenizer: Any = None, context_length: int | None = None,
                           captions_per_image: int | None = None,
                           data_dir: os.PathLike | str | None = None, download: bool = False,
                           *, text: Any = None) -> FashionMnistCaptions:
  """Fashion-MNIST images with generated captions: a demo that needs no caption data.

  Each class has a few names (`FASHION_MNIST_ZERO_SHOT_NAMES` first) and adjectives; a
  caption is a phrasing template filled with an adjective and a name ('a striped tee',
  'this coat is warm'). The 'train' split uses one set of templates and adjectives, 'test'
  held-out ones (no test caption is a training caption). Image i's K captions are K
  consecutive entries, from a place set by i, of its class's (shuffled) caption list: they
  depend only on the split, the class and i. Every caption is at most 31 bytes, so the
  byte tokenizer's default context of 32 never truncates.

  `tokenizer`: a tokenizer object or spec string (default: `text`'s, else 'bytes');
  `context_length` / `captions_per_image` override `text`'s (a `text_spec` input).
  """
  spec = text_spec(text)
  if context_length is not None:
    spec = spec._replace(context_length=context_length)
  if captions_per_image is not None:
    spec = spec._replace(captions_per_image=captions_per_image)
  images = sources.fashion_mnist(split, data_dir=data_dir, download=download)
  return FashionMnistCaptions(images, split, tokenizer, text_spec(spec))


def zero_shot_class_names(source: Any) -> tuple[str, ...]:
  """The class names that zero-shot prompts fill in: the source's ``zero_shot_names`` (the
  demo: 't-shirt', ..., 'ankle boot'), else its class names with '_' read as a space."""
  names = getattr(source, 'zero_shot_names', None)
  if names is not None:
    return tuple(names)
  names = getattr(source, 'class_names', None)
  if names is None:
    raise ValueError(f'{source!r} has no class names, so zero-shot classification has no '
                     'prompts; evaluate it by retrieval, or use a labelled source.')
  return tuple(str(n).replace('_', ' ') for n in names)


# --------------------------------------------------------------------------------------------
# Pairs files.
# --------------------------------------------------------------------------------------------

PAIRS_SUFFIXES = ('.jsonl', '.csv')
_MAX_LISTED = 5
_PAIRS_FORMAT = (
    'a JSONL file (one object a line: {"image": "<path relative to the file>", "caption": '
    '"..."} or "captions": ["...", ...], optional "label": <int>) or a CSV file with the '
    'header image,caption[,label] (one caption a row; rows of the same image are merged)')


class PairsFileError(config_lib.DataError):
  """A pairs file that cannot serve as a caption source; the message says what to fix."""


def _listed(problems: Sequence[str]) -> str:
  shown = '\n'.join(f'  {p}' for p in problems[:_MAX_LISTED])
  more = len(problems) - _MAX_LISTED
  return shown + (f'\n  ... and {more} more' if more > 0 else '')


def pairs_path(path: os.PathLike | str, split: str) -> pathlib.Path:
  """The pairs file of `split`: `path` itself for 'train'; else the sibling
  ``<stem>_<split><suffix>`` (a stem ending in '_train' has it replaced: pairs_train.csv ->
  pairs_test.csv), with 'test' falling back to '_val' then '_validation' like folders do."""
  path = pathlib.Path(path).expanduser()
  if split == 'train':
    return path
  stem = path.stem[:-len('_train')] if path.stem.endswith('_train') else path.stem
  tried = []
  for name in (split, *folder._SPLIT_FALLBACKS.get(split, ())):  # pylint: disable=protected-access
    candidate = path.with_name(f'{stem}_{name}{path.suffix}')
    if candidate.is_file():
      return candidate
    tried.append(candidate)
  raise FileNotFoundError(
      f'No pairs file for split {split!r} of {path}: looked for '
      f'{", ".join(str(t) for t in tried)}. Write the {split} pairs there, or choose a split '
      f'that exists (--config.data.eval_split / train_split; the file itself is "train").')


def _parse_label(value: Any, where: str, problems: list[str]) -> int:
  if value is None or (isinstance(value, str) and not value.strip()):
    return -1
  try:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
      raise ValueError
    return int(value)
  except (TypeError, ValueError):
    problems.append(f'{where}: label {value!r} is not an integer class index')
    return -1


def read_pairs(path: os.PathLike | str) -> tuple[list[str], list[tuple[str, ...]], np.ndarray]:
  """(image paths as written, captions per image, int32 labels) of a pairs file.

  Rows naming the same image are merged, in file order (the image's place is its first
  row). Raises `PairsFileError` listing the first few bad rows.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'Pairs file {path} does not exist. Pass {_PAIRS_FORMAT}.')
  suffix = path.suffix.lower()
  if suffix not in PAIRS_SUFFIXES:
    raise PairsFileError(f'{path}: unknown pairs file type {suffix!r}; use {_PAIRS_FORMAT}.')
  rows = []  # (where, image, [captions], label value)
  problems: list[str] = []
  with open(path, newline='', encoding='utf-8') as f:
    if suffix == '.csv':
      reader = csv.DictReader(f)
      header = [h.strip() for h in (reader.fieldnames or [])]
      missing = [c for c in ('image', 'caption') if c not in header]
      if missing:
        raise PairsFileError(
            f'{path}: the CSV header {header} lacks the column(s) {missing}; the first line '
            'must be image,caption[,label].')
      reader.fieldnames = header
      for n, row in enumerate(reader, start=2):
        rows.append((f'line {n}', row.get('image'), [row.get('caption')], row.get('label')))
    else:
      for n, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          problems.append(f'line {n}: not JSON ({e.msg})')
          continue
        if not isinstance(obj, dict):
          problems.append(f'line {n}: not a JSON object')
          continue
        caps = obj.get('captions', [] if 'caption' in obj else None)
        if 'caption' in obj:
          caps = [obj['caption'], *(caps if isinstance(caps, list) else [caps])]
        if not isinstance(caps, list):
          problems.append(f'line {n}: needs "caption": "..." or "captions": [...]')
          continue
        rows.append((f'line {n}', obj.get('image'), caps, obj.get('label')))
  images: dict[str, int] = {}
  captions: list[list[str]] = []
  labels: list[int] = []
  for where, image, caps, label in rows:
    if not isinstance(image, str) or not image.strip():
      problems.append(f'{where}: no "image" path')
      continue
    bad = [c for c in caps if not isinstance(c, str) or not c.strip()]
    if bad:
      problems.append(f'{where}: empty or non-string caption {bad[0]!r}')
      continue
    label = _parse_label(label, where, problems)
    if image not in images:
      images[image] = len(captions)
      captions.append([])
      labels.append(label)
    elif labels[images[image]] != label:
      problems.append(f'{where}: {image} has label {label}, an earlier row says '
                      f'{labels[images[image]]}')
    captions[images[image]].extend(c.strip() for c in caps)
  if problems:
    raise PairsFileError(f'{path}: {len(problems)} bad row(s):\n{_listed(problems)}\n'
                         f'Fix or remove them; the format is {_PAIRS_FORMAT}.')
  if not images:
    raise PairsFileError(f'{path} holds no pairs; write {_PAIRS_FORMAT}.')
  return list(images), [tuple(c) for c in captions], np.array(labels, np.int32)


class PairsSource(_CaptionSource):
  """The (image file, captions) pairs of a pairs file (see `pairs_source`).

  Records are ``{'image': bytes (the file), 'label': int32, 'texts': int32 [K, L]}``; the
  images are decoded on the host by the input pipeline (``encoded=True``), like a
  `folder.FolderSource`. Captions are tokenized when read (a large file's tokens would not
  fit in memory).
  """

  encoded = True
  image_shape = None
  class_names = None

  def __init__(self, path: os.PathLike | str, tokenizer: Any = None, text: Any = None, *,
               channels: int = 3):
    self._init_text(tokenizer, text)
    if channels not in (1, 3):
      raise ValueError(f'channels must be 1 or 3, got {channels}.')
    self.path, self.channels = str(pathlib.Path(path).expanduser().resolve()), channels
    names, self._captions, self._labels = read_pairs(self.path)
    base = os.path.dirname(self.path)
    self._paths = [os.path.normpath(os.path.join(base, os.path.expanduser(n))) for n in names]
    missing = [f'{n} ({p})' for n, p in zip(names, self._paths) if not os.path.isfile(p)]
    if missing:
      raise FileNotFoundError(
          f'{self.path}: {len(missing)} of {len(names)} image file(s) do not exist:\n'
          f'{_listed(missing)}\nImage paths are relative to the folder of the pairs file '
          f'({base}); fix the paths, or remove the lines of images that are gone.')
    self._labels.flags.writeable = False
    self.has_labels = bool(np.any(self._labels != -1))
    self.num_classes = int(self._labels.max()) + 1 if self.has_labels else None

  def __len__(self) -> int:
    return len(self._paths)

  @property
  def labels(self) -> np.ndarray:
    return self._labels

  def _index(self, index: int) -> int:
    index, n = int(index), len(self)
    if not -n <= index < n:
      raise IndexError(f'index {index} out of range for a source of {n} records.')
    return index % n

  def describe(self, index: int) -> str:
    """The image file's path."""
    return self._paths[self._index(index)]

  def captions(self, index: int) -> list[str]:
    return list(self._captions[self._index(index)])

  def __getitem__(self, index: int) -> dict[str, Any]:
    i = self._index(index)
    path = self._paths[i]
    try:
      with open(path, 'rb') as f:
        data = f.read()
    except OSError as e:
      raise folder.ImageReadError(e.errno, f'cannot read image file: {e.strerror or e}',
                                  path) from e
    return {'image': data, 'label': np.int32(self._labels[i]),
            'texts': self._texts([self._captions[i]], [i])[0]}

  def __repr__(self) -> str:
    return f'PairsSource({self.path!r}, n={len(self)})'


def pairs_source(path: os.PathLike | str, split: str, tokenizer: Any = None,
                 context_length: int | None = None, captions_per_image: int | None = None,
                 *, text: Any = None, channels: int = 3) -> PairsSource:
  """The pairs file `pairs_path(path, split)` as a caption source of encoded images.

  The file is JSONL or CSV (by its suffix): one JSON object a line, {"image": "<path>",
  "caption": "..."} or {"image": ..., "captions": ["...", ...]}, optionally "label": <int>;
  or a CSV with the header image,caption[,label]. Image paths are relative to the file's
  folder (absolute paths work too); rows of the same image are merged. Missing images,
  columns or captions raise one error listing the first few. An image that exists but cannot
  be decoded is met at training time, where the pipeline skips and counts it
  (--config.data.skip_corrupt).
  """
  spec = text_spec(text)
  if context_length is not None:
    spec = spec._replace(context_length=context_length)
  if captions_per_image is not None:
    spec = spec._replace(captions_per_image=captions_per_image)
  return PairsSource(pairs_path(path, split), tokenizer, text_spec(spec), channels=channels)


# --------------------------------------------------------------------------------------------
# TFDS.
# --------------------------------------------------------------------------------------------

# TFDS datasets served as caption sources: name -> (captions feature, its text field).
CAPTION_TFDS_DATASETS = {'coco_captions': ('captions', 'text')}


def _tfds_captions(record: Mapping[str, Any], captions_key: str, text_key: str | None
                   ) -> list[str]:
  """The caption strings of a TFDS record: ``record[captions_key][text_key]`` (a Sequence of
  dicts arrives as a dict of arrays) or ``record[captions_key]`` itself; bytes decoded."""
  value = record[captions_key]
  if text_key is not None:
    if isinstance(value, Mapping):
      value = value[text_key]
    else:  # a list of {'text': ...}
      value = [v[text_key] for v in value]
  if isinstance(value, (str, bytes)):
    value = [value]
  out = []
  for v in np.asarray(value, dtype=object).reshape(-1):
    out.append(v.decode('utf-8', errors='replace') if isinstance(v, bytes) else str(v))
  return out


class TfdsCaptionSource(_CaptionSource):
  """A `sources.TfdsSource` whose records also carry their captions (see
  `tfds_captions_source`). Each record is read once for its image and captions."""

  def __init__(self, images: sources.TfdsSource, tokenizer: Any = None, text: Any = None, *,
               captions_key: str = 'captions', text_key: str | None = 'text'):
    self._init_text(tokenizer, text)
    self.images_source = images
    self.captions_key, self.text_key = captions_key, text_key
    for attr in ('encoded', 'image_shape', 'channels', 'has_labels', 'num_classes',
                 'class_names', 'name', 'split'):
      setattr(self, attr, getattr(images, attr))

  def __len__(self) -> int:
    return len(self.images_source)

  def describe(self, index: int) -> str:
    return self.images_source.describe(index)

  def _raw(self, index: int) -> Mapping[str, Any]:
    index, n = int(index), len(self)
    if not -n <= index < n:
      raise IndexError(f'index {index} out of range for a source of {n} records.')
    return self.images_source.data_source[index % n]

  def _record(self, raw: Mapping[str, Any], index: int) -> dict[str, Any]:
    src = self.images_source
    record = sources._to_record(raw, src.image_key, src.label_key, src.encoded)  # pylint: disable=protected-access
    caps = _tfds_captions(raw, self.captions_key, self.text_key)
    return dict(record, texts=self._texts([caps], [index])[0])

  def captions(self, index: int) -> list[str]:
    return _tfds_captions(self._raw(index), self.captions_key, self.text_key)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._record(self._raw(index), int(index))

  def get_batch(self, indices) -> dict[str, np.ndarray]:
    """Fixed-size images only (as `sources.TfdsSource.get_batch`), with 'texts'."""
    batch = self.images_source.get_batch(indices)
    caps = [self.captions(int(i)) for i in indices]
    return dict(batch, texts=self._texts(caps, [int(i) for i in indices]))

  def __repr__(self) -> str:
    return f'TfdsCaptionSource({self.images_source!r})'


def tfds_captions_source(name: str, split: str, tokenizer: Any = None,
                         context_length: int | None = None,
                         captions_per_image: int | None = None,
                         data_dir: os.PathLike | str | None = None, download: bool = False,
                         *, text: Any = None, image_key: str = 'image',
                         captions_key: str | None = None,
                         text_key: str | None = None) -> TfdsCaptionSource:
  """A prepared TFDS image-caption dataset ('coco_captions': splits train, val, test,
  restval; 5-7 captions an image in ``captions/text``) as a caption source.

  Opened through `sources.tfds_source` (array_record format; a missing dataset raises the
  same error naming the ``tfds build`` command); COCO's images have varying sizes, so the
  records carry encoded JPEG bytes. coco_captions has no image label: labels are -1.
  """
  base = name.split('/')[0].split(':')[0]
  default_keys = CAPTION_TFDS_DATASETS.get(base, ('captions', 'text'))
  captions_key = captions_key or default_keys[0]
  text_key = text_key if text_key is not None else default_keys[1]
  spec = text_spec(text)
  if context_length is not None:
    spec = spec._replace(context_length=context_length)
  if captions_per_image is not None:
    spec = spec._replace(captions_per_image=captions_per_image)
  images = sources.tfds_source(name, split, data_dir=data_dir, download=download,
                               image_key=image_key)
  return TfdsCaptionSource(images, tokenizer, text_spec(spec), captions_key=captions_key,
                           text_key=text_key)
