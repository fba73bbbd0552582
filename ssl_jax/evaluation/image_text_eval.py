"""Evaluation of image-text models (CLIP, SigLIP, LiT): zero-shot classification, retrieval
both ways, the modality gap and each tower's embedding diagnostics, on the evaluation split
of a caption source (its images and their captions; the demo's are held-out phrasings).

- Zero-shot: each class's name filled into prompt templates (the source's, or CLIP's generic
  ones), embedded and averaged as the CLIP paper does (`zero_shot.class_embeddings`); an image
  gets the class of the nearest class embedding.
- Retrieval: every caption of every image (K per image) against the images: image -> text
  recall@k counts an image found when any of its captions is in its top k, text -> image
  when the caption's image is in its top k (COCO's 5k-image protocol, on the split given).
- Modality gap (Liang et al. 2022): the distance between the means of the normalised image
  and text embeddings; diagnostics (effective rank, spread, uniformity) of each tower's
  embeddings, as for the vision methods' features.

Every process computes the same numbers from all rows (the split is read by each): the
sets are evaluation-sized (10,000 images, 50,000 captions at most here).
"""

from __future__ import annotations

import jax
import numpy as np

from ssl_jax.data import captions as captions_lib
from ssl_jax.data import text as text_lib
from ssl_jax.evaluation import diagnostics, features, zero_shot

RECALL_KS = (1, 5, 10)


def is_image_text(method) -> bool:
  """Whether `method` embeds captions (and so gets these evaluations)."""
  return 'texts' in method.paired_inputs


def _embedders(method, state):
  from ssl_jax.methods import evaluated_variables  # evaluation imports the methods
  params, batch_stats = features.local_copy(evaluated_variables(method, state))
  embed_images = jax.jit(lambda p, s, x, size: method.embed_images(
      p, s, features.preprocess(x, size)), static_argnums=3)
  embed_texts = jax.jit(method.embed_texts)
  return (lambda images, size: np.asarray(embed_images(params, batch_stats, images, size)),
          lambda tokens: np.asarray(embed_texts(params, tokens)))


def _text_batches(tokens: np.ndarray, embed, batch_size: int) -> np.ndarray:
  """Embeddings of tokens [N, L] in fixed-size batches (one compiled shape)."""
  return features.map_padded_batches(embed, tokens, batch_size)


def templates_of(source) -> tuple[str, ...]:
  """The prompt templates of `source` (the demo's held-out prompts), else CLIP's generic."""
  return tuple(getattr(source, 'zero_shot_templates', None) or
               captions_lib.GENERIC_ZERO_SHOT_TEMPLATES)


def image_text_evaluation(config, method, state, eval_set, batch_size: int | None = None,
                          prefix: str = '') -> dict:
  """Zero-shot top-1 (and top-5), retrieval recall@1/5/10 both ways, the modality gap and
  each tower's diagnostics of `method`'s towers in `state` on `eval_set` (an
  `eval_data.EvalSet` of a caption source). Keys are prefixed with `prefix`."""
  batch_size = batch_size or config.eval.batch_size
  embed_images, embed_texts = _embedders(method, state)
  image_size = config.eval.image_size or None
  image_emb, labels, tokens = [], [], []
  for batch in eval_set.batches(batch_size, this_host_only=True):
    valid = np.asarray(batch['valid'])
    image_emb.append(embed_images(batch['image'], image_size)[valid])
    labels.append(np.asarray(batch['label'])[valid])
    if 'texts' in batch:  # a caption source; a labelled image dataset gets zero-shot only
      tokens.append(np.asarray(batch['texts'])[valid])
  image_emb, labels = np.concatenate(image_emb), np.concatenate(labels)
  towers = {'image': image_emb}
  results = {}
  if tokens:
    tokens = np.concatenate(tokens)                    # [N, K, L]
    n, k, length = tokens.shape
    text_emb = _text_batches(tokens.reshape(n * k, length), embed_texts, batch_size)
    results.update(retrieval_recall(image_emb, text_emb, np.repeat(np.arange(n), k)))
    results['modality_gap'] = float(zero_shot.modality_gap(image_emb, text_emb))
    towers['text'] = text_emb[::k]  # one caption per image
  for tower, emb in towers.items():
    # On the first `diagnostics_size` rows, as the vision diagnostics (uniformity is N^2).
    emb = emb[:config.eval.diagnostics_size]
    measured = diagnostics.representation_diagnostics(emb, emb)
    for key in ('effective_rank', 'std_fraction', 'uniformity'):
      results[f'{tower}_{key}'] = float(measured[key])
  source = eval_set.source
  if (labels >= 0).all() and getattr(source, 'has_labels', True):
    try:
      names = captions_lib.zero_shot_class_names(source)
    except ValueError:
      names = None
    if names:
      tokenizer = text_lib.get_tokenizer(config.text.tokenizer)
      tokenize = lambda strings: tokenizer.encode(strings, config.text.context_length)  # noqa: E731
      classes = zero_shot.class_embeddings(
          lambda t: _text_batches(np.asarray(t), embed_texts, batch_size), tokenize, names,
          templates_of(source))
      results.update(zero_shot.zero_shot_accuracy(image_emb, classes, labels))
  return {prefix + key: value for key, value in results.items()}


def retrieval_recall(image_emb, text_emb, text_image) -> dict:
  return zero_shot.retrieval_recall(image_emb, text_emb, text_image, ks=RECALL_KS)
