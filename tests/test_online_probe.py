"""The online linear probe: trained on frozen features, it never changes the encoder's
training, is exact across devices, and learns the labels."""

import jax
import numpy as np
import pytest

import method_harness as mh
from ssl_jax import parallel
from ssl_jax.data import pipeline, sources
from ssl_jax.evaluation.online_probe import OnlineProbe


def _run(config, num_devices, probe, batches):
  config.total_steps = 100
  config.optimizer.warmup_epochs = 2.0  # one-step epochs: 2 warm-up steps
  config.eval.online_probe = probe is not None
  if probe is not None:
    config.eval.online_probe_lr = probe.learning_rate
  built, state, step = mh.build_experiment(config, num_devices)
  assert built.probe == probe
  mesh = built.mesh
  history = []
  for images, labels in batches:
    state, metrics = step(state, *parallel.global_batch_from_host((images, labels), mesh))
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history


def _fmnist_batches(n_batches, batch_size):
  source = sources.get_source('fashion_mnist', 'train')
  images, labels = pipeline.make_eval_arrays(source, max_examples=n_batches * batch_size)
  return [(images[i:i + batch_size], labels[i:i + batch_size])
          for i in range(0, len(images), batch_size)]


@pytest.mark.slow  # 20-30 s; the probe's loss and its trainer run stay in the default suite
def test_probe_leaves_encoder_training_unchanged_and_is_exact_across_devices(tiny_config):
  probe = OnlineProbe(num_classes=10, learning_rate=1e-2)
  batches = _fmnist_batches(2, tiny_config.batch_size)
  plain, plain_hist = _run(tiny_config, 1, None, batches)
  one, one_hist = _run(tiny_config, 1, probe, batches)
  eight, eight_hist = _run(tiny_config, 8, probe, batches)
  # Labels reach only the classifier: the encoder trains exactly as without the probe.
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(plain.params)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(one_hist[-1]['loss'], plain_hist[-1]['loss'])
  assert 'online_probe_acc' not in plain_hist[-1]
  # 8 devices == 1 device, probe included.
  for key in ('online_probe_loss', 'online_probe_acc', 'loss'):
    np.testing.assert_allclose(eight_hist[-1][key], one_hist[-1][key], rtol=2e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               eight.probe_params, one.probe_params)
  assert not np.allclose(one.probe_params['kernel'], 0)


def test_probe_learns_the_labels(tiny_config):
  probe = OnlineProbe(num_classes=10, learning_rate=5e-2)
  tiny_config.batch_size = 64
  batches = _fmnist_batches(60, 64)
  _, history = _run(tiny_config, 1, probe, batches)
  first = np.mean([h['online_probe_loss'] for h in history[:5]])
  last = np.mean([h['online_probe_loss'] for h in history[-5:]])
  accuracy = np.mean([h['online_probe_acc'] for h in history[-10:]])
  assert last < 0.85 * first, (first, last)
  assert accuracy > 0.25, accuracy  # chance is 0.1
