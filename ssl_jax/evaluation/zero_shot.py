"""Zero-shot evaluation of image-text models: classification by prompts, retrieval, and the
modality gap.

Everything works on embeddings already computed (numpy or jax arrays), compared by cosine
similarity: the functions normalise their inputs, so raw tower outputs may be passed.
Evaluation sets hold at most tens of thousands of images and texts, so similarities are
computed exactly, one chunk of queries against all candidates at a time: memory grows with
chunk x candidates, never with the square of the set. Each chunk is one jitted call on
float32 inputs with the matmul at full float32 precision (`precision.matmul`: on TPUs a
default-precision float32 matmul rounds to bfloat16, enough to reorder close candidates);
the last chunk is padded so that every chunk has the same shape and compiles once.

Ranks count the candidates scored strictly higher than the right one, so a tie is counted
in the query's favour (top-k of a sort would break it by index).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax import precision


def l2_normalize(x, eps: float = 1e-12) -> np.ndarray:
  """Rows of `x` scaled to unit norm, float32 (a zero row stays zero)."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def class_embeddings(encode_text: Callable, tokenize: Callable, class_names: Sequence[str],
                     templates: Sequence) -> np.ndarray:
  """[C, D] float32 classifier weights by CLIP's prompt ensembling: for each class, every
  template filled with its name is embedded and L2-normalised, the unit vectors are averaged
  over templates, and the mean is L2-normalised again.

  Normalising before averaging gives each template an equal vote: an average of raw
  embeddings would be led by the prompts the text tower happens to embed with large norms.

  encode_text: int32 tokens [n, L] -> embeddings [n, D] (e.g. a jitted text tower with its
    projection). It is called once per class with the same n = len(templates), so a jitted
    function compiles once.
  tokenize: list of strings -> int32 tokens [n, L].
  templates: format strings with one '{}' for the name ('a photo of a {}.'), or callables
    name -> prompt (as OpenAI's list of lambdas).
  """
  if not templates:
    raise ValueError('class_embeddings needs at least one template.')
  weights = []
  for name in class_names:
    prompts = [t(name) if callable(t) else t.format(name) for t in templates]
    emb = l2_normalize(np.asarray(encode_text(tokenize(prompts))))
    weights.append(emb.mean(axis=0))
  return l2_normalize(np.stack(weights))


def _chunks(queries: np.ndarray, chunk_size: int):
  """(start, chunk, its real row count) over the rows; every chunk has
  min(chunk_size, rows) rows, the last padded with zeros."""
  size = min(chunk_size, len(queries))
  for start in range(0, len(queries), size):
    chunk = queries[start:start + size]
    n = len(chunk)
    yield start, np.pad(chunk, ((0, size - n), (0, 0))), n


@jax.jit
def _rank_of_label(queries, candidates, labels):
  """[chunk] int32: for each query, how many candidates score strictly higher than the
  candidate `labels[i]`."""
  sims = precision.matmul(queries, candidates.T)                     # [chunk, C]
  right = jnp.take_along_axis(sims, labels[:, None], axis=1)
  return jnp.sum(sims > right, axis=1)


@jax.jit
def _rank_of_best_positive(queries, candidates, candidate_query, first_query):
  """[chunk] int32: for each query, how many candidates score strictly higher than its best
  positive, the candidates j with candidate_query[j] == the query's index (first_query + row);
  C for a query without positives."""
  ids = first_query + jnp.arange(queries.shape[0])
  positive = candidate_query[None, :] == ids[:, None]                # [chunk, C]
  sims = precision.matmul(queries, candidates.T)
  best = jnp.max(jnp.where(positive, sims, -jnp.inf), axis=1, keepdims=True)
  rank = jnp.sum(sims > best, axis=1)
  return jnp.where(jnp.any(positive, axis=1), rank, candidates.shape[0])


def zero_shot_accuracy(image_emb, class_emb, labels, *, chunk_size: int = 1024
                       ) -> dict[str, float]:
  """Zero-shot classification: each image is given the class of highest cosine similarity.

  image_emb: [N, D]; class_emb: [C, D] (`class_embeddings`); labels: int [N].
  Returns {'zero_shot_top1': ...} and, when C >= 5, 'zero_shot_top5' (the right class among
  the 5 most similar).
  """
  images = l2_normalize(image_emb)
  classes = jnp.asarray(l2_normalize(class_emb))
  labels = np.asarray(labels, np.int32)
  if len(labels) != len(images):
    raise ValueError(f'{len(images)} images but {len(labels)} labels.')
  if len(images) == 0:
    raise ValueError('zero_shot_accuracy needs at least one image.')
  if np.any(labels < 0) or np.any(labels >= classes.shape[0]):
    raise ValueError(f'Labels must lie in [0, {classes.shape[0]}), one per class embedding.')
  ranks = []
  for start, chunk, n in _chunks(images, chunk_size):
    chunk_labels = np.pad(labels[start:start + n], (0, len(chunk) - n))
    ranks.append(np.asarray(_rank_of_label(jnp.asarray(chunk), classes,
                                           jnp.asarray(chunk_labels)))[:n])
  ranks = np.concatenate(ranks)
  out = {'zero_shot_top1': float(np.mean(ranks < 1))}
  if classes.shape[0] >= 5:
    out['zero_shot_top5'] = float(np.mean(ranks < 5))
  return out


def retrieval_recall(image_emb, text_emb, text_image, ks: Sequence[int] = (1, 5, 10), *,
                     chunk_size: int = 1024) -> dict[str, float]:
  """Image-text retrieval recall at k, both directions (as CLIP's COCO and Flickr30k
  evaluation).

  image_emb: [N, D]; text_emb: [M, D]; text_image: int [M], the image each text describes
  (several texts per image allowed, as COCO's 5 captions).
  image -> text R@k: the fraction of images for which ANY of their texts is among the k most
    similar texts (over the images that have at least one text).
  text -> image R@k: the fraction of texts whose image is among the k most similar images
    (every image is a candidate, those without texts included).
  Returns {'i2t_recall@k': ..., 't2i_recall@k': ...} for each k in `ks`.
  """
  images = l2_normalize(image_emb)
  texts = l2_normalize(text_emb)
  text_image = np.asarray(text_image, np.int32)
  if len(text_image) != len(texts):
    raise ValueError(f'{len(texts)} texts but text_image has {len(text_image)} entries.')
  if len(texts) == 0 or np.any(text_image < 0) or np.any(text_image >= len(images)):
    raise ValueError(f'text_image must index the {len(images)} images, one per text.')

  # text -> image: the right image is one candidate, its rank is counted directly.
  images_j = jnp.asarray(images)
  t2i = []
  for start, chunk, n in _chunks(texts, chunk_size):
    targets = np.pad(text_image[start:start + n], (0, len(chunk) - n))
    t2i.append(np.asarray(_rank_of_label(jnp.asarray(chunk), images_j,
                                         jnp.asarray(targets)))[:n])
  t2i = np.concatenate(t2i)

  # image -> text: ANY of the image's texts in the top k <=> its best-scored text is.
  texts_j, text_image_j = jnp.asarray(texts), jnp.asarray(text_image)
  i2t = []
  for start, chunk, n in _chunks(images, chunk_size):
    i2t.append(np.asarray(_rank_of_best_positive(jnp.asarray(chunk), texts_j, text_image_j,
                                                 jnp.int32(start)))[:n])
  i2t = np.concatenate(i2t)
  described = np.zeros(len(images), bool)
  described[text_image] = True
  i2t = i2t[described]

  out = {}
  for k in ks:
    out[f'i2t_recall@{k}'] = float(np.mean(i2t < k))
  for k in ks:
    out[f't2i_recall@{k}'] = float(np.mean(t2i < k))
  return out


def modality_gap(image_emb, text_emb) -> float:
  """|| mean of the L2-normalised image embeddings - mean of the L2-normalised text
  embeddings || (Liang et al. 2022, "Mind the Gap"): how far apart the two modalities sit on
  the sphere; 0 when their centroids coincide, at most 2."""
  gap = (l2_normalize(image_emb).astype(np.float64).mean(axis=0)
         - l2_normalize(text_emb).astype(np.float64).mean(axis=0))
  return float(np.linalg.norm(gap))
