"""Tokenizers for the text tower of image-text models (CLIP, SigLIP, LiT).

Every tokenizer has one interface::

    tokenizer.encode(strings, context_length) -> int32 [len(strings), context_length]
    tokenizer.vocab_size, tokenizer.pad_id (= 0), tokenizer.eot_id (= 1), tokenizer.spec

An encoded caption is its first ``context_length - 1`` content tokens, then `eot_id`, then
`pad_id` up to `context_length`. The EOT token is always present because the text tower
pools its output at the EOT position (CLIP's convention): a caption truncated without it
would be pooled at an arbitrary token. ``pad_id = 0`` lets a model find the padding as
``ids == 0`` whatever the tokenizer.

* `ByteTokenizer` ('bytes'): the UTF-8 bytes, ``id = byte + 2``; 258 ids. Needs no
  vocabulary file, so it works offline and for any language. Text is kept as is (no
  lower-casing, no normalisation): the demo captions are lower case already, and real
  captions' case can carry meaning ("Apple"). A truncation may cut a multi-byte character;
  the model only ever sees bytes, so that is harmless.
* `SentencePieceTokenizer` ('sentencepiece:<path.model>'): a SentencePiece model, trained
  for a dataset with `train_sentencepiece` or from the command line::

      python -m ssl_jax.data.text --train_sentencepiece --data=fashion_mnist_captions \\
          --vocab_size=96 --output=/tmp/fmnist_spm

  (writes /tmp/fmnist_spm.model; use it with
  ``--config.text.tokenizer=sentencepiece:/tmp/fmnist_spm.model``). The demo's
  captions have few distinct words: SentencePiece allows at most ~100 pieces for them, and
  a vocab_size above what the captions support is an error that says the largest allowed.

`get_tokenizer(spec)` maps a spec string to a tokenizer.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from typing import Iterable, Sequence

import numpy as np

__all__ = ['ByteTokenizer', 'EOT_ID', 'PAD_ID', 'SentencePieceTokenizer', 'get_tokenizer',
           'train_sentencepiece']

PAD_ID = 0
EOT_ID = 1
SENTENCEPIECE_PREFIX = 'sentencepiece:'
TRAIN_COMMAND = ('python -m ssl_jax.data.text --train_sentencepiece --data=<data name> '
                 '--vocab_size=<N> --output=<prefix>')


def _check_strings(strings) -> list[str]:
  """The captions as a list of str (bytes are UTF-8 decoded: TFDS text features are bytes)."""
  if isinstance(strings, (str, bytes)):
    # A lone string would be encoded character by character: almost certainly a bug.
    raise TypeError('encode takes a sequence of strings, got a single string; wrap it in a '
                    'list: encode([text], context_length).')
  out = []
  for s in strings:
    if isinstance(s, (bytes, bytearray, np.bytes_)):
      s = bytes(s).decode('utf-8', errors='replace')
    elif not isinstance(s, str):
      raise TypeError(f'captions must be str (or UTF-8 bytes), got {type(s).__name__}.')
    out.append(str(s))
  return out


def _check_context_length(context_length: int) -> int:
  if not isinstance(context_length, (int, np.integer)) or context_length < 1:
    raise ValueError(f'context_length must be a positive integer (room for at least the EOT '
                     f'token), got {context_length!r}.')
  return int(context_length)


def _pack(token_lists: Sequence[Sequence[int]], context_length: int) -> np.ndarray:
  """Truncates each list to context_length - 1 ids, appends EOT and pads with PAD."""
  out = np.full((len(token_lists), context_length), PAD_ID, np.int32)
  for row, ids in enumerate(token_lists):
    ids = np.asarray(ids, np.int32)[:context_length - 1]
    out[row, :len(ids)] = ids
    out[row, len(ids)] = EOT_ID
  return out


class ByteTokenizer:
  """UTF-8 bytes as tokens: id = byte + 2 (0 is padding, 1 is end of text); 258 ids."""

  vocab_size = 258
  pad_id = PAD_ID
  eot_id = EOT_ID
  spec = 'bytes'

  def encode(self, strings: Sequence[str], context_length: int) -> np.ndarray:
    """int32 [len(strings), context_length]: bytes + 2, truncated, EOT, zero padding."""
    context_length = _check_context_length(context_length)
    strings = _check_strings(strings)
    out = np.full((len(strings), context_length), PAD_ID, np.int32)
    for row, s in enumerate(strings):
      data = np.frombuffer(s.encode('utf-8'), np.uint8)[:context_length - 1]
      out[row, :len(data)] = data.astype(np.int32) + 2
      out[row, len(data)] = EOT_ID
    return out

  def decode(self, ids: Sequence[int]) -> str:
    """The text of one row of ids, up to its EOT (for inspection; invalid UTF-8 replaced)."""
    ids = np.asarray(ids).reshape(-1)
    end = np.flatnonzero(ids == EOT_ID)
    ids = ids[:end[0]] if end.size else ids
    ids = ids[ids >= 2]
    return bytes((ids - 2).astype(np.uint8).tolist()).decode('utf-8', errors='replace')

  def __eq__(self, other) -> bool:
    return isinstance(other, ByteTokenizer)

  def __hash__(self) -> int:
    return hash('bytes')

  def __repr__(self) -> str:
    return 'ByteTokenizer()'


class SentencePieceTokenizer:
  """A SentencePiece model with the pad 0 / EOT 1 conventions.

  A model trained by `train_sentencepiece` has them built in (pad_id=0, eos_id=1, unk_id=2,
  no BOS) and is used as is (``vocab_size`` = its pieces). Any other model (its own
  pad/eos ids) is shifted: id = piece id + 2, ``vocab_size`` = pieces + 2, so ids 0 and 1
  stay free for padding and EOT. The model's own EOS piece is never emitted by encoding.

  Picklable (for grain worker processes): the pickled state is the model file's bytes.
  """

  pad_id = PAD_ID
  eot_id = EOT_ID

  def __init__(self, model_path: os.PathLike | str):
    path = pathlib.Path(model_path).expanduser()
    if not path.is_file():
      raise FileNotFoundError(
          f'SentencePiece model {path} does not exist. Train one from a caption dataset '
          f'with\n    {TRAIN_COMMAND}\nand pass sentencepiece:<prefix>.model, or use the '
          "'bytes' tokenizer, which needs no model.")
    self.model_path = str(path)
    self._load(path.read_bytes())

  def _load(self, proto: bytes) -> None:
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top

    self._proto = proto
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(proto)
    except (RuntimeError, OSError) as e:
      raise ValueError(f'{self.model_path} is not a SentencePiece model ({e}). Train one '
                       f'with\n    {TRAIN_COMMAND}') from e
    native = self._sp.pad_id() == PAD_ID and self._sp.eos_id() == EOT_ID
    self.offset = 0 if native else 2
    self.vocab_size = self._sp.get_piece_size() + self.offset

  @property
  def spec(self) -> str:
    return SENTENCEPIECE_PREFIX + self.model_path

  def encode(self, strings: Sequence[str], context_length: int) -> np.ndarray:
    """int32 [len(strings), context_length]: pieces, truncated, EOT, zero padding."""
    context_length = _check_context_length(context_length)
    strings = _check_strings(strings)
    pieces = self._sp.encode(strings, out_type=int) if strings else []
    if self.offset:
      pieces = [[i + self.offset for i in ids] for ids in pieces]
    return _pack(pieces, context_length)

  def decode(self, ids: Sequence[int]) -> str:
    """The text of one row of ids, up to its EOT (for inspection)."""
    ids = np.asarray(ids).reshape(-1)
    end = np.flatnonzero(ids == EOT_ID)
    ids = ids[:end[0]] if end.size else ids
    ids = [int(i) - self.offset for i in ids if i >= 2]
    return self._sp.decode(ids)

  def __getstate__(self):
    return {'model_path': self.model_path, 'proto': self._proto}

  def __setstate__(self, state):
    self.model_path = state['model_path']
    self._load(state['proto'])

  def __repr__(self) -> str:
    return f'SentencePieceTokenizer({self.model_path!r}, vocab_size={self.vocab_size})'


def get_tokenizer(spec: str):
  """'bytes' -> `ByteTokenizer`; 'sentencepiece:<path.model>' -> `SentencePieceTokenizer`."""
  if spec == 'bytes':
    return ByteTokenizer()
  if isinstance(spec, str) and spec.startswith(SENTENCEPIECE_PREFIX):
    path = spec[len(SENTENCEPIECE_PREFIX):]
    if path:
      return SentencePieceTokenizer(path)
  raise ValueError(
      f"Unknown tokenizer {spec!r}: use 'bytes' (UTF-8 bytes, no model needed) or "
      f"'{SENTENCEPIECE_PREFIX}<path.model>' (a model trained with: {TRAIN_COMMAND}).")


def train_sentencepiece(captions: Iterable[str], model_prefix: os.PathLike | str,
                        vocab_size: int, *, model_type: str = 'unigram',
                        character_coverage: float = 1.0) -> str:
  """Trains a SentencePiece model on `captions`; returns the path of ``<prefix>.model``.

  The ids are reserved for `SentencePieceTokenizer`: pad 0, EOS (= EOT) 1, unknown 2, no BOS
  (the text tower pools at EOT and never needs a start token). Text is not lower-cased.
  `character_coverage` 1.0 keeps every character seen (captions use few); lower it for
  languages with large character sets.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top

  prefix = pathlib.Path(model_prefix).expanduser()
  prefix.parent.mkdir(parents=True, exist_ok=True)
  sentences = (s.decode('utf-8', errors='replace') if isinstance(s, bytes) else str(s)
               for s in captions)
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences, model_prefix=str(prefix), vocab_size=int(vocab_size),
        model_type=model_type, character_coverage=character_coverage,
        pad_id=PAD_ID, eos_id=EOT_ID, unk_id=2, bos_id=-1, minloglevel=2)
  except RuntimeError as e:
    if 'Vocabulary size' in str(e):
      raise ValueError(
          f'The captions are too few or too uniform for vocab_size={vocab_size} ({e}); use '
          'a smaller --vocab_size (at most the number the message allows).') from e
    raise
  return str(prefix) + '.model'


def _main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m ssl_jax.data.text',
      description='Train a SentencePiece tokenizer on the training captions of a caption '
                  'data source.')
  parser.add_argument('--train_sentencepiece', action='store_true', required=True,
                      help='train a SentencePiece model (the only command)')
  parser.add_argument('--data', required=True,
                      help="a caption source: 'fashion_mnist_captions', 'pairs:<file>' or "
                           "'tfds:coco_captions' (as --config.data.name)")
  parser.add_argument('--vocab_size', type=int, required=True)
  parser.add_argument('--output', required=True, help='model prefix: writes <output>.model')
  parser.add_argument('--split', default='train')
  parser.add_argument('--data_dir', default=None)
  parser.add_argument('--max_images', type=int, default=None,
                      help='read the captions of at most this many images (spread evenly)')
  args = parser.parse_args(argv)

  from ssl_jax.data import sources  # pylint: disable=g-import-not-at-top

  source = sources.get_source(args.data, args.split, args.data_dir)
  if not hasattr(source, 'captions'):
    parser.error(f'{args.data!r} is not a caption source (it has no captions).')
  n = len(source)
  count = n if not args.max_images else min(args.max_images, n)
  indices = np.arange(count, dtype=np.int64) * n // max(count, 1)
  captions = (c for i in indices for c in source.captions(int(i)))
  try:
    path = train_sentencepiece(captions, args.output, args.vocab_size)
  except ValueError as e:
    parser.exit(2, f'{parser.prog}: error: {e}\n')
  print(f'Wrote {path}; use it with --config.text.tokenizer={SENTENCEPIECE_PREFIX}{path}')
  return 0


if __name__ == '__main__':
  sys.exit(_main())
