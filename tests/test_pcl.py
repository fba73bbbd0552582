"""PCL: phi by hand and against a float64 numpy transcription of the reference's
`run_kmeans`, ProtoNCE by hand, the negative prototypes' draw, the loss's parts and warm-up,
8 devices equal to one and to float64 across a k-means epoch boundary, exact resume through
a k-means, config errors and the recipes."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import method_harness as mh
from ssl_jax import config_lib, experiment, parallel
from ssl_jax.losses.moco import queue_info_nce
from ssl_jax.losses.proto_nce import concentration, proto_nce, sample_negatives
from ssl_jax.methods import RunLength, build_method

BATCH = 32


def _config(**method):
  c = mh.shrink(mh.load_config('pcl'), batch_size=BATCH)
  m = c.method
  m.queue_size = 64
  m.projector_hidden_dim = 16
  m.projector_output_dim = 8
  m.num_clusters = (40, 48)
  m.num_negative_prototypes = 6
  m.kmeans_iterations = 3
  m.update(method)
  return c


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ------------------------------------------------------------------------------------------
# phi (Sec. 3.3).
# ------------------------------------------------------------------------------------------

def reference_concentration(features, assignments, centroids, temperature):
  """main_pcl.py's `run_kmeans` density in float64 numpy, given the clusters and the
  centroids, the distance measured to the given (unit) centroids; rows with cluster -1
  left out."""
  x = np.asarray(features, np.float64)
  c = np.asarray(centroids, np.float64)
  k = len(c)
  dcluster = [[] for _ in range(k)]
  for row, i in enumerate(assignments):
    if i >= 0:
      dcluster[i].append(np.sum((x[row] - c[i]) ** 2))  # faiss' squared L2
  density = np.zeros(k)
  for i, dist in enumerate(dcluster):
    if len(dist) > 1:
      density[i] = (np.asarray(dist) ** 0.5).mean() / np.log(len(dist) + 10)
  dmax = density.max()
  for i, dist in enumerate(dcluster):
    if len(dist) <= 1:
      density[i] = dmax
  density = density.clip(np.percentile(density, 10), np.percentile(density, 90))
  return temperature * density / density.mean()


def _at_cosine(cos, axis):
  """The unit 2-d vector at cosine `cos` from e_axis."""
  s = np.sqrt(1 - cos ** 2)
  return [cos, s] if axis == 0 else [s, cos]


def test_concentration_by_hand():
  """Centroids e1, e2, e1, e2 (K = 4), distance ||v - c|| = sqrt(2 - 2 cos):
    cluster 0: cosines 1 and 0.5, distances 0 and 1: a = 0.5 / log(2 + 10)
    cluster 1: three at cosine 0.875, distance 0.5 each: b = 0.5 / log(3 + 10)
    cluster 2: one member, cluster 3: none: the largest, a
  a row with cluster -1 takes no part. Sorted [b, a, a, a]: the 10th percentile is
  b + 0.3 (a - b) (linear interpolation at position 0.3), the 90th a, so b is raised to
  b' = 0.7 b + 0.3 a; then phi = T x / mean(a, b', a, a), T = 0.2."""
  features = np.array([_at_cosine(1.0, 0), _at_cosine(0.5, 0), _at_cosine(0.875, 1),
                       _at_cosine(0.875, 1), _at_cosine(0.875, 1), _at_cosine(0.3, 0),
                       _at_cosine(-0.2, 1)], np.float32)
  assignments = np.array([0, 0, 1, 1, 1, 2, -1], np.int32)
  centroids = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], np.float32)
  a, b = 0.5 / np.log(12), 0.5 / np.log(13)
  raw = np.array([a, 0.7 * b + 0.3 * a, a, a])
  want = 0.2 * raw / raw.mean()
  got = concentration(jnp.asarray(features), jnp.asarray(assignments), jnp.asarray(centroids),
                      0.2, chunk_rows=3)  # three chunks, the last padded
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
  np.testing.assert_allclose(reference_concentration(features, assignments, centroids, 0.2),
                             want, rtol=1e-5)


def test_concentration_equals_the_reference_on_8_devices():
  """Random clusters of random sizes (some of 0 or 1 member) and rows without a cluster,
  the rows split over 8 devices: phi equals the float64 reference's, on every device."""
  rng = np.random.default_rng(0)
  n, k, d = 400, 30, 8
  centroids = _unit(rng.normal(size=(k, d))).astype(np.float32)
  sizes = rng.integers(0, 3, k) ** 3  # 0, 1 or 8 members in expectation
  assignments = rng.choice(k, n, p=(sizes + 0.5) / (sizes + 0.5).sum()).astype(np.int32)
  assignments[rng.random(n) < 0.1] = -1
  # Members near their centroid, at spreads that vary by cluster.
  spread = rng.uniform(0.1, 1.0, k)
  features = _unit(centroids[np.maximum(assignments, 0)]
                   + spread[np.maximum(assignments, 0), None] * rng.normal(size=(n, d)))
  features = features.astype(np.float32)
  want = reference_concentration(features, assignments, centroids, 0.2)
  counts = np.bincount(assignments[assignments >= 0], minlength=k)
  assert (counts <= 1).any() and (counts > 1).any()  # both rules apply
  axis = parallel.DATA_AXIS
  run = jax.jit(jax.shard_map(
      lambda f, a, c: concentration(f, a, c, 0.2, axis, chunk_rows=16)[None],
      mesh=parallel.make_mesh(8), in_specs=(P(axis), P(axis), P()), out_specs=P(axis)))
  per_device = np.asarray(run(features, assignments, centroids))
  assert per_device.shape == (8, k)
  for got in per_device:
    np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(concentration(features, assignments, centroids, 0.2)),
                             want, rtol=1e-5)
  assert want.std() > 0.01 * want.mean()  # not vacuous: the clusters' phi differ


# ------------------------------------------------------------------------------------------
# ProtoNCE (Sec. 3.2) and its negatives.
# ------------------------------------------------------------------------------------------

def test_proto_nce_by_hand():
  """Prototypes e1, e2, -e1, -e2 with phi 1, 0.5, 1, 1; negative: cluster 2 (-e1).
  Rows: A = e1 in cluster 0, B = e2 in cluster 1, C without a cluster, D = (0.6, 0.8) in
  cluster 0, E = (0.8, 0.6) in cluster 0, F = e2 without a cluster. Columns: c0, c1,
  (C's: masked), c0, c0, (F's: masked), c2; logits v.c / phi (masked columns left out):
    A: [1, 0, -, 1, 1, -, -1]              label 0: log(3e + 1 + e^-1) - 1
    B: [0, 2, -, 0, 0, -, 0]               label 1: log(e^2 + 4) - 2
    D: [0.6, 1.6, -, 0.6, 0.6, -, -0.6]    label 3: log(3 e^0.6 + e^1.6 + e^-0.6) - 0.6
    E: [0.8, 1.2, -, 0.8, 0.8, -, -0.8]    label 4: log(3 e^0.8 + e^1.2 + e^-0.8) - 0.8
  loss: their mean. Accuracy: the largest logit is a copy of the row's own prototype for A
  (tied copies: columns 0, 3, 4) and B, not for D and E (c1): 2/4."""
  e = np.e
  want = np.mean([np.log(3 * e + 1 + 1 / e) - 1, np.log(e ** 2 + 4) - 2,
                  np.log(3 * np.exp(0.6) + np.exp(1.6) + np.exp(-0.6)) - 0.6,
                  np.log(3 * np.exp(0.8) + np.exp(1.2) + np.exp(-0.8)) - 0.8])
  queries = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0]])
  prototypes = jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
  phi = jnp.array([1.0, 0.5, 1.0, 1.0])
  clusters = jnp.array([0, 1, -1, 0, 0, -1])
  loss, metrics = proto_nce(queries, clusters, jnp.array([2]), prototypes, phi)
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)
  np.testing.assert_allclose(float(metrics['proto_acc']), 2 / 4, rtol=1e-6)
  np.testing.assert_allclose(float(metrics['clustered_fraction']), 4 / 6)
  # The same split over 2 devices (A, B, C | D, E, F): each its rows, the same results.
  axis = parallel.DATA_AXIS
  run = jax.jit(jax.shard_map(
      lambda q: proto_nce(q, clusters, jnp.array([2]), prototypes, phi, axis),
      mesh=parallel.make_mesh(2), in_specs=P(axis), out_specs=P()))
  loss2, metrics2 = run(queries)
  np.testing.assert_allclose(float(loss2), want, rtol=1e-6)
  np.testing.assert_allclose(float(metrics2['proto_acc']), 2 / 4, rtol=1e-6)


def test_negatives_are_distinct_clusters_outside_the_positives():
  """Over many draws: r distinct ids in [0, K), none among the positives; every other
  cluster is drawn (the draw covers them all)."""
  k, r = 50, 20
  positives = jnp.array([3, 7, 7, 11, -1, 49, 0, 25] * 4)
  seen = set()
  for seed in range(30):
    negatives = np.asarray(sample_negatives(jax.random.PRNGKey(seed), positives, k, r))
    assert negatives.shape == (r,) and len(set(negatives.tolist())) == r
    assert ((negatives >= 0) & (negatives < k)).all()
    assert not set(negatives.tolist()) & {3, 7, 11, 49, 0, 25}
    seen |= set(negatives.tolist())
  assert seen == set(range(k)) - {3, 7, 11, 49, 0, 25}
  # All but the positives: exactly them.
  every = np.asarray(sample_negatives(jax.random.PRNGKey(0), positives, k, k - 6))
  assert set(every.tolist()) == set(range(k)) - {3, 7, 11, 49, 0, 25}


def test_negative_draw_is_the_same_on_every_device():
  """The method's draw inside shard_map on 8 devices, each holding 4 of the 32 rows: every
  device draws the same negatives, none of them a cluster of any row of the global batch
  (a device that drew outside its own rows' clusters only would differ)."""
  config = _config(num_clusters=(40,), num_negative_prototypes=8)
  method = build_method(config, RunLength(total_steps=10, steps_per_epoch=2, num_examples=64))
  rng = np.random.default_rng(0)
  state = {'assignments': jnp.asarray(rng.integers(0, 40, (1, 64)), jnp.int32)}
  index = jnp.asarray(rng.permutation(64)[:BATCH], jnp.int32)
  axis = parallel.DATA_AXIS
  run = jax.jit(jax.shard_map(
      lambda s, i: [x[None] for x in method.batch_clusters_and_negatives(
          s, i, jnp.int32(5), jnp.bool_(True), axis)[1]],
      mesh=parallel.make_mesh(8), in_specs=(P(), P(axis)), out_specs=P(axis)))
  (negatives,) = run(state, index)
  negatives = np.asarray(negatives)
  assert negatives.shape == (8, 8)
  assert (negatives == negatives[0]).all()
  positives = set(np.asarray(state['assignments'])[0, np.asarray(index)].tolist())
  assert not set(negatives[0].tolist()) & positives
  # One device's draw is the same.
  _, (one,) = method.batch_clusters_and_negatives(state, index, jnp.int32(5), jnp.bool_(True),
                                                  None)
  np.testing.assert_array_equal(np.asarray(one), negatives[0])


# ------------------------------------------------------------------------------------------
# The method's loss.
# ------------------------------------------------------------------------------------------

def _clustered_state(method, config, num_examples, seed=0):
  """An initial state whose memory bank is full and whose clusters, prototypes and phi are
  as a previous k-means left them."""
  rng = np.random.default_rng(seed)
  state = jax.device_get(jax.jit(lambda r: method.init(r, jnp.zeros((2, 12, 12, 1)))[2])(
      jax.random.PRNGKey(0)))
  d = config.method.projector_output_dim
  state['memory'] = _unit(rng.normal(size=(num_examples, d))).astype(np.float32)
  state['filled'] = np.ones(num_examples, bool)
  ks = config.method.num_clusters
  state['assignments'] = np.stack([rng.integers(0, k, num_examples) for k in ks]).astype(
      np.int32)
  state['prototypes'] = {f'k{g}': _unit(rng.normal(size=(k, d))).astype(np.float32)
                         for g, k in enumerate(ks)}
  state['concentration'] = {f'k{g}': rng.uniform(0.1, 0.3, k).astype(np.float32)
                            for g, k in enumerate(ks)}
  return state


RUN = RunLength(total_steps=100, steps_per_epoch=4, num_examples=80)


def _outputs(config, seed=0):
  rng = np.random.default_rng(seed + 10)
  d = config.method.projector_output_dim
  q = jnp.asarray(rng.normal(size=(BATCH, d)), jnp.float32)
  k = jnp.asarray(_unit(rng.normal(size=(BATCH, d))), jnp.float32)
  index = jnp.asarray(rng.permutation(RUN.num_examples)[:BATCH], jnp.int32)
  return {'q': [q]}, {'k': [k], 'index': index}


@pytest.mark.parametrize('step, proto_on', [(5, True), (2, False)])
def test_loss_is_info_nce_plus_the_granularities_mean_proto_nce(step, proto_on):
  """After the warm-up (step 5, epoch 1, no epoch start): InfoNCE on the queue plus the mean
  over the two granularities of ProtoNCE against the state's clusters, prototypes and phi;
  during it (step 2, epoch 0) InfoNCE alone, although the state holds clusters. The memory
  bank takes the keys at their indices, the queue the keys; the clusters stay."""
  config = _config()
  method = build_method(config, RUN)
  state = _clustered_state(method, config, RUN.num_examples)
  outputs, targets = _outputs(config)
  # Neither step starts an epoch: k-means (checked below, across a boundary) is left out of
  # the compiled step, which then compiles in a second rather than fifteen.
  with mock.patch.object(type(method), '_cluster', lambda self, s, epoch, axis_name: s):
    loss, (metrics, new) = jax.jit(method.objective, static_argnums=(7,))(
        {}, state, outputs, targets, {}, None, jnp.int32(step), None)
  q, k, index = outputs['q'][0], targets['k'][0], targets['index']
  want = float(queue_info_nce(q, k, state['queue'], config.method.temperature)[0])
  if proto_on:
    _, negatives = method.batch_clusters_and_negatives(state, index, jnp.int32(step),
                                                       jnp.bool_(True), None)
    terms = [proto_nce(q, state['assignments'][g][index], negatives[g],
                       state['prototypes'][f'k{g}'], state['concentration'][f'k{g}'])[0]
             for g in range(2)]
    assert abs(float(terms[0]) - float(terms[1])) > 1e-3  # two different terms
    want += float(sum(terms)) / 2
    np.testing.assert_allclose(float(metrics['clustered_fraction']), 1.0)
  else:
    assert float(metrics['proto_nce']) == 0.0
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_array_equal(new['memory'][np.asarray(index)], k)
  np.testing.assert_array_equal(new['queue'][:BATCH], k)
  for name in ('assignments', 'prototypes', 'concentration'):
    jax.tree.map(np.testing.assert_array_equal, new[name], state[name])


# ------------------------------------------------------------------------------------------
# Devices, float64, a k-means epoch boundary.
# ------------------------------------------------------------------------------------------

def _filled_state(config, method_state, seed=0):
  """A memory bank as after an epoch: random unit keys of 75 of the 80 examples (5 never
  seen), clusters, prototypes and phi as a previous k-means left them."""
  rng = np.random.default_rng(seed)
  d = config.method.projector_output_dim
  state = dict(method_state)
  filled = np.ones(RUN.num_examples, bool)
  filled[rng.choice(RUN.num_examples, 5, replace=False)] = False
  state['memory'] = (_unit(rng.normal(size=(RUN.num_examples, d)))
                     * filled[:, None]).astype(np.float32)
  state['filled'] = filled
  ks = config.method.num_clusters
  state['assignments'] = np.stack([np.where(filled, rng.integers(0, k, RUN.num_examples), -1)
                                   for k in ks]).astype(np.int32)
  state['prototypes'] = {f'k{g}': _unit(rng.normal(size=(k, d))).astype(np.float32)
                         for g, k in enumerate(ks)}
  state['concentration'] = {f'k{g}': rng.uniform(0.1, 0.3, k).astype(np.float32)
                            for g, k in enumerate(ks)}
  return state


def test_devices_agree_across_a_kmeans_boundary():
  """`mh.check_devices_agree`'s comparison (8 devices and 1 against float64: loss, gradients,
  metrics, BN statistics, method state) at step 4, the first epoch start after the warm-up:
  k-means of both granularities and phi inside the step, on the memory's rows split over
  the devices, then InfoNCE + ProtoNCE on the new clusters and the bank's writes. The
  batch's indices hold an example twice. (Step 5, without k-means, in the slow variant.)"""
  _check_devices_agree(steps=(4,))


@pytest.mark.slow  # three more compilations: `pytest -m slow`
def test_devices_agree_after_a_kmeans_boundary():
  _check_devices_agree(steps=(5,))


def _check_devices_agree(steps):
  config = _config()
  method, params, batch_stats, target, state = mh.init_method(config, RUN)
  state = _filled_state(config, jax.device_get(state))
  views = mh.make_views(config, method, BATCH)[:-1]  # the harness's index, replaced:
  index = np.random.default_rng(1).permutation(RUN.num_examples)[:BATCH].astype(np.int32)
  index[-1] = index[3]
  views = views + [jnp.asarray(index)]
  length = mh.reduction_length(views[:-1])
  for step in steps:
    ref = mh.float64_loss_and_grads(config, params, batch_stats, target, state, views, step,
                                    run_length=RUN)
    one = mh.sharded_loss_and_grads(method, params, batch_stats, target, state, views, 1, step)
    many = mh.sharded_loss_and_grads(method, params, batch_stats, target, state, views, 8,
                                     step)
    for name, other in (('1 device', one), ('8 devices', many)):
      for i, part in enumerate(('loss', 'grads', 'metrics', 'batch_stats', 'method_state')):
        mh.assert_close_to_float64(other[i], ref[i], length, f'{part}, {name}, step {step}')
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(ref[1])) > 0
    new, metrics = ref[4], ref[2]
    assert float(metrics['proto_nce']) > 0 and float(metrics['clustered_fraction']) > 0.8
    clustered = step == 4
    # Not vacuous: step 4 replaced every granularity's clusters, prototypes and phi.
    for g in range(2):
      for name in ('prototypes', 'concentration'):
        changed = not np.array_equal(new[name][f'k{g}'], state[name][f'k{g}'])
        assert changed == clustered, (name, g, step)
    assert (np.asarray(new['assignments'])[:, ~state['filled']] == -1).all()
  if 4 in steps:
    # At the boundary the clusters are k-means' (valid examples only), phi's mean is T.
    for g, k in enumerate(config.method.num_clusters):
      a = np.asarray(new['assignments'][g])
      assert ((a >= 0) == state['filled']).all() and a.max() < k
      np.testing.assert_allclose(np.mean(new['concentration'][f'k{g}']),
                                 config.method.temperature, rtol=1e-9)


# ------------------------------------------------------------------------------------------
# The trainer: resume, config errors, recipes.
# ------------------------------------------------------------------------------------------

def _two_step_epochs(config, num_train_examples):
  del config, num_train_examples
  return 2


@pytest.mark.slow  # three short runs, about 25 s: `pytest -m slow`
def test_resumed_run_ends_with_identical_state(tmp_path):
  """Epochs of 2 steps on Fashion-MNIST, 1 warm-up epoch: step 2 runs the first k-means. A
  run stopped at step 2 and resumed (the k-means then runs on the restored bank) ends as
  the straight run: bank, queue, clusters, prototypes and phi included."""
  config = _config()
  with mock.patch.object(experiment, 'steps_per_epoch', _two_step_epochs):
    first, resumed = mh.resumed_run_matches_straight_run(config, tmp_path)
  # Not vacuous: the first half only filled the bank (2 x 32 keys, no clusters yet); the
  # second clustered it (every example seen by then) and wrote 2 more batches.
  assert int(np.asarray(first.method_state['filled']).sum()) == 2 * BATCH
  assert (np.asarray(first.method_state['assignments']) == -1).all()
  assignments = np.asarray(resumed.method_state['assignments'])
  assert (assignments >= 0).sum(axis=1).tolist() == [2 * BATCH] * 2
  assert int(np.asarray(resumed.method_state['filled']).sum()) > 2 * BATCH


def test_config_errors_name_the_fix():
  config_lib.validate(mh.load_config('pcl'), 8)
  config_lib.validate(mh.load_config('pcl', 'backbone=resnet50'), 8)
  c = _config(num_clusters=(3000, 0), kmeans_iterations=0, proto_warmup_epochs=0)
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(c, 8)
  message = str(error.value)
  for expected in ('method.num_clusters=(3000, 0) must list a positive number of clusters',
                   'method.kmeans_iterations must be at least 1',
                   'method.proto_warmup_epochs=0 must be a whole number of epochs >= 1'):
    assert expected in message, message
  c = _config(num_clusters=(40, 100), num_negative_prototypes=9)
  with pytest.raises(config_lib.ConfigError,
                     match=r'num_negative_prototypes=9 must be between 1 and '
                           r'min\(method.num_clusters\) - batch_size = 40 - 32'):
    config_lib.validate(c, 8)
  # More clusters than examples: found when the memory bank is made.
  method = build_method(_config(num_clusters=(100,)),
                        RunLength(total_steps=4, steps_per_epoch=1, num_examples=64))
  with pytest.raises(config_lib.ConfigError, match='set each to at most 64'):
    method.init(jax.random.PRNGKey(0), jnp.zeros((2, 12, 12, 1)))
  with pytest.raises(config_lib.ConfigError, match='training set size'):
    build_method(_config()).init(jax.random.PRNGKey(0), jnp.zeros((2, 12, 12, 1)))


def test_recipes():
  paper = mh.load_config('pcl', 'backbone=resnet50')
  m = paper.method
  assert m.num_clusters == (25000, 50000, 100000) and m.num_negative_prototypes == 16000
  assert m.queue_size == 16384 and m.proto_warmup_epochs == 20 and m.kmeans_iterations == 20
  assert (m.temperature, m.target_momentum, m.projector_output_dim) == (0.2, 0.999, 128)
  assert paper.batch_size == 256 and paper.num_epochs == 200
  assert paper.optimizer.name == 'sgd' and paper.optimizer.base_lr == 0.03
  cpu = mh.load_config('pcl')
  assert cpu.method.num_clusters == (500, 750, 1000) and cpu.method.proto_warmup_epochs == 1
  assert cpu.method.num_negative_prototypes <= min(cpu.method.num_clusters) - cpu.batch_size
