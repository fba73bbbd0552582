"""The text tower (`ssl_jax.models.text_transformer`): output and parameter tree, CLIP's
parameter count, padding invariance, the causal mask, where 'eot' and 'mean' pooling read,
and bfloat16 compute. Each test says which bug it catches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax.models import text_transformer as tt
from ssl_jax.models.text_transformer import SIZES, TextTransformer

RNG = jax.random.PRNGKey(0)
PAD, EOT, SOT = 0, 1, 2
TINY = dict(vocab_size=50, context_length=32, width=16, depth=2, num_heads=2)


def _num_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _caption(ids, length, pad=PAD):
  """[SOT, *ids, EOT] padded to `length` with `pad`."""
  row = [SOT, *ids, EOT]
  return np.array(row + [pad] * (length - len(row)), np.int32)


def _apply(model, variables, tokens, **kwargs):
  return jax.jit(lambda v, t: model.apply(v, t, **kwargs))(variables, jnp.asarray(tokens))


@pytest.fixture(scope='module')
def variables():
  """One parameter tree for every causal / pooling / dtype variant (they share it)."""
  tokens = jnp.stack([_caption([5, 6], 8)] * 2)
  return jax.jit(lambda t: TextTransformer(**TINY).init(RNG, t))(tokens)


def test_output_shape_and_parameter_tree(variables):
  """Catches features of the wrong shape or dtype, and parameter names that drift from the
  documented tree (vit.py's block layout) that weight converters rely on."""
  params = variables['params']
  assert sorted(params) == ['block_0', 'block_1', 'norm', 'pos_embed', 'token_embed']
  assert sorted(params['block_0']) == ['attn', 'fc1', 'fc2', 'norm1', 'norm2']
  assert sorted(params['block_0']['attn']) == ['proj', 'qkv']
  assert params['token_embed']['embedding'].shape == (50, 16)
  assert params['pos_embed'].shape == (32, 16)
  # CLIP's initialisation: N(0, 0.02) token table, N(0, 0.01) positions (not truncated: a
  # 50 x 16 table at 0.02 has entries beyond 2 sigma).
  emb, pos = params['token_embed']['embedding'], params['pos_embed']
  assert 0.015 < float(jnp.std(emb)) < 0.025 and float(jnp.max(jnp.abs(emb))) > 0.04
  assert 0.007 < float(jnp.std(pos)) < 0.013
  tokens = np.stack([_caption([5, 6, 7], 12), _caption([9], 12), _caption([], 12)])
  out = _apply(TextTransformer(**TINY), variables, tokens)
  assert out.shape == (3, 16) and out.dtype == jnp.float32
  assert np.all(np.isfinite(out))


def test_text_base_parameter_count_is_clips():
  """Catches a wrong width, depth or MLP ratio for 'text_base', a missing bias or LayerNorm, or
  a position table not sized by context_length: CLIP ViT-B/32's text transformer (token and
  position embeddings, 12 blocks, ln_final; no text_projection) has 63,165,952 parameters.
  Counted abstractly (eval_shape): nothing is computed."""
  width, depth, heads = SIZES['text_base']
  assert (width, depth, heads) == (512, 12, 8) and SIZES['text_micro'] == (64, 2, 2)
  assert tt.text_tower_sizes() == SIZES
  vocab, context = tt.CLIP_VOCAB_SIZE, tt.CLIP_CONTEXT_LENGTH
  model = TextTransformer(vocab, context, width, depth, heads)
  abstract = jax.eval_shape(lambda t: model.init(RNG, t),
                            jax.ShapeDtypeStruct((1, context), jnp.int32))
  per_block = (2 * width                        # ln_1
               + 3 * width * width + 3 * width  # attention in_proj
               + width * width + width          # out_proj
               + 2 * width                      # ln_2
               + width * 4 * width + 4 * width  # c_fc
               + 4 * width * width + width)     # c_proj
  expected = vocab * width + context * width + depth * per_block + 2 * width
  assert expected == 63_165_952
  assert _num_params(abstract) == expected


@pytest.mark.parametrize('causal', [True, False])
@pytest.mark.parametrize('pooling', ['eot', 'mean'])
def test_padding_invariance(variables, causal, pooling):
  """The same captions padded to 16 and to 32 tokens give the same features. Catches padding
  keys not masked (bidirectional: every valid token attends to the 10 or 26 pads) and mean
  pooling over the pads (both attentions). Causal 'eot' pooling would pass without a pad mask
  (the end token never sees what follows it); it is here for completeness."""
  model = TextTransformer(**TINY, causal=causal, pooling=pooling)
  captions = [[5, 6, 7, 8], [9], [10, 11, 12, 13, 14, 15, 16, 17]]
  short = np.stack([_caption(c, 16) for c in captions])
  long = np.stack([_caption(c, 32) for c in captions])
  a, b = _apply(model, variables, short), _apply(model, variables, long)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # What follows the end token is padding whatever its ids (CLIP pads with id 0, a real
  # token): random ids there change nothing either.
  noisy = long.copy()
  for row, c in enumerate(captions):
    noisy[row, len(c) + 2:] = np.random.default_rng(row).integers(2, 50, 32 - len(c) - 2)
  np.testing.assert_allclose(_apply(model, variables, noisy), b, rtol=1e-5, atol=1e-5)


def test_causal_mask(variables):
  """Changing the token at position 4 of an 8-token caption: with causal attention the
  features of positions 0-3 are unchanged and those of 4-7 (the end token's, so the pooled
  features, included) change. Catches a missing or transposed causal mask (positions 0-3
  would see position 4); the bidirectional model, where they do change, shows the check has
  power."""
  a = _caption([5, 6, 7, 8, 9, 10], 12)
  b = a.copy()
  b[4] = 30
  tokens = np.stack([a, b])
  for causal in (True, False):
    model = TextTransformer(**TINY, causal=causal)
    pooled, per_token = _apply(model, variables, tokens, return_tokens=True)
    assert per_token.shape == (2, 12, 16) and per_token.dtype == jnp.float32
    before = np.abs(per_token[0, :4] - per_token[1, :4]).max(axis=-1)
    after = np.abs(per_token[0, 4:8] - per_token[1, 4:8]).max(axis=-1)
    assert np.all(after > 1e-3)
    assert np.abs(pooled[0] - pooled[1]).max() > 1e-3
    if causal:
      np.testing.assert_allclose(before, 0.0, atol=1e-6)
    else:
      assert np.all(before > 1e-3)


def test_pooling_reads_the_caption(variables):
  """'eot' pooling returns the features at the FIRST end token and 'mean' the mean over
  positions 0..end. Caption ids (2..49) all exceed eot_id = 1, so CLIP's argmax-of-id rule
  would pick a caption token: catches it, an off-by-one, taking the last rather than the first
  eot (row 2 has a second one in its padding), and a mean over the pads. Row 3 has no end token:
  it ends at its last non-pad token. Row 1 holds pad_id inside the caption (CLIP's '!' is id 0):
  the mean must count it, a `tokens != pad_id` mask would not."""
  tokens = np.stack([
      _caption([5, 6, 7], 16),
      _caption([5, PAD, 7, 8, 9, 10, 11], 16),
      _caption([12], 16),
      np.array([SOT, 20, 21, 22, 23] + [PAD] * 11, np.int32),
  ])
  tokens[2, 9] = EOT
  ends = np.array([4, 8, 2, 4])
  np.testing.assert_array_equal(tt.caption_end(jnp.asarray(tokens), EOT, PAD), ends)
  for causal in (True, False):
    eot = TextTransformer(**TINY, causal=causal, pooling='eot')
    mean = TextTransformer(**TINY, causal=causal, pooling='mean')
    pooled, per_token = _apply(eot, variables, tokens, return_tokens=True)
    expected = per_token[np.arange(4), ends]
    np.testing.assert_allclose(pooled, expected, rtol=1e-6, atol=1e-6)
    pooled_mean, per_token_mean = _apply(mean, variables, tokens, return_tokens=True)
    np.testing.assert_allclose(per_token_mean, per_token, rtol=1e-6, atol=1e-6)
    expected = np.stack([per_token[r, :e + 1].mean(0) for r, e in enumerate(ends)])
    np.testing.assert_allclose(pooled_mean, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(pooled_mean - pooled).max() > 1e-2  # the two poolings differ


def test_bfloat16_computes_in_bf16_with_float32_params_and_features(variables):
  """Catches parameters created in bfloat16, features returned in bfloat16, the dtype not
  reaching the blocks (bf16 output identical to float32), or a bf16 path far off float32
  (e.g. the mask's float32 minimum overflowing in bfloat16)."""
  tokens = np.stack([_caption([5, 6, 7, 8], 16), _caption([9, 10], 16)])
  model16 = TextTransformer(**TINY, dtype=jnp.bfloat16, causal=False)
  abstract = jax.eval_shape(lambda t: model16.init(RNG, t), jnp.asarray(tokens))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(abstract))
  out16 = _apply(model16, variables, tokens)
  out32 = _apply(TextTransformer(**TINY, causal=False), variables, tokens)
  assert out16.dtype == jnp.float32 and out16.shape == (2, 16)
  assert np.all(np.isfinite(out16))
  assert np.abs(out16 - out32).max() > 0
  np.testing.assert_allclose(out16, out32, atol=0.1)


def test_rejects_bad_inputs(variables):
  """Catches inputs longer than the position table silently broadcast or truncated, and an
  unknown pooling silently falling back to one of the two."""
  with pytest.raises(ValueError, match='length'):
    TextTransformer(**TINY).apply(variables, jnp.zeros((1, 33), jnp.int32))
  with pytest.raises(ValueError, match='pooling'):
    TextTransformer(**TINY, pooling='cls').apply(variables, jnp.zeros((1, 8), jnp.int32))
