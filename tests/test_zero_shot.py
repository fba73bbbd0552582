"""Zero-shot evaluation (`ssl_jax.evaluation.zero_shot`): prompt ensembling against numpy,
zero-shot top-1 / top-5 and retrieval recalls on embeddings built so that the answers are
known, retrieval against a brute-force reference, and the modality gap by hand. Each test says
which bug it catches."""

from __future__ import annotations

import numpy as np
import pytest

from ssl_jax.evaluation import zero_shot as zs


def _e(i, d=8):
  return np.eye(d, dtype=np.float32)[i]


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ----------------------------------------------------------------------- prompt ensembling

def test_class_embeddings_normalise_average_normalise():
  """Catches averaging raw embeddings (the long prompt would dominate), a missing final
  normalisation, prompts not built as template.format(name), and classes out of order. The
  template embeddings have norms 1, 10 and 0.5, so the unnormalised average points elsewhere."""
  rng = np.random.default_rng(0)
  names, templates = ['cat', 'dog', 'tiny bird'], ['a photo of a {}.', '{}', 'art of the {}']
  prompts = [t.format(n) for n in names for t in templates]
  vocab = {p: i for i, p in enumerate(prompts)}
  table = rng.normal(size=(len(prompts), 6)).astype(np.float32)
  table = _unit(table) * np.tile([1.0, 10.0, 0.5], len(names))[:, None]
  calls = []

  def tokenize(strings):
    return np.array([[vocab[s]] for s in strings], np.int32)           # [n, 1]

  def encode_text(tokens):
    calls.append(tokens.shape)
    return table[tokens[:, 0]]

  out = zs.class_embeddings(encode_text, tokenize, names, templates)
  assert out.shape == (3, 6) and out.dtype == np.float32
  assert calls == [(3, 1)] * 3  # one call per class, a fixed batch of len(templates) prompts
  per_class = table.reshape(3, 3, 6)
  expected = _unit(_unit(per_class).mean(axis=1))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
  unweighted = _unit(per_class.mean(axis=1))
  assert np.abs(unweighted - expected).max() > 0.1  # the test can tell the two apart

  # Callable templates (OpenAI's list of lambdas) are called with the name.
  lambdas = [lambda c, t=t: t.format(c) for t in templates]
  np.testing.assert_allclose(zs.class_embeddings(encode_text, tokenize, names, lambdas), out)


# ------------------------------------------------------------------- zero-shot accuracy

def test_zero_shot_top1_and_top5():
  """Eight images, six classes: six images nearest their class, one whose class is second
  (top-5 hit), one whose class is last (top-5 miss): top-1 = 6/8, top-5 = 7/8. Class 1 has a
  norm of 10, so a raw dot product would move image 0 to class 1: catches missing
  normalisation of the class embeddings. chunk_size=3 leaves a padded last chunk: catches
  padding rows counted or labels misaligned across chunks."""
  d = 8
  classes = np.stack([_e(c, d) for c in range(6)]) * np.array([1, 10, 1, 1, 1, 1.0])[:, None]
  labels = np.array([0, 1, 2, 3, 4, 5, 2, 4])
  images = np.stack([
      0.6 * _e(0) + 0.5 * _e(1),     # cosine: class 0 (raw dot: class 1)
      _e(1), _e(2), _e(3), _e(4), _e(5),
      _e(0) + 0.5 * _e(2),           # label 2 ranked second
      _e(0) - 0.5 * _e(4),           # label 4 ranked last of six
  ]) * np.array([1, 2, 3, 4, 5, 6, 7, 8.0])[:, None]
  for chunk in (3, 1024):
    out = zs.zero_shot_accuracy(images, classes, labels, chunk_size=chunk)
    assert out == {'zero_shot_top1': 0.75, 'zero_shot_top5': 0.875}
  # Fewer than five classes: no top-5.
  out = zs.zero_shot_accuracy(np.eye(4)[[0, 1, 2, 0]], np.eye(4), [0, 1, 2, 3])
  assert out == {'zero_shot_top1': 0.75}
  with pytest.raises(ValueError):
    zs.zero_shot_accuracy(np.eye(4), np.eye(4), [0, 1, 2, 4])


# ----------------------------------------------------------------------------- retrieval

def test_retrieval_swapped_pairs():
  """One text per image, texts 6 and 7 each closer to the other's image: R@1 = 6/8 both ways,
  R@5 = R@10 = 1 (k past the 8 candidates). Catches ranks off by one, similarities transposed
  (the swap is symmetric, the key order is checked too), and chunk bookkeeping (chunk 3)."""
  images = np.stack([_e(i) for i in range(8)]) * 3.0
  texts = np.stack([_e(i) for i in range(8)])
  texts[6] = _e(7) + 0.6 * _e(6)
  texts[7] = _e(6) + 0.6 * _e(7)
  for chunk in (3, 1024):
    out = zs.retrieval_recall(images, texts, np.arange(8), chunk_size=chunk)
    assert list(out) == ['i2t_recall@1', 'i2t_recall@5', 'i2t_recall@10',
                         't2i_recall@1', 't2i_recall@5', 't2i_recall@10']
    assert out == {'i2t_recall@1': 0.75, 'i2t_recall@5': 1.0, 'i2t_recall@10': 1.0,
                   't2i_recall@1': 0.75, 't2i_recall@5': 1.0, 't2i_recall@10': 1.0}


def test_retrieval_several_texts_per_image_any_rule():
  """Four images, two texts each (texts interleaved, as a shuffled caption file). Text (i, 0)
  points at image i+1 (own image second); text (i, 1) is image i itself, except image 3's,
  which also points at image 0. So image->text: images 0-2 find a text of theirs first (ANY of
  its texts counts), image 3's best is second: R@1 = 3/4. Text->image: only texts (0-2, 1) find
  their image first: R@1 = 3/8; every text's image is second at worst: R@2 = 1. Catches
  judging an image by its first (or every) text instead of any, and text->image ranks taken
  over texts instead of images."""
  texts, text_image = [], []
  for i in range(4):
    texts.append(_e((i + 1) % 4) + 0.3 * _e(i))
    texts.append(_e(i) if i < 3 else _e(0) + 0.3 * _e(3))
    text_image += [i, i]
  order = np.random.default_rng(0).permutation(8)
  texts, text_image = np.stack(texts)[order], np.array(text_image)[order]
  images = np.stack([_e(i) for i in range(4)])
  out = zs.retrieval_recall(images, texts, text_image, ks=(1, 2), chunk_size=3)
  assert out == {'i2t_recall@1': 0.75, 'i2t_recall@2': 1.0,
                 't2i_recall@1': 0.375, 't2i_recall@2': 1.0}


def _reference_recall(images, texts, text_image, ks):
  """Brute force: the full similarity matrix, sorted."""
  sims = _unit(images.astype(np.float64)) @ _unit(texts.astype(np.float64)).T   # [N, M]
  out = {}
  i2t_order = np.argsort(-sims, axis=1)
  described = [i for i in range(len(images)) if np.any(text_image == i)]
  for k in ks:
    hits = [np.any(text_image[i2t_order[i, :k]] == i) for i in described]
    out[f'i2t_recall@{k}'] = float(np.mean(hits))
  t2i_order = np.argsort(-sims.T, axis=1)
  for k in ks:
    hits = [text_image[j] in t2i_order[j, :k] for j in range(len(texts))]
    out[f't2i_recall@{k}'] = float(np.mean(hits))
  return out


def test_retrieval_matches_brute_force():
  """Noisy captions of 40 images, 1 to 4 each, 3 images without any (candidates for
  text->image only), embeddings of widely varying norms: equals the sorted full matrix.
  Catches missing normalisation (norms span 100x), counting undescribed images in
  image->text, and chunking errors (chunk 7 divides neither 37 nor the text count)."""
  rng = np.random.default_rng(1)
  images = rng.normal(size=(40, 16))
  per_image = rng.integers(1, 5, 40)
  per_image[[5, 17, 39]] = 0
  text_image = np.repeat(np.arange(40), per_image)
  texts = images[text_image] + 1.2 * rng.normal(size=(len(text_image), 16))
  images = images * np.exp(rng.uniform(-2.3, 2.3, size=(40, 1)))
  texts = texts * np.exp(rng.uniform(-2.3, 2.3, size=(len(texts), 1)))
  ks = (1, 5, 10)
  out = zs.retrieval_recall(images, texts, text_image, ks, chunk_size=7)
  reference = _reference_recall(images, texts, text_image, ks)
  assert out == pytest.approx(reference, abs=1e-9)
  assert 0.2 < out['t2i_recall@1'] < 0.95 and 0.2 < out['i2t_recall@1'] < 0.95  # informative


# -------------------------------------------------------------------------- modality gap

def test_modality_gap():
  """Normalised means (1/2, 1/2, 0) and (0, 0, 1): the gap is sqrt(1.5). Catches means of raw
  embeddings (norms 2, 3 and 5 here) and a squared distance; identical sets have no gap."""
  images = np.array([[2.0, 0, 0], [0, 3.0, 0]])
  texts = np.array([[0, 0, 5.0], [0, 0, 0.5]])
  assert zs.modality_gap(images, texts) == pytest.approx(np.sqrt(1.5), rel=1e-6)
  assert zs.modality_gap(images, images * 7) == pytest.approx(0.0, abs=1e-7)
