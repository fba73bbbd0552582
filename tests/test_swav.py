"""SwAV: the method's loss against the authors' loop in numpy (codes of the global crops only,
local crops predicting), 8 devices equal to one with multi-crop and a queue, the queue's
contents over several steps, frozen and normalised prototypes, config errors, a short
Fashion-MNIST run that learns, and exact resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import method_harness as mh
from test_sinkhorn import reference_sinkhorn, reference_swapped_loss
from ssl_jax import config_lib, parallel
from ssl_jax.methods import RunLength

BATCH = 32


def _config(**method):
  c = mh.shrink(mh.load_config('swav'), batch_size=BATCH)
  c.augment.num_local_crops = 2
  m = c.method
  m.projector_hidden_dim = 16
  m.projector_output_dim = 8
  m.num_prototypes = 10
  m.freeze_prototypes_steps = 2
  m.update(method)
  return c


def _unit_columns(kernel):
  np.testing.assert_allclose(np.linalg.norm(np.asarray(kernel), axis=0), 1.0, rtol=1e-5)


def test_config_errors_name_the_fix():
  config_lib.validate(mh.load_config('swav'), 8)
  config_lib.validate(mh.load_config('swav', 'backbone=resnet50'), 8)
  c = _config(num_prototypes=0, epsilon=0.0, sinkhorn_iterations=0, queue_size=16,
              freeze_prototypes_steps=-1)
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(c, 8)
  message = str(error.value)
  for expected in ('method.num_prototypes must be positive', 'method.epsilon must be positive',
                   'method.sinkhorn_iterations must be at least 1',
                   'method.queue_size=16 is shorter than one global batch (32): set it to 0',
                   'method.freeze_prototypes_steps must be >= 0'):
    assert expected in message, message


def test_devices_agree_multicrop():
  # Step 3: prototypes no longer frozen (queue_run covers the frozen steps on 8 devices).
  mh.check_devices_agree(_config(), num_devices=8, batch_size=BATCH, steps=(3,))


@pytest.fixture(scope='module')
def queue_run():
  """Four loss evaluations on 8 devices threading the method state, each on new views, with
  a queue of two global batches that starts at step 1: it fills at steps 1 and 2 and joins
  the Sinkhorn problem from step 3. Returns the config, method, params and per-step records."""
  config = _config(queue_size=2 * BATCH, queue_start_epoch=1.0)
  run_length = RunLength(total_steps=4, steps_per_epoch=1)
  method, params, batch_stats, _, state = mh.init_method(config, run_length)
  mesh = parallel.make_mesh(8)
  axis = parallel.DATA_AXIS

  def sharded(p, s, v, k):
    return jax.shard_map(
        lambda p, s, v, k: method.loss(p, batch_stats, {}, s, v, None, k, axis), mesh=mesh,
        in_specs=(P(), P(), P(axis), P()), out_specs=(P(), (P(), P(), P())))(p, s, v, k)

  step_8 = jax.jit(jax.value_and_grad(sharded, has_aux=True))
  records = []
  for step in range(4):
    views = mh.make_views(config, method, BATCH, seed=step)
    k = jnp.asarray(step, jnp.int32)
    (loss, (_, _, new_state)), grads = jax.device_get(step_8(params, state, views, k))
    records.append(dict(views=views, state=jax.device_get(state), loss=loss, grads=grads,
                        new_state=new_state))
    state = new_state
  return config, method, params, batch_stats, records


def _embeddings(method, params, batch_stats, views):
  """z and prototype scores of every crop, composed here from the parts as the authors'
  forward does: the encoder on each resolution group (global crops, then local crops), the
  projector on all crops at once. Training-mode BN over the whole batch is what synchronised
  BN computes on 8 devices."""
  net = method.network()
  encode = lambda x: net.encoder.apply(
      {'params': params['encoder'], 'batch_stats': batch_stats['encoder']}, x, train=True,
      mutable=['batch_stats'])[0]
  features = jnp.concatenate([encode(jnp.concatenate(views[:2])),
                              encode(jnp.concatenate(views[2:]))])
  h, _ = net.projector.apply(
      {'params': params['projector'], 'batch_stats': batch_stats['projector']}, features,
      train=True, mutable=['batch_stats'])
  z = np.asarray(h, np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  scores = z @ np.asarray(params['prototypes']['kernel'], np.float64)
  n = views[0].shape[0]
  split = lambda x: [x[v * n:(v + 1) * n] for v in range(len(views))]
  return split(z), split(scores)


def test_loss_is_the_authors_with_queue(queue_run):
  config, method, params, batch_stats, records = queue_run
  m = config.method
  prototypes = np.asarray(params['prototypes']['kernel'], np.float64)
  for step, r in enumerate(records):
    z, scores = _embeddings(method, params, batch_stats, r['views'])
    queue = r['state']['queue']
    full = int(r['state']['queue_filled']) >= m.queue_size
    assert full == (step == 3)
    # Codes for the two global crops only; all four crops predict.
    codes = [reference_sinkhorn(scores[v], m.epsilon, m.sinkhorn_iterations,
                                queue[v] @ prototypes if full else None) for v in range(2)]
    expected = reference_swapped_loss(scores, codes, m.temperature)
    # On 8 devices: the Sinkhorn sums span all of them and the queue counts once.
    np.testing.assert_allclose(r['loss'], expected, rtol=2e-5, err_msg=f'step {step}')
  # The queue matters once full: without it the step-3 loss would differ.
  z, scores = _embeddings(method, params, batch_stats, records[3]['views'])
  no_queue = reference_swapped_loss(
      scores, [reference_sinkhorn(scores[v], m.epsilon, m.sinkhorn_iterations)
               for v in range(2)], m.temperature)
  assert abs(no_queue - records[3]['loss']) > 1e-4


def test_queue_holds_newest_global_embeddings_first(queue_run):
  config, method, params, batch_stats, records = queue_run
  z = [_embeddings(method, params, batch_stats, r['views'])[0] for r in records]
  states = [r['new_state'] for r in records]
  # Step 0 is before queue_start_epoch: nothing enqueued.
  np.testing.assert_array_equal(states[0]['queue'], 0.0)
  assert int(states[0]['queue_filled']) == 0
  assert [int(s['queue_filled']) for s in states[1:]] == [BATCH, 2 * BATCH, 2 * BATCH]
  for v in range(2):  # the global crops only
    np.testing.assert_allclose(states[1]['queue'][v, :BATCH], z[1][v], atol=1e-5)
    np.testing.assert_array_equal(states[1]['queue'][v, BATCH:], 0.0)
    # Step 3 pushed step 1's batch out.
    np.testing.assert_allclose(states[3]['queue'][v], np.concatenate([z[3][v], z[2][v]]),
                               atol=1e-5)
    # Unit embeddings, as the scores against the prototypes assume.
    np.testing.assert_allclose(np.linalg.norm(states[3]['queue'][v], axis=1), 1.0, rtol=1e-5)


def test_prototypes_frozen_for_configured_steps(queue_run):
  """The optimizer, not the loss, freezes the prototypes (as the reference's .grad = None):
  the loss gives them a gradient at every step, and the method names them for the optimizer
  (the trainer-level freeze is checked by the resume test below)."""
  config, method, _, records = queue_run[0], queue_run[1], queue_run[2], queue_run[-1]
  assert method.frozen_steps() == {('prototypes',): config.method.freeze_prototypes_steps}
  for step, r in enumerate(records):
    assert np.abs(r['grads']['prototypes']['kernel']).max() > 1e-5, step
    assert np.abs(r['grads']['projector']['Dense_0']['kernel']).max() > 1e-5


def test_after_update_normalises_only_the_prototypes():
  method, params, *_ = mh.init_method(_config())
  _unit_columns(params['prototypes']['kernel'])
  scaled = jax.tree.map(lambda p: 3.0 * p, params)
  scaled['prototypes']['kernel'] = scaled['prototypes']['kernel'] * jnp.arange(1.0, 11.0)
  projected = method.after_update(scaled)
  _unit_columns(projected['prototypes']['kernel'])
  np.testing.assert_allclose(projected['prototypes']['kernel'],
                             params['prototypes']['kernel'], rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(projected['projector']['Dense_0']['kernel'],
                                scaled['projector']['Dense_0']['kernel'])


@pytest.mark.slow  # three short runs: `pytest -m slow` (the default resumes MoCo v2)
def test_resume_gives_identical_state_and_frozen_prototypes_stay(tmp_path):
  """Queue from step 0 (full after 2 steps), prototypes frozen for 2 steps: a run stopped at
  step 2 and resumed ends as the straight run, queue included."""
  config = _config(queue_size=2 * BATCH, queue_start_epoch=0.0)
  config.augment.num_local_crops = 0  # resume does not depend on them; compiles faster
  first, resumed = mh.resumed_run_matches_straight_run(config, tmp_path)
  assert int(resumed.method_state['queue_filled']) == 2 * BATCH
  # The trainer's initial prototypes (train.py seeds create_train_state with the config's
  # seed; it initialises from the first half of the split key) survive the frozen steps: the
  # optimizer skips them (tests/test_optim.py checks the skip bit for bit); after_update's
  # renormalisation of unit columns moves them by an ulp.
  init_rng = jax.random.split(jax.random.PRNGKey(config.seed))[0]
  method = mh.init_method(config)[0]
  size = config.augment.crop_size
  initial = method.init(init_rng, jnp.zeros((2, size, size, 1)))[0]['prototypes']['kernel']
  np.testing.assert_allclose(first.params['prototypes']['kernel'], initial, rtol=0, atol=1e-6)
  # Then they train (LARS moves a weight by about lr x 0.001 of its norm per step, and the
  # lr is still warming up: small, but far above the frozen steps' rounding).
  trained = np.asarray(resumed.params['prototypes']['kernel'])
  assert np.abs(trained - np.asarray(initial)).max() > 1e-5
  _unit_columns(trained)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  c = mh.shrink(mh.load_config('swav'), batch_size=64)
  # The bank and queries of the calibration (SimCLR: 0.58 vs 0.564 random init).
  c.eval.final_bank_size = 2000
  c.eval.final_test_size = 500
  c.augment.num_local_crops = 2
  # The recipe's one-epoch warm-up and 234 frozen-prototype steps would cover all of a
  # 100-step run.
  c.optimizer.warmup_epochs = 0.01
  c.method.freeze_prototypes_steps = 10
  # LARS moves a weight by about lr x 0.001 of its norm per step (7.5e-5 at batch 64): in
  # 100 steps only the BN parameters train. AdamW at 1e-3 moves the convolutions.
  c.optimizer.name = 'adamw'
  c.optimizer.base_lr = 0.004
  # The tiny encoder's embeddings barely differ between images, and the run drifts towards
  # uniform codes (code_max -> 1/K, loss -> log K; measured, LARS, 400 steps). Sharper codes
  # (epsilon 0.05 -> 0.02) and fewer embedding dimensions than prototypes (32 < 100: no
  # direction is orthogonal to every prototype difference, where all scores are equal)
  # counter it. Measured at 100 steps, kNN vs random init 0.564: as is (LARS) 0.550,
  # AdamW 0.560, + epsilon 0.574, + both 0.586.
  c.method.epsilon = 0.02
  c.method.projector_output_dim = 32
  c.method.num_prototypes = 100  # as when calibrated; the ConvNet recipe now has 3000
  state, results = mh.train_briefly(c, str(tmp_path_factory.mktemp('swav')), 100)
  method = mh.init_method(c)[0]
  return state, results, mh.encoder_spread(c, method, state)


@pytest.mark.slow  # a real training run: `pytest -m slow` (README, Tests)
def test_short_run_learns_without_collapse(trained):
  state, results, spread = trained
  assert spread > 0.1, spread
  assert results['knn_top1'] > results['knn_top1_random_init'], results
  _unit_columns(state.params['prototypes']['kernel'])
