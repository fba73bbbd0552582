"""CLIP, SigLIP and LiT as methods of the trainer: the sharded step against one device and
float64, the captions' draw, the clamped logit scale, LiT's locked tower, config errors, and
a run through training and evaluation. (The losses themselves: test_image_text_loss.py; the
text tower: test_text_transformer.py; zero-shot and retrieval: test_zero_shot.py; the
caption data: test_text_data.py.)"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import method_harness as harness
from ssl_jax import config_lib, pretrained, train
from ssl_jax.configs import lit as lit_config
from ssl_jax.methods import build_method
from ssl_jax.methods.image_text import sample_captions


def _config(name):
  config = harness.shrink(harness.load_config(name))
  config.text.captions_per_image = 3
  config.text.context_length = 8
  if name != 'lit':
    config.method.embed_dim = 16
  return config


@pytest.mark.parametrize('name', ['clip', pytest.param('siglip', marks=pytest.mark.slow)])
def test_loss_and_gradients_on_8_devices_equal_one_device_and_float64(name):
  """Both towers, the logit scale and SigLIP's bias: catches a loss that sees only this
  device's captions, a caption draw keyed by the local row (1 and 8 devices would draw
  different captions), and a scalar whose gradient is summed over devices twice or not at
  all."""
  config = _config(name)
  if name == 'siglip':
    # At the paper's bias (-10) each negative's term is ~e^-10 of the loss: an error in the
    # negatives would hide under the tolerance.
    config.method.init_bias = -2.0
  ref = harness.check_devices_agree(config)
  grads = ref[1]
  scalars = ['log_scale'] + (['bias'] if name == 'siglip' else [])
  for scalar in scalars:
    assert abs(float(grads[scalar])) > 1e-6, scalar
  for tower in ('encoder', 'text', 'image_projection', 'text_projection'):
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads[tower])) > 0, tower


def test_captions_are_drawn_per_global_row():
  """One of each image's K captions, keyed by the image's index in the global batch: two
  devices' halves draw what the whole batch draws, and draws vary across rows and keys."""
  texts = jnp.asarray(np.random.default_rng(0).integers(2, 258, (512, 4, 6)), jnp.int32)
  rng = jax.random.PRNGKey(3)
  whole = sample_captions(rng, texts, 0)
  halves = jnp.concatenate([sample_captions(rng, texts[:256], 0),
                            sample_captions(rng, texts[256:], 256)])
  np.testing.assert_array_equal(whole, halves)
  chosen = np.argmax(np.all(np.asarray(texts) == np.asarray(whole)[:, None], axis=-1), axis=1)
  assert np.all(np.asarray(texts)[np.arange(512), chosen] == np.asarray(whole))
  counts = np.bincount(chosen, minlength=4)
  assert counts.min() > 512 / 4 * 0.7, counts  # every caption drawn, about equally often
  other = sample_captions(jax.random.PRNGKey(4), texts, 0)
  assert 0.5 < float(np.mean(np.any(np.asarray(other) != np.asarray(whole), axis=1))) < 0.9
  np.testing.assert_array_equal(sample_captions(rng, texts[:, :1], 0), texts[:, 0])


def test_clip_clamps_the_logit_scale_at_100_after_each_step():
  """CLIP's learnable temperature: the parameter is clipped to ln 100 after every optimizer
  step (the paper; OpenCLIP), not inside the loss."""
  method = build_method(_config('clip'))
  clamped = method.after_update({'log_scale': jnp.float32(math.log(200.0)), 'x': 1.0})
  assert float(clamped['log_scale']) == pytest.approx(math.log(100.0), abs=1e-7)
  assert float(method.after_update({'log_scale': jnp.float32(1.5)})['log_scale']) == 1.5
  config = _config('clip')
  config.method.init_log_scale = math.log(150.0)
  states, _ = harness.trainer_steps(config, 1)
  assert float(states[0].params['log_scale']) == pytest.approx(math.log(150.0), abs=1e-6)
  assert float(states[1].params['log_scale']) == pytest.approx(math.log(100.0), abs=1e-6)


def test_lit_leaves_the_image_tower_bit_identical_and_trains_the_text_tower():
  """LiT's image tower is the workdir's evaluated encoder, and three steps (at a learning
  rate that moves every trained leaf) leave it and its BatchNorm statistics bit-identical,
  while the text tower and the logit scale move."""
  config = _config('lit')
  config.optimizer.base_lr = 0.1
  config.optimizer.warmup_epochs = 0.0
  tower = pretrained.load(harness.lit_tower_workdir())
  states, metrics = harness.trainer_steps(config, 3)
  for state in states:
    for tree, expected in ((state.params['encoder'], tower.state.params['encoder']),
                           (state.batch_stats['encoder'], tower.state.batch_stats['encoder'])):
      for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(states[0].params['text']),
                  jax.tree.leaves(states[-1].params['text'])):
    assert not np.array_equal(a, b)
  assert float(states[0].params['log_scale']) != float(states[-1].params['log_scale'])
  assert 'image_projection' not in states[0].params  # the locked features are the embedding
  assert all(np.isfinite(m['loss']) for m in metrics)


def test_lit_config_copies_the_tower_model_and_a_misfit_tower_is_refused():
  config = _config('lit')
  assert config.model.widths == (4, 8) and config.method.image_tower
  config.model.widths = (4, 16)
  method = build_method(config)
  with pytest.raises(ValueError, match=r'configs/lit.py:image_tower='):
    jax.eval_shape(lambda r: method.init(r, jnp.zeros((2, 12, 12, 1))), jax.random.PRNGKey(0))


def test_config_errors_name_the_fix(tmp_path):
  with pytest.raises(config_lib.ConfigError, match='image_tower=workdirs/simclr'):
    config_lib.validate(lit_config.get_config(None), 8)
  with pytest.raises(config_lib.ConfigError, match='not a workdir of a training run'):
    config_lib.validate(lit_config.get_config(f'image_tower={tmp_path}'), 8)
  config = _config('clip')
  config.text.tower = 'text_huge'
  config.text.pooling = 'cls'
  with pytest.raises(config_lib.ConfigError, match=r"text.tower='text_huge'[\s\S]*pooling"):
    config_lib.validate(config, 8)
  config = _config('clip')
  config.data.name = 'fashion_mnist'  # images without captions
  with pytest.raises(config_lib.ConfigError, match='fashion_mnist_captions'):
    train.build(config)


def test_clip_trains_and_evaluate_scores_zero_shot_and_retrieval(tmp_path):
  """Through the trainer (with the periodic evaluation) and `python -m ssl_jax.evaluate`:
  the image-text results are there, in range, and the same numbers from both on the same
  test images."""
  from ssl_jax import evaluate
  config = _config('clip')
  config.eval_every_steps = 2
  config.eval.periodic_bank_size, config.eval.periodic_test_size = 200, 100
  workdir = str(tmp_path / 'clip')
  _, results = train.train_and_evaluate(config, workdir)
  keys = ['zero_shot_top1', 'zero_shot_top5', 'modality_gap'] + [
      f'{d}_recall@{k}' for d in ('i2t', 't2i') for k in (1, 5, 10)]
  for key in keys:
    assert key in results, key
    assert 0 <= results[key] <= (2 if key == 'modality_gap' else 1), (key, results[key])
  assert results['i2t_recall@1'] <= results['i2t_recall@5'] <= results['i2t_recall@10']
  evaluated = evaluate.evaluate_workdir(workdir, evals=('knn', 'image_text'), bank_size=500,
                                        test_size=100, baselines=False, embedding='none')
  row = evaluated['rows']['trained encoder']
  for key in keys + ['knn_top1']:
    assert row[key] == pytest.approx(results[key], abs=1e-6), key
  assert os.path.exists(os.path.join(workdir, 'evaluation'))


@pytest.mark.slow
def test_clip_learns_zero_shot_on_the_demo(tmp_path):
  """300 steps of the demo's CLIP recipe (a sixth of the default run): zero-shot top-1 on
  2,000 test images with the held-out prompts far above chance (0.1; the standard error at
  2,000 images is under 0.01), and retrieval recall that grows with k."""
  config = harness.load_config('clip')
  config.total_steps = 300
  config.checkpoint_every_steps = 300
  config.eval_every_steps = 0
  config.eval.final_bank_size, config.eval.final_test_size = 2000, 2000
  config.eval.baselines = False
  config.eval.diagnostics = config.eval.plots = False
  _, results = train.train_and_evaluate(config, str(tmp_path / 'clip'))
  assert results['zero_shot_top1'] > 0.2, results
  assert results['t2i_recall@1'] <= results['t2i_recall@10'], results
