"""The text tower of image-text contrastive learning (CLIP, Radford et al. 2021; SigLIP; LiT).

CLIP's text encoder: a token embedding plus a learned absolute position embedding, pre-LayerNorm
transformer blocks (multi-head self-attention and a GELU MLP 4 x wide), a final LayerNorm, and
the features of one token as the caption's representation. The blocks use vit.py's layout and
parameter names (`norm1`, `attn/qkv`, `attn/proj`, `norm2`, `fc1`, `fc2`), so a weight
converter and `optim.decay_mask` treat both towers alike; what differs is the attention, which
takes a mask here (vit.Attention has none):

  * causal (CLIP, `causal=True`): a token attends to itself and the tokens before it;
  * padding: keys after the caption's end are always masked out. With causal attention the
    end token never sees them anyway, but bidirectional attention (`causal=False`, as LiT's and
    SigLIP's text towers) or mean pooling would otherwise read the padding, and the features
    of a caption would depend on how far it was padded.

Where a caption ends. Tokens are int32 [B, L], L <= context_length: the caption's tokens, the
last of them `eot_id` (the tokenizer guarantees it, truncated captions included), then padding.
The end is the FIRST `eot_id` of the row, found explicitly: CLIP takes the argmax of the token
ids, which is the end token only because CLIP's EOT (49407) is the largest id of its vocabulary.
Every position after it is padding, whatever its id. The mask is not `tokens != pad_id`
because CLIP's tokenizer pads with id 0, which is also the real token '!': a pad-id mask would
hide every '!' of a caption. `pad_id` matters only for a row without `eot_id` (a tokenizer
that does not append one): such a row ends at its last token that is not `pad_id`.

Pooling: 'eot' (CLIP) the features at the end token; 'mean' the mean over the caption's
positions, start and end tokens included. The final LayerNorm comes before pooling, as in CLIP
and open_clip (`final_ln_after_pool=False`) and big_vision; for 'eot' the order does not
matter, LayerNorm being per token.

Initialisation. The token embedding is normal with standard deviation 0.02 and the position
embedding normal with 0.01, as CLIP's `initialize_parameters`. The blocks follow vit.py's
(timm's) scheme, truncated normal 0.02 and zero biases, not CLIP's width-scaled normals
(attention in_proj width^-1/2, out_proj and c_proj width^-1/2 (2 depth)^-1/2, c_fc
(2 width)^-1/2), so both towers of a model start alike. LayerNorm epsilon is PyTorch's 1e-5
(CLIP's), not timm's 1e-6: it matters for CLIP weights loaded here. There is no
text projection: the method's head maps features to the joint embedding space.

Mixed precision as the rest of the library (precision.py): with `dtype=bfloat16`, dense layers,
embeddings added to the residual stream, and residual additions run in bfloat16; parameters,
LayerNorms, attention logits and softmax are float32, and the features are returned float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# vit.py's Linear layers: truncated normal 0.02 weights, zero biases (timm's and DINO's init).
from ssl_jax.models.vit import _dense

POOLINGS = ('eot', 'mean')
ACTIVATIONS = ('gelu', 'quick_gelu')
# name: (width, depth, heads); the MLP is 4 x width wide. 'text_micro' is for CPU tests and
# recipes; 'text_base' is CLIP ViT-B/32's (and B/16's) text tower, 'text_large' CLIP ViT-L/14's.
SIZES = {
    'text_micro': (64, 2, 2),
    'text_base': (512, 12, 8),
    'text_large': (768, 12, 12),
}
# CLIP's byte-pair vocabulary (49152 merges + 256 bytes, doubled with end-of-word forms, plus
# the start and end tokens) and context.
CLIP_VOCAB_SIZE = 49408
CLIP_CONTEXT_LENGTH = 77

def text_tower_sizes() -> dict[str, tuple[int, int, int]]:
  """`SIZES`, a copy: name -> (width, depth, heads)."""
  return dict(SIZES)


def _layer_norm(name: str) -> nn.LayerNorm:
  # float32 whatever the compute dtype; two-pass variance as vit.py's; CLIP's epsilon.
  return nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, use_fast_variance=False, name=name)


def caption_end(tokens, eot_id: int, pad_id: int):
  """[B] int32: the position of each row's first `eot_id`; for a row without one, of its last
  token that is not `pad_id` (0 for a row of padding only)."""
  length = tokens.shape[1]
  is_eot = tokens == eot_id
  first_eot = jnp.argmax(is_eot, axis=1)
  not_pad = tokens != pad_id
  last_token = length - 1 - jnp.argmax(not_pad[:, ::-1], axis=1)
  last_token = jnp.where(jnp.any(not_pad, axis=1), last_token, 0)
  return jnp.where(jnp.any(is_eot, axis=1), first_eot, last_token).astype(jnp.int32)


def attention_mask(tokens, eot_id: int, pad_id: int, causal: bool):
  """[B, 1, L, L] booleans, True where query q may attend to key k: k within the caption
  (k <= its end) and, if `causal`, k <= q. No row is empty: key 0 is always allowed."""
  length = tokens.shape[1]
  pos = jnp.arange(length)
  valid = pos[None, :] <= caption_end(tokens, eot_id, pad_id)[:, None]     # [B, L]
  mask = jnp.broadcast_to(valid[:, None, :], (tokens.shape[0], length, length))
  if causal:
    mask = mask & (pos[None, :] <= pos[:, None])[None]
  return mask[:, None]


class MaskedAttention(nn.Module):
  """vit.Attention (fused qkv in timm's layout, float32 logits and softmax) with a boolean
  mask [B, 1 or H, Lq, Lk]: masked logits are set to the float32 minimum, so a masked key gets
  exactly zero weight as long as its row has one allowed key."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    b, n, d = x.shape
    head_dim = d // self.num_heads
    qkv = _dense(3 * d, self.dtype, 'qkv')(x).reshape(b, n, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum('bqhd,bkhd->bhqk', q * head_dim ** -0.5, k,
                        preferred_element_type=jnp.float32)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, n, d)
    return _dense(d, self.dtype, 'proj')(out)


class TextBlock(nn.Module):
  """x + Attention(LN(x), mask), then x + MLP(LN(x)): vit.Block without drop path or
  LayerScale, with a mask. `activation`: 'gelu' (exact) or 'quick_gelu', x sigmoid(1.702 x),
  which OpenAI's CLIP checkpoints were trained with (open_clip's later ones use 'gelu')."""
  num_heads: int
  mlp_ratio: float = 4.0
  activation: str = 'gelu'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    d = x.shape[-1]
    y = MaskedAttention(self.num_heads, dtype=self.dtype, name='attn')(
        _layer_norm('norm1')(x).astype(self.dtype), mask)
    x = x + y
    y = _layer_norm('norm2')(x).astype(self.dtype)
    y = _dense(int(d * self.mlp_ratio), self.dtype, 'fc1')(y)
    if self.activation == 'quick_gelu':
      y = y * jax.nn.sigmoid(1.702 * y)
    else:
      y = nn.gelu(y, approximate=False)
    return x + _dense(d, self.dtype, 'fc2')(y)


class TextTransformer(nn.Module):
  """CLIP's text tower; `__call__(tokens)` returns float32 features [B, width].

  Attributes:
    vocab_size, context_length: the token embedding's rows and the position embedding's
      (inputs may be shorter than context_length: they use its first L rows).
    width, depth, num_heads, mlp_ratio: the transformer's size (`SIZES`).
    causal: CLIP's causal attention; False: bidirectional (LiT, SigLIP). Padding is masked
      either way.
    pooling: 'eot' (the features at the first `eot_id`) or 'mean' (over the caption's
      positions, padding excluded).
    pad_id, eot_id: the padding and end-of-text ids; see the module docstring for how the
      caption's end is found.
    activation: 'gelu' or 'quick_gelu' (OpenAI's CLIP weights); see `TextBlock`.
    dtype: computation dtype; parameters stay float32, LayerNorm and softmax run in float32.

  Parameters: `token_embed/embedding` [vocab, width], `pos_embed` [context, width],
  `block_{i}/{norm1, attn/{qkv, proj}, norm2, fc1, fc2}`, `norm` (CLIP's ln_final).
  """
  vocab_size: int
  context_length: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  causal: bool = True
  pooling: str = 'eot'
  pad_id: int = 0
  eot_id: int = 1
  activation: str = 'gelu'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, train: bool = True, return_tokens: bool = False):
    """tokens: int [B, L]. `train` is accepted for the encoders' common signature and unused
    (no dropout or BatchNorm). `return_tokens`: also return every position's features
    [B, L, width] float32 after the final LayerNorm (those after the caption's end are
    meaningless)."""
    del train
    if self.width % self.num_heads:
      raise ValueError(f'Text width {self.width} is not divisible by its {self.num_heads} heads.')
    if self.pooling not in POOLINGS or self.activation not in ACTIVATIONS:
      raise ValueError(f'pooling must be one of {POOLINGS} and activation one of '
                       f'{ACTIVATIONS}; got {self.pooling!r}, {self.activation!r}.')
    if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
      raise ValueError(f'Tokens must be [batch, length <= {self.context_length}]; got shape '
                       f'{tokens.shape}.')
    tokens = tokens.astype(jnp.int32)
    length = tokens.shape[1]
    x = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                 name='token_embed')(tokens)
    pos = self.param('pos_embed', nn.initializers.normal(0.01),
                     (self.context_length, self.width))
    x = x.astype(self.dtype) + pos[:length].astype(self.dtype)[None]
    mask = attention_mask(tokens, self.eot_id, self.pad_id, self.causal)
    for i in range(self.depth):
      x = TextBlock(self.num_heads, self.mlp_ratio, self.activation, dtype=self.dtype,
                    name=f'block_{i}')(x, mask)
    x = _layer_norm('norm')(x).astype(jnp.float32)                       # [B, L, width]
    end = caption_end(tokens, self.eot_id, self.pad_id)
    if self.pooling == 'eot':
      pooled = jnp.take_along_axis(x, end[:, None, None], axis=1)[:, 0]
    else:
      valid = (jnp.arange(length)[None, :] <= end[:, None]).astype(jnp.float32)
      # A weighted sum rather than an einsum: a float32 matmul at default precision would
      # round to bfloat16 on TPUs.
      pooled = (jnp.sum(valid[:, :, None] * x, axis=1) /
                jnp.sum(valid, axis=1, keepdims=True))
    return (pooled, x) if return_tokens else pooled
