"""Tests of ssl_jax.data.text (tokenizers) and ssl_jax.data.captions (image-caption sources),
and of the input pipeline carrying their 'texts'."""

from __future__ import annotations

import io
import json
import pathlib
import pickle

import numpy as np
import pytest
from PIL import Image

from ssl_jax.data import captions, host_crop, pipeline, sources, text

SYSTEM_FMNIST = pathlib.Path('/usr/share/datasets/fashion-mnist')


def require_fmnist():
  if not (SYSTEM_FMNIST / 'train-images-idx3-ubyte.gz').is_file():
    pytest.fail(f'{SYSTEM_FMNIST} lacks Fashion-MNIST: sudo apt-get install '
                'dataset-fashion-mnist')


# ------------------------------------------------------------------------------------------
# Tokenizers.
# ------------------------------------------------------------------------------------------


def test_byte_tokenizer_exact_ids_and_round_trip():
  # Catches: an off-by-one in the byte offset (ids must be byte + 2), a missing EOT, padding
  # other than 0, and non-ASCII text encoded as code points instead of UTF-8 bytes.
  tok = text.get_tokenizer('bytes')
  assert (tok.vocab_size, tok.pad_id, tok.eot_id) == (258, 0, 1)
  ids = tok.encode(['hi', ''], 5)
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, [[ord('h') + 2, ord('i') + 2, 1, 0, 0], [1, 0, 0, 0, 0]])
  s = 'Héllo ✓ Coat'  # case kept, multi-byte characters as their UTF-8 bytes
  row = tok.encode([s], 32)[0]
  assert list(row[:len(s.encode())]) == [b + 2 for b in s.encode()]
  assert tok.decode(row) == s
  assert tok.encode([b'hi'], 3).tolist() == [[106, 107, 1]]  # TFDS gives bytes


def test_truncation_keeps_eot_last():
  # Catches: truncating to context_length tokens (dropping EOT, which the text tower pools
  # at) instead of context_length - 1 content tokens + EOT.
  tok = text.ByteTokenizer()
  np.testing.assert_array_equal(tok.encode(['abcdefgh'], 4), [[99, 100, 101, 1]])
  np.testing.assert_array_equal(tok.encode(['abc'], 4), [[99, 100, 101, 1]])  # exact fit
  np.testing.assert_array_equal(tok.encode(['abc'], 1), [[1]])
  ids = tok.encode(['a' * 100, 'b'], 16)
  assert ids[0, -1] == 1 and (ids[0, :-1] != 0).all()
  assert (ids[1, 2:] == 0).all() and ids[1, 1] == 1


def test_encode_rejects_bad_input():
  # Catches: a lone string silently encoded as one caption per character.
  tok = text.ByteTokenizer()
  with pytest.raises(TypeError, match='single string'):
    tok.encode('a coat', 8)
  with pytest.raises(ValueError, match='context_length'):
    tok.encode(['a'], 0)


def test_get_tokenizer_errors(tmp_path):
  with pytest.raises(ValueError, match="'bytes'.*sentencepiece:"):
    text.get_tokenizer('gpt2')
  with pytest.raises(FileNotFoundError, match='--train_sentencepiece'):
    text.get_tokenizer(f'sentencepiece:{tmp_path}/nope.model')


def test_sentencepiece_pad_eot_conventions(tmp_path):
  # Catches: a model whose own ids collide with pad 0 / EOT 1 (content ids 0 or 1 would be
  # read as padding or pooled as EOT), truncation without EOT, and a tokenizer that cannot
  # be pickled to grain workers.
  corpus = [c for phrases in captions.demo_caption_table('train') for c in phrases]
  path = text.train_sentencepiece(corpus, tmp_path / 'spm', vocab_size=64)
  tok = text.get_tokenizer(f'sentencepiece:{path}')
  assert tok.vocab_size == 64 and tok.offset == 0
  ids = tok.encode(['a striped tee', 'photo of a black coat', 'a' * 80], 12)
  assert ids.shape == (3, 12) and ids.dtype == np.int32
  for row in ids:
    n = int(np.flatnonzero(row == 1)[0])  # the one EOT
    assert (row[:n] >= 2).all() and (row[:n] < tok.vocab_size).all()
    assert (row[n + 1:] == 0).all()
  assert ids[2, -1] == 1  # truncated, EOT kept
  assert tok.decode(ids[0]) == 'a striped tee'
  again = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(again.encode(['a striped tee'], 12), ids[:1])

  # A foreign model (SentencePiece's default ids: unk 0, bos 1, eos 2) is shifted by 2.
  import sentencepiece as spm
  spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus),
                                 model_prefix=str(tmp_path / 'foreign'), vocab_size=64,
                                 minloglevel=2)
  foreign = text.SentencePieceTokenizer(tmp_path / 'foreign.model')
  assert foreign.offset == 2 and foreign.vocab_size == 66
  row = foreign.encode(['a striped tee'], 12)[0]
  n = int(np.flatnonzero(row == 1)[0])
  assert (row[:n] >= 2).all() and foreign.decode(row) == 'a striped tee'


def test_train_sentencepiece_command(tmp_path, capsys):
  # Catches: the documented command not producing a usable model from a caption source.
  require_fmnist()
  prefix = tmp_path / 'fm'
  assert text._main(['--train_sentencepiece', '--data=fashion_mnist_captions',
                     '--vocab_size=96', f'--output={prefix}', '--max_images=300']) == 0
  assert 'sentencepiece:' in capsys.readouterr().out
  source = sources.get_source('fashion_mnist_captions', 'test',
                              text={'tokenizer': f'sentencepiece:{prefix}.model'})
  assert source.tokenizer.vocab_size == 96
  assert (source[0]['texts'][:, 0] >= 2).all()


# ------------------------------------------------------------------------------------------
# The Fashion-MNIST demo.
# ------------------------------------------------------------------------------------------


def test_demo_phrasings_held_out_and_short():
  train = captions.demo_caption_table('train')
  test = captions.demo_caption_table('test')
  train_set = {c for phrases in train for c in phrases}
  test_set = {c for phrases in test for c in phrases}
  # Catches: test retrieval on captions seen in training.
  assert not train_set & test_set
  # The held-out zero-shot prompts are no training caption either.
  prompts = {t.format(n) for t in captions.FASHION_MNIST_ZERO_SHOT_TEMPLATES
             for n in captions.FASHION_MNIST_ZERO_SHOT_NAMES}
  assert not prompts & train_set
  # Catches: a caption that names no item of its class (unlearnable).
  for table in (train, test):
    assert len(table) == 10
    for c, phrases in enumerate(table):
      assert len(phrases) >= 20 and len(set(phrases)) == len(phrases)
      for p in phrases:
        assert any(name in p for name in captions._NAMES[c]), (c, p)
  # Catches: captions longer than the default context (they would be truncated).
  longest = max(len(c.encode()) for c in train_set | test_set)
  assert longest == 31 and longest <= captions.TextSpec().context_length - 1
  assert captions.zero_shot_class_names(
      captions.FashionMnistCaptions.__new__(captions.FashionMnistCaptions)) == (
          't-shirt', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt', 'sneaker',
          'bag', 'ankle boot')
  assert 'a photo of a {}.' in captions.GENERIC_ZERO_SHOT_TEMPLATES
  assert (captions.FashionMnistCaptions.zero_shot_templates
          == captions.FASHION_MNIST_ZERO_SHOT_TEMPLATES)


def _indexed_images(n: int) -> sources.ArraySource:
  """Image i is filled with the value i (so a batch says which records it holds); label
  i % 10."""
  images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, 28, 28)).copy()
  return sources.ArraySource(images, np.arange(n) % 10, num_classes=10)


def test_demo_captions_deterministic_and_per_index():
  spec = captions.TextSpec('bytes', 32, 4)
  a = captions.FashionMnistCaptions(_indexed_images(200), 'train', text=spec)
  b = captions.FashionMnistCaptions(_indexed_images(200), 'train', text=spec)
  # Catches: captions drawn from a global RNG (different in each grain worker / run).
  for i in (0, 7, 199):
    assert a.captions(i) == b.captions(i)
    np.testing.assert_array_equal(a[i]['texts'], b[i]['texts'])
    # texts are the captions, tokenized, in order.
    np.testing.assert_array_equal(a[i]['texts'], text.ByteTokenizer().encode(a.captions(i), 32))
    assert len(set(a.captions(i))) == 4
    assert set(a.captions(i)) <= set(a.table[i % 10])
  # Catches: every image of a class getting the same caption set.
  class0 = {tuple(a.captions(i)) for i in range(0, 200, 10)}
  assert len(class0) > 10
  held_out = captions.FashionMnistCaptions(_indexed_images(200), 'test', text=spec)
  assert not set(held_out.captions(3)) & set(captions.demo_caption_table('train')[3])


def test_demo_get_batch_shapes():
  require_fmnist()
  source = captions.fashion_mnist_captions('test', 'bytes', context_length=40,
                                           captions_per_image=3)
  assert len(source) == 10000 and source.image_shape == (28, 28, 1) and not source.encoded
  assert source.text_spec == captions.TextSpec('bytes', 40, 3)
  idx = np.array([5, 0, 9999, 5])
  batch = source.get_batch(idx)
  assert batch['image'].shape == (4, 28, 28, 1) and batch['label'].shape == (4,)
  assert batch['texts'].shape == (4, 3, 40) and batch['texts'].dtype == np.int32
  for row, i in enumerate(idx):  # get_batch agrees with source[i], row for row
    record = source[int(i)]
    np.testing.assert_array_equal(batch['texts'][row], record['texts'])
    np.testing.assert_array_equal(batch['image'][row], record['image'])
    assert batch['label'][row] == record['label']
  assert pickle.loads(pickle.dumps(source))[5]['texts'].tolist() == batch['texts'][0].tolist()


# ------------------------------------------------------------------------------------------
# Pairs files.
# ------------------------------------------------------------------------------------------


def _png(path: pathlib.Path, value: int, size=(20, 16)) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new('RGB', size, (value, value, value)).save(path)


@pytest.fixture
def pairs_dir(tmp_path):
  """img/0.png .. img/5.png (grey level 30 * i) and captions 'image <i>' in a JSONL file
  (image 1 has two captions, image 2 four) and a CSV test split."""
  for i in range(6):
    _png(tmp_path / 'img' / f'{i}.png', 30 * i, (20 + i, 16 + 2 * i))
  lines = [{'image': f'img/{i}.png', 'caption': f'image {i}', 'label': i % 3}
           for i in range(6)]
  lines[1]['captions'] = ['image 1 again']
  lines[2].pop('caption')
  lines[2]['captions'] = ['image 2', 'b', 'c', 'd']
  (tmp_path / 'pairs.jsonl').write_text('\n'.join(json.dumps(x) for x in lines) + '\n\n')
  (tmp_path / 'pairs.csv').write_text(
      'image,caption,label\nimg/4.png,image 4,1\nimg/5.png,"image 5, grey",2\n'
      'img/4.png,image 4 again,1\n')
  (tmp_path / 'pairs_test.jsonl').write_text(
      json.dumps({'image': 'img/3.png', 'captions': ['held out']}) + '\n')
  return tmp_path


def test_pairs_jsonl(pairs_dir):
  # Catches: paths resolved against the working directory instead of the file's folder,
  # captions not cycled / cut to K, and the split rule.
  source = captions.pairs_source(pairs_dir / 'pairs.jsonl', 'train', 'bytes',
                                 context_length=16, captions_per_image=3)
  assert len(source) == 6 and source.encoded and source.image_shape is None
  assert source.has_labels and source.num_classes == 3 and source.channels == 3
  assert source.describe(4) == str(pairs_dir / 'img' / '4.png')
  record = source[4]
  assert record['image'] == (pairs_dir / 'img' / '4.png').read_bytes()
  assert record['label'] == 1 and record['texts'].shape == (3, 16)
  decode = text.ByteTokenizer().decode
  assert [decode(t) for t in record['texts']] == ['image 4'] * 3
  assert source.captions(1) == ['image 1', 'image 1 again']
  assert [decode(t) for t in source[1]['texts']] == ['image 1', 'image 1 again', 'image 1']
  assert source.captions(2) == ['image 2', 'b', 'c', 'd']
  assert [decode(t) for t in source[2]['texts']] == ['image 2', 'b', 'c']
  test = captions.pairs_source(pairs_dir / 'pairs.jsonl', 'test')
  assert len(test) == 1 and test.captions(0) == ['held out'] and not test.has_labels
  assert test.text_spec == captions.TextSpec()
  with pytest.raises(FileNotFoundError, match='pairs_val.jsonl'):
    captions.pairs_source(pairs_dir / 'pairs.jsonl', 'val')
  assert pickle.loads(pickle.dumps(source)).captions(2) == source.captions(2)


def test_pairs_csv(pairs_dir):
  # Catches: CSV rows of the same image becoming separate records, a quoted comma split.
  source = captions.pairs_source(pairs_dir / 'pairs.csv', 'train', captions_per_image=2)
  assert len(source) == 2 and list(source.labels) == [1, 2]
  assert source.captions(0) == ['image 4', 'image 4 again']
  assert source.captions(1) == ['image 5, grey']
  assert source.describe(1) == str(pairs_dir / 'img' / '5.png')


def test_pairs_errors(tmp_path):
  # Catches: a missing image found only at training time, and a bad file without a clear
  # message. Every missing image is counted; the first few are listed.
  _png(tmp_path / 'a.png', 0)
  lines = [{'image': 'a.png', 'caption': 'ok'}]
  lines += [{'image': f'gone/{i}.png', 'caption': 'x'} for i in range(7)]
  (tmp_path / 'p.jsonl').write_text('\n'.join(json.dumps(x) for x in lines))
  with pytest.raises(FileNotFoundError) as e:
    captions.pairs_source(tmp_path / 'p.jsonl', 'train')
  message = str(e.value)
  assert '7 of 8 image file(s)' in message and 'gone/0.png' in message
  assert 'gone/4.png' in message and 'gone/5.png' not in message and '2 more' in message
  assert 'relative to the folder' in message
  with pytest.raises(sources.MissingDataError, match='gone/0.png'):
    sources.get_source('pairs:p.jsonl', 'train', data_dir=tmp_path)

  (tmp_path / 'c.csv').write_text('image,text\na.png,hello\n')
  with pytest.raises(captions.PairsFileError, match=r"lacks the column\(s\) \['caption'\]"):
    captions.pairs_source(tmp_path / 'c.csv', 'train')
  (tmp_path / 'b.jsonl').write_text('{"image": "a.png"}\nnot json\n'
                                    '{"image": "a.png", "caption": "x", "label": "cat"}\n')
  with pytest.raises(captions.PairsFileError) as e:
    captions.pairs_source(tmp_path / 'b.jsonl', 'train')
  assert all(s in str(e.value) for s in ('line 1', 'line 2: not JSON', "'cat'"))
  with pytest.raises(sources.MissingDataError, match='does not exist'):
    sources.get_source('pairs:nope.jsonl', 'train', data_dir=tmp_path)


# ------------------------------------------------------------------------------------------
# Registry.
# ------------------------------------------------------------------------------------------


def test_registry(pairs_dir):
  require_fmnist()
  for name in ('fashion_mnist_captions', 'pairs:x.jsonl', 'tfds:coco_captions'):
    assert sources.is_known_name(name)
  assert not sources.is_known_name('pairs:')
  assert sources.source_info('fashion_mnist_captions') == ((28, 28, 1), 10)
  assert sources.source_info(f'pairs:{pairs_dir}/pairs.jsonl') == ((None, None, 3), 3)
  assert sources.source_info('pairs:pairs.jsonl', pairs_dir, split='test')[1] is None
  assert sources.class_names('fashion_mnist_captions') == sources.FASHION_MNIST_CLASSES
  # Catches: the text settings not reaching the source.
  source = sources.get_source('fashion_mnist_captions', 'train',
                              text={'context_length': 40, 'captions_per_image': 2})
  assert source.text_spec == captions.TextSpec('bytes', 40, 2)
  assert source[0]['texts'].shape == (2, 40)
  assert sources.get_source('fashion_mnist_captions', 'test').text_spec == captions.TextSpec()
  assert 'texts' not in sources.get_source('fashion_mnist', 'test', text={})[0]
  with pytest.raises(ValueError, match='captions_per_image'):
    sources.get_source('fashion_mnist_captions', 'test', text={'captions_per_image': 0})
  with pytest.raises(ValueError, match='fashion_mnist_captions'):
    sources.get_source('nope', 'train')


def test_tfds_coco_captions_records():
  # Catches: the captions read from the wrong feature, a Sequence-of-dicts text feature (a
  # dict of byte arrays) not decoded, and COCO's JPEGs decoded instead of passed as bytes.
  import tensorflow_datasets as tfds
  jpegs = []
  for i in range(3):
    buf = io.BytesIO()
    Image.new('RGB', (10 + i, 8), (i, i, i)).save(buf, format='JPEG')
    jpegs.append(buf.getvalue())
  seen = []

  def as_data_source(self, split, decoders=None, **kwargs):
    del self, kwargs
    seen.append((split, decoders))
    return [{'image': jpegs[i], 'image/id': np.int64(i),
             'captions': {'text': np.array([f'cap {i}.{j}'.encode() for j in range(i + 1)],
                                           dtype=object),
                          'id': np.arange(i + 1, dtype=np.int64)}} for i in range(3)]

  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    source = sources.get_source('tfds:coco_captions', 'val',
                                text={'context_length': 8, 'captions_per_image': 2})
  assert isinstance(source, captions.TfdsCaptionSource)
  assert seen[0][0] == 'val' and isinstance(seen[0][1]['image'], tfds.decode.SkipDecoding)
  assert source.encoded and source.image_shape is None and not source.has_labels
  assert source.captions(2) == ['cap 2.0', 'cap 2.1', 'cap 2.2']
  record = source[0]
  assert record['image'] == jpegs[0] and record['label'] == -1
  decode = text.ByteTokenizer().decode
  assert [decode(t) for t in record['texts']] == ['cap 0.0'] * 2
  assert [decode(t) for t in source[1]['texts']] == ['cap 1.0', 'cap 1.1']
  assert source.describe(1) == 'coco_captions/val[1]'


# ------------------------------------------------------------------------------------------
# The input pipeline carries 'texts'.
# ------------------------------------------------------------------------------------------


def test_pipeline_texts_fixed_size_source():
  # Catches: texts dropped by the training / evaluation iterators, or rows of texts that do
  # not belong to the row's image (image i is filled with i, so each row says its record).
  spec = captions.TextSpec('bytes', 24, 3)
  source = captions.FashionMnistCaptions(_indexed_images(50), 'train', text=spec)
  it = pipeline.make_train_iterator(source, global_batch_size=16, seed=3, process_index=0,
                                    process_count=1)
  for _ in range(4):  # crosses an epoch boundary
    batch = next(it)
    assert batch['texts'].shape == (16, 3, 24)
    for row in range(16):
      np.testing.assert_array_equal(batch['texts'][row],
                                    source[int(batch['image'][row, 0, 0, 0])]['texts'])
  evals = list(pipeline.make_eval_iterator(source, global_batch_size=16, process_index=0,
                                           process_count=1))
  texts = np.concatenate([b['texts'] for b in evals])
  images = np.concatenate([b['image'] for b in evals])
  valid = np.concatenate([b['valid'] for b in evals])
  assert texts.shape == (64, 3, 24) and valid.sum() == 50
  for row in np.flatnonzero(valid):
    np.testing.assert_array_equal(texts[row], source[int(images[row, 0, 0, 0])]['texts'])
  imgs, labels, txts = pipeline.make_eval_arrays(source, 20, with_texts=True)
  assert txts.shape == (20, 3, 24)
  np.testing.assert_array_equal(txts, source.get_batch(np.arange(20))['texts'])

  class RecordsOnly:  # no get_batch: read_batch stacks records
    def __init__(self, s):
      self.s = s

    def __len__(self):
      return len(self.s)

    def __getitem__(self, i):
      return self.s[i]

  batch = pipeline.read_batch(RecordsOnly(source), [4, 2])
  np.testing.assert_array_equal(batch['texts'], source.get_batch([4, 2])['texts'])
  # Image-only sources are unchanged.
  plain = next(pipeline.make_train_iterator(_indexed_images(50), global_batch_size=8, seed=0,
                                            process_index=0, process_count=1))
  assert set(plain) == {'image', 'label', 'index'}
  with pytest.raises(ValueError, match='no captions'):
    pipeline.make_eval_arrays(_indexed_images(5), with_texts=True)


def test_pipeline_texts_encoded_source(pairs_dir):
  # Catches: _CropExample / _EvalExample dropping texts, and a skipped (undecodable) image
  # whose row keeps the skipped record's texts instead of its replacement's.
  (pairs_dir / 'img' / 'bad.png').write_bytes(b'not a png')
  lines = [{'image': f'img/{i}.png', 'caption': f'image {i}'} for i in range(6)]
  lines.insert(2, {'image': 'img/bad.png', 'caption': 'image bad'})
  (pairs_dir / 'mixed.jsonl').write_text('\n'.join(json.dumps(x) for x in lines))
  source = captions.pairs_source(pairs_dir / 'mixed.jsonl', 'train', 'bytes',
                                 context_length=12, captions_per_image=2)
  decode = text.ByteTokenizer().decode
  specs = [host_crop.CropSpec(8, (0.5, 1.0), (0.75, 1.33))] * 2
  it = pipeline.make_train_iterator(source, global_batch_size=7, seed=1, process_index=0,
                                    process_count=1, crop_specs=specs, skip_corrupt=True)
  skipped = 0
  for _ in range(3):
    batch = next(it)
    assert batch['texts'].shape == (7, 2, 12) and batch['texts'].dtype == np.int32
    skipped += int(batch['skipped'].sum())
    for row in range(7):
      value = int(batch['views'][0][row].mean())
      assert value % 30 == 0 and (batch['views'][1][row] == value).all()
      assert [decode(t) for t in batch['texts'][row]] == [f'image {value // 30}'] * 2
  assert skipped == 3  # the bad image once per epoch, 3 epochs of 7
  transform = pipeline.EvalTransform(8, 8)
  images, labels, texts = pipeline.make_eval_arrays(source, transform=transform,
                                                    with_texts=True)
  assert images.shape == (6, 8, 8, 3) and texts.shape == (6, 2, 12)
  for image, t in zip(images, texts):
    assert decode(t[0]) == f'image {int(image.mean()) // 30}'
  batches = list(pipeline.make_eval_iterator(source, global_batch_size=4, transform=transform,
                                             process_index=0, process_count=1))
  assert [b['texts'].shape for b in batches] == [(4, 2, 12), (4, 2, 12)]
  assert not batches[0]['valid'][2] and (batches[0]['texts'][2] == 0).all()
