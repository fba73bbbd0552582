"""What CLIP, SigLIP and LiT share: the two-tower network, the captions' sampling, the
embeddings that zero-shot evaluation needs. Not a method itself (no registry entry): each of
the three files subclasses `ImageTextMethod` and writes its objective.

The batch carries each image's K tokenized captions ('texts', int32 [B, K, L], from the
caption sources of `data.captions`); every step one of them is drawn per image, keyed by the
step's loss key and the image's index in the global batch, so the draw does not depend on the
number of devices (COCO has five captions per image: each is seen about equally often).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from ssl_jax.data import text as text_data
from ssl_jax.methods.base import Method
from ssl_jax.methods.common import concatenated_views
from ssl_jax.models import DTYPES, build_encoder
from ssl_jax.models.image_text import ImageTextModel
from ssl_jax.models.text_transformer import SIZES as TEXT_SIZES
from ssl_jax.models.text_transformer import TextTransformer

# fold_in tag ('capt') keeping the caption draw apart from the loss's other random streams.
_CAPTION_STREAM = 0x63617074


def sample_captions(rng, texts, first_row):
  """One of each image's K captions: texts [b, K, L] -> [b, L]. Row i (global index
  first_row + i) draws with the key fold_in(rng, first_row + i), the same on any number of
  devices. K = 1 returns the only caption."""
  if texts.ndim == 2:  # a single caption per image, already [b, L]
    return texts
  rows, num_captions = texts.shape[:2]
  if num_captions == 1 or rng is None:
    return texts[:, 0]
  stream = jax.random.fold_in(rng, _CAPTION_STREAM)
  keys = jax.vmap(lambda i: jax.random.fold_in(stream, i))(first_row + jnp.arange(rows))
  # int32 explicitly: with 64-bit types on, the default integer draws other bits.
  choice = jax.vmap(lambda k: jax.random.randint(k, (), 0, num_captions, jnp.int32))(keys)
  return jnp.take_along_axis(texts, choice[:, None, None], axis=1)[:, 0]


def text_tower(config) -> TextTransformer:
  """`config.text`'s tower for its tokenizer's vocabulary."""
  t = config.text
  width, depth, heads = TEXT_SIZES[t.tower]
  tokenizer = text_data.get_tokenizer(t.tokenizer)
  return TextTransformer(vocab_size=tokenizer.vocab_size, context_length=t.context_length,
                         width=width, depth=depth, num_heads=heads, causal=t.causal,
                         pooling=t.pooling, pad_id=tokenizer.pad_id, eot_id=tokenizer.eot_id,
                         dtype=DTYPES[config.model.dtype])


@dataclasses.dataclass(frozen=True)
class ImageTextMethod(Method):
  """One augmented view of each image and one of its captions; the objective compares the
  image embeddings of this device's rows with the text embeddings of all rows (and back).

  Subclasses set `init_bias` (SigLIP's learnable bias), `lock_image` (LiT) and write
  `objective` from `outputs['image']`, `outputs['text']` (this device's rows, [b, D], not
  normalised) and `params['log_scale']` / `params['bias']`."""
  num_views: ClassVar[int] = 1
  paired_inputs: ClassVar[tuple[str, ...]] = ('texts',)
  lock_image: ClassVar[bool] = False

  @classmethod
  def method_problems(cls, config) -> list[str]:
    problems = []
    t = config.get('text')
    if t is None:
      return [f'{config.method.name} needs a config.text block (tokenizer, context_length, '
              'captions_per_image, tower, causal, pooling): start from '
              f'configs/{config.method.name}.py.']
    if t.tower not in TEXT_SIZES:
      problems.append(f'text.tower={t.tower!r} is unknown; known: {sorted(TEXT_SIZES)}.')
    if t.pooling not in ('eot', 'mean'):
      problems.append(f"text.pooling={t.pooling!r} must be 'eot' or 'mean'.")
    if t.context_length < 2:
      problems.append(f'text.context_length={t.context_length} must be at least 2 (one '
                      'token and the end-of-text token).')
    if t.captions_per_image < 1:
      problems.append(f'text.captions_per_image={t.captions_per_image} must be >= 1.')
    try:
      text_data.get_tokenizer(t.tokenizer)
    except (ValueError, FileNotFoundError) as e:
      problems.append(f'text.tokenizer: {e}')
    if not cls.lock_image and config.method.embed_dim < 1:
      problems.append(f'method.embed_dim={config.method.embed_dim} must be positive.')
    return problems

  def init_bias(self) -> float | None:
    return None

  def init_log_scale(self) -> float:
    return self.config.method.init_log_scale

  def network(self, axis_name=None) -> ImageTextModel:
    return ImageTextModel(encoder=build_encoder(self.config.model, axis_name),
                          text=text_tower(self.config), embed_dim=self.config.method.embed_dim,
                          init_log_scale=self.init_log_scale(), init_bias=self.init_bias(),
                          project_image=not self.lock_image, lock_image=self.lock_image,
                          dtype=DTYPES[self.config.model.dtype])

  def sample_tokens(self) -> jnp.ndarray:
    return jnp.zeros((2, self.config.text.context_length), jnp.int32)

  def init_networks(self, rng, images):
    variables = self.network().init(rng, images, self.sample_tokens(), train=False)
    return variables['params'], variables.get('batch_stats', {})

  def forward(self, params, batch_stats, views, rng, axis_name, first_row):
    images, texts = views
    tokens = sample_captions(rng, texts, first_row)
    # Told the rows' place in the global batch: drop-path masks follow each example's global
    # index, so micro-batches and any device count draw the whole batch's masks.
    network = concatenated_views(self.network(axis_name), images.shape[0], first_row)
    variables = {'params': params, 'batch_stats': batch_stats}
    if self.lock_image:  # inference mode: nothing of the image tower changes
      image, text, _ = network.apply(variables, images, tokens, train=True)
      return {'image': image, 'text': text}, batch_stats
    (image, text, _), updates = network.apply(variables, images, tokens, train=True,
                                              mutable=['batch_stats'],
                                              rngs=Method.dropout_rngs(rng, 0))
    return {'image': image, 'text': text}, updates.get('batch_stats', batch_stats)

  # --- What evaluation needs beyond `encode`. ---

  def embed_images(self, params, batch_stats, images) -> jnp.ndarray:
    """Images in the shared space (float32 [B, D], not normalised)."""
    return self.network().apply({'params': params, 'batch_stats': batch_stats}, images,
                                train=False, method='embed_image')

  def embed_texts(self, params, tokens) -> jnp.ndarray:
    """Tokens [B, L] in the shared space (float32 [B, D], not normalised)."""
    return self.network().apply({'params': params}, tokens, train=False, method='embed_text')
