"""Low-label fine-tuning: the whole encoder and a new linear classifier trained on 1% and 10%
of the training labels, the semi-supervised protocol of SimCLR v2 (Chen et al. 2020, "Big
Self-Supervised Models are Strong Semi-Supervised Learners", sec. 3 and the reference code's
fine-tuning command):

  * the labelled subsets are the low-label probe's (`lowlabel.label_subset`: seeded and
    class-balanced), so that fine-tuning and the frozen probe see the same labels;
  * LARS with momentum 0.9 (trust ratio on the weight matrices and kernels only,
    `optim.decay_mask`), no weight decay, no warm-up, a cosine decay from
    lr = 0.005 x sqrt(B) (0.16 at their B = 1024), for 60 epochs on 1% and 30 on 10%
    (`EPOCHS`); the new classifier starts at zero (`zero_init_logits_layer`) and, as the
    reference LARS excludes 'head_supervised' from the trust ratio, is stepped by plain
    momentum SGD at the same learning rate. `optimizer='sgd'` steps everything that way;
  * random crop and horizontal flip only, the crop's output at the evaluation resolution;
  * BatchNorm in training mode (batch statistics; the running averages it updates are what
    the test set is scored with);
  * `keep_projector_layer`: fine-tune "from the middle layer of the projection head", i.e.
    encoder -> the projector's first linear layer -> its norm -> ReLU -> classifier, all
    initialised from the pretrained network (the paper's default for 1% and 10% with its
    3-layer head; `ft_proj_selector=1`), for methods whose `params['projector']` is a
    `ProjectionMLP` (`Dense_0`, then `BatchNorm_0` or `LayerNorm_0`).

Data parallel as pre-training: with a mesh (`evaluate` passes its own), each device takes its
rows of the batch, the crops are keyed by the global row, BatchNorm statistics are taken over
the global batch and the loss is its mean, so a run gives the same result on any number of
devices (up to float rounding). Simplifications, for a CPU run on small data: a batch of
`min(batch_size, subset size)` (the paper's 1024 is more
than Fashion-MNIST's 600 labels at 1%), the learning rate scaled with it by the paper's
sqrt rule; the crop's scale range is the run's `augment.crop_scale` (SimCLR's (0.08, 1) in
the ImageNet recipe); the subset is read into memory once through the evaluation transform
(encoded images: short side resized and centre-cropped), and the random crops are taken from
those images rather than from the full-size files. Every method names its encoder
`params['encoder']`, so this works from any workdir (`pretrained.load`); the encoder is rebuilt
from `config.model` by `models.build_encoder`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import types
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jax.sharding import PartitionSpec as P

from ssl_jax import optim, parallel
from ssl_jax.data import augment
from ssl_jax.evaluation import features, lowlabel

# SimCLR v2's fine-tuning epochs per label fraction (sec. 3): 60 on 1%, 30 on 10%.
EPOCHS = {0.01: 60, 0.1: 30}
# lr = BASE_LR x sqrt(batch size): 0.16 at the paper's batch of 1024.
BASE_LR = 0.005
DEFAULT_BATCH_SIZE = 256
PROJECTOR_NORMS = {'BatchNorm_0': 'batch', 'LayerNorm_0': 'layer'}


class FineTuneNetwork(nn.Module):
  """encoder -> [projector's first layer: Dense -> norm -> ReLU] -> linear classifier.

  Submodule names: 'encoder' (as in every method's network), 'projector_dense' and
  'projector_norm' (with `projector_width`; copies of the projector's `Dense_0` and its
  norm), 'classifier' (zero-initialised, as SimCLR's `zero_init_logits_layer`)."""
  encoder: nn.Module
  num_classes: int
  projector_width: int = 0      # 0: classify the encoder's features
  projector_norm: str = 'batch'  # 'batch' or 'layer', as the projector's
  axis_name: Any = None         # the batch's mesh axes: BatchNorm over the global batch

  @nn.compact
  def __call__(self, x, train: bool = True):
    h = self.encoder(x, train=train)
    if self.projector_width:
      h = nn.Dense(self.projector_width, use_bias=False, name='projector_dense')(h)
      if self.projector_norm == 'layer':
        h = nn.LayerNorm(epsilon=1e-5, name='projector_norm')(h)
      else:
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         axis_name=self.axis_name if train else None,
                         name='projector_norm')(h)
      h = nn.relu(h)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                    name='classifier')(h.astype(jnp.float32))


@dataclasses.dataclass(frozen=True, eq=False)
class FineTuned:
  """A fine-tuned network and its variables ({'params', 'batch_stats'})."""
  network: FineTuneNetwork
  variables: Any
  steps: int
  batch_size: int
  losses: np.ndarray  # the training loss at every step

  def logits(self, images, batch_size: int = 1024, image_size: int | None = None):
    """Class scores [N, num_classes] of uint8 images [N, H, W, C] (inference BatchNorm),
    preprocessed as evaluation preprocesses them (`features.preprocess`)."""
    return features.extract_features(self.frozen(), np.asarray(images), batch_size,
                                     image_size)

  def frozen(self) -> features.FrozenEncoder:
    """The network in inference mode as a FrozenEncoder (class scores instead of features),
    for `eval_data.stream_features`."""
    network = self.network
    return features.FrozenEncoder(lambda v, x: network.apply(v, x, train=False),
                                  self.variables)


def projector_first_layer(params, batch_stats) -> tuple[int, str, dict, dict]:
  """(width, norm kind, params, batch_stats) of the projector's first layer, in
  `FineTuneNetwork`'s names; a ValueError naming the fix when the network has none."""
  projector = params.get('projector', {}) if hasattr(params, 'get') else {}
  norms = [name for name in PROJECTOR_NORMS if name in projector]
  if 'Dense_0' not in projector or not norms:
    raise ValueError(
        "keep_projector_layer fine-tunes from the projection head's first layer "
        "(params['projector'] with Dense_0 followed by BatchNorm_0 or LayerNorm_0, a "
        'ProjectionMLP of at least 2 layers), but this network has '
        f"{sorted(projector) if projector else 'no projector'} (networks: {sorted(params)}). "
        'Fine-tune from the encoder instead (keep_projector_layer=False).')
  norm = norms[0]
  layer_params = {'projector_dense': projector['Dense_0'], 'projector_norm': projector[norm]}
  layer_stats = {}
  if norm == 'BatchNorm_0':
    layer_stats['projector_norm'] = batch_stats['projector'][norm]
  return projector['Dense_0']['kernel'].shape[-1], PROJECTOR_NORMS[norm], layer_params, layer_stats


def initial_variables(network: FineTuneNetwork, params, batch_stats, sample, seed: int = 0,
                      keep_projector_layer: bool = False) -> dict:
  """The fine-tuning network's variables: the pretrained encoder (and projector layer)
  where the pretrained network has them, a zero classifier."""
  fresh = network.init(jax.random.PRNGKey(seed), sample, train=False)
  # A network without BatchNorm (a ViT) initialises no 'batch_stats' collection; the run
  # still carries one, empty, so that every network trains through the same step.
  fresh = {'params': fresh['params'], 'batch_stats': fresh.get('batch_stats', {})}
  new_params = dict(fresh['params'], encoder=params['encoder'])
  new_stats = dict(fresh['batch_stats'])
  if 'encoder' in batch_stats:
    new_stats['encoder'] = batch_stats['encoder']
  if keep_projector_layer:
    _, _, layer_params, layer_stats = projector_first_layer(params, batch_stats)
    new_params.update(layer_params)
    new_stats.update(layer_stats)
  variables = {'params': new_params, 'batch_stats': new_stats}
  expected = jax.tree.map(lambda x: (x.shape, x.dtype), fresh)
  got = jax.tree.map(lambda x: (jnp.shape(x), jnp.asarray(x).dtype), variables)
  if jax.tree.structure(expected) != jax.tree.structure(got) or expected != got:
    raise ValueError('The pretrained encoder does not fit the encoder that config.model '
                     'builds for these images (other channels, or another model?).')
  return jax.tree.map(jnp.asarray, variables)


def make_optimizer(learning_rate, name: str = 'lars') -> optax.GradientTransformation:
  """LARS (momentum 0.9, no weight decay; trust ratio on kernels and matrices) for the
  pretrained layers and momentum SGD for the classifier; or momentum SGD for all."""
  def config(opt_name):
    return ml_collections.ConfigDict(dict(name=opt_name, weight_decay=0.0, momentum=0.9,
                                          nesterov=False, trust_coefficient=1e-3))
  sgd = optim.make_optimizer(config('sgd'), learning_rate)
  if name == 'sgd':
    return sgd
  if name != 'lars':
    raise ValueError(f"Fine-tuning optimizer must be 'lars' or 'sgd', got {name!r}.")
  labels = lambda params: {k: jax.tree.map(lambda _, k=k: 'classifier' if k == 'classifier'
                                           else 'pretrained', v) for k, v in params.items()}
  return optax.multi_transform(
      {'pretrained': optim.make_optimizer(config('lars'), learning_rate), 'classifier': sgd},
      labels)


def cosine_learning_rate(step: int, num_steps: int, batch_size: int) -> float:
  """BASE_LR x sqrt(batch_size), decayed to 0 at `num_steps` by a cosine; no warm-up."""
  peak = BASE_LR * math.sqrt(batch_size)
  return float(optax.cosine_decay_schedule(peak, num_steps)(step))


@functools.lru_cache(maxsize=16)
def _training(network: FineTuneNetwork, optimizer: str, view_items: tuple, mesh):
  """(optimizer, jitted step) for a network, an optimizer name, crop settings and a mesh,
  built once: the learning rate enters the step as an argument (`optax.inject_hyperparams`),
  so that every subset size and schedule length, and every encoder of the same
  architecture, reuses one compiled step. The batch is split over the mesh's devices; the
  network's BatchNorm layers reduce over `network.axis_name`, the mesh's axes."""
  tx = optax.inject_hyperparams(make_optimizer, static_args=('name',))(
      learning_rate=0.0, name=optimizer)
  view = types.SimpleNamespace(**dict(view_items))
  axis = parallel.batch_axes(mesh)

  def device_loss(params, batch_stats, batch_images, batch_labels, key):
    rows = batch_labels.shape[0]
    views = augment.augment_views(key, batch_images, [view],
                                  parallel.global_row_offset(rows, axis))[0]
    logits, updates = network.apply({'params': params, 'batch_stats': batch_stats}, views,
                                    train=True, mutable=['batch_stats'])
    # The global batch's mean: this device's sum over all devices' rows.
    total = optax.softmax_cross_entropy_with_integer_labels(logits, batch_labels).sum()
    loss = jax.lax.psum(total, axis) / (rows * jax.lax.psum(1, axis))
    return loss, updates.get('batch_stats', batch_stats)

  def loss_fn(params, batch_stats, batch_images, batch_labels, key):
    return jax.shard_map(device_loss, mesh=mesh,
                         in_specs=(P(), P(), P(axis), P(axis), P()),
                         out_specs=(P(), P()))(params, batch_stats, batch_images,
                                               batch_labels, key)

  @functools.partial(jax.jit, in_shardings=(
      parallel.replicated(mesh), parallel.replicated(mesh), parallel.replicated(mesh),
      parallel.batch_sharded(mesh), parallel.batch_sharded(mesh), parallel.replicated(mesh),
      parallel.replicated(mesh)))
  def train_step(params, batch_stats, opt_state, batch_images, batch_labels, key,
                 learning_rate):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, batch_images, batch_labels, key)
    opt_state.hyperparams['learning_rate'] = learning_rate
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  return tx, train_step


def batch_indices(num_examples: int, batch_size: int, num_steps: int, seed: int) -> np.ndarray:
  """[num_steps, batch_size] example indices: consecutive batches of a stream of seeded
  permutations of the examples, one per epoch (a batch may straddle two epochs)."""
  rng = np.random.default_rng(seed)
  needed = num_steps * batch_size
  order = np.concatenate([rng.permutation(num_examples)
                          for _ in range(-(-needed // num_examples))])
  return order[:needed].reshape(num_steps, batch_size)


def crop_flip_config(config, image_size: int) -> types.SimpleNamespace:
  """`augment.simclr_view` settings with only the random crop (the run's scale and ratio
  range, output `image_size`) and the horizontal flip: every colour op is off."""
  a = config.augment
  return types.SimpleNamespace(
      crop_size=image_size, crop_scale=tuple(a.crop_scale), crop_ratio=tuple(a.crop_ratio),
      flip_prob=0.5, jitter_prob=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0,
      grayscale_prob=0.0, blur_prob=0.0, blur_sigma=(0.1, 2.0), solarize_prob=0.0)


def fine_tune(config, params, batch_stats, images, labels, *, num_classes: int,
              epochs: float, batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0,
              image_size: int | None = None, keep_projector_layer: bool = False,
              optimizer: str = 'lars', mesh=None) -> FineTuned:
  """Fine-tunes the pretrained network's encoder (`params['encoder']`, `batch_stats
  ['encoder']`) with a new classifier on uint8 `images` [N, H, W, C] and int `labels` [N],
  for `epochs` passes (rounded up to whole batches). The same arguments give the same
  result. `image_size`: the crops' (and the test images') size; None: the images' own.
  `mesh`: the devices that split each batch (None: one device); a batch that its devices
  do not divide runs on one device."""
  from ssl_jax.models import build_encoder  # pylint: disable=g-import-not-at-top
  images, labels = np.asarray(images), np.asarray(labels, np.int32)
  size = image_size or images.shape[1]
  batch_size = min(batch_size, len(images))
  num_steps = max(1, math.ceil(epochs * len(images) / batch_size))
  width, norm = 0, 'batch'
  if keep_projector_layer:
    width, norm, _, _ = projector_first_layer(params, batch_stats)
  if mesh is None or batch_size % mesh.devices.size:
    mesh = parallel.make_mesh(1)
  axis = parallel.batch_axes(mesh)
  network = FineTuneNetwork(build_encoder(config.model, axis), num_classes, width, norm, axis)
  sample = jnp.zeros((1, size, size, images.shape[-1]), jnp.float32)
  variables = initial_variables(network, params, batch_stats, sample, seed,
                                keep_projector_layer)
  tx, train_step = _training(network, optimizer,
                             tuple(sorted(vars(crop_flip_config(config, size)).items())), mesh)
  params, stats = variables['params'], variables['batch_stats']
  opt_state = tx.init(params)
  key = jax.random.PRNGKey(seed)
  losses = []
  for step, rows in enumerate(batch_indices(len(images), batch_size, num_steps, seed)):
    learning_rate = np.float32(cosine_learning_rate(step, num_steps, batch_size))
    params, stats, opt_state, loss = train_step(params, stats, opt_state, images[rows],
                                                labels[rows], jax.random.fold_in(key, step),
                                                learning_rate)
    losses.append(loss)
  return FineTuned(network, {'params': params, 'batch_stats': stats}, num_steps, batch_size,
                   np.asarray(jax.device_get(losses), np.float32))


def epochs_for(fraction: float) -> float:
  """SimCLR v2's epochs for a label fraction: 60 up to 1%, 30 above (their 10%)."""
  return EPOCHS[0.01] if fraction <= 0.01 else EPOCHS[0.1]


def eval_set_labels(eval_set) -> np.ndarray:
  """The labels of `eval_set`'s records, in order: from the source's label array when it has
  one (Fashion-MNIST, folders), else read through the pipeline."""
  source_labels = getattr(eval_set.source, 'labels', None)
  if source_labels is not None:
    return np.asarray(source_labels)[eval_set.records]
  return eval_set.arrays()[1]


def low_label_fine_tune(config, params, batch_stats, bank, queries, *, num_classes: int,
                        fractions=(0.01, 0.1), seed: int = 0,
                        batch_size: int = DEFAULT_BATCH_SIZE, image_size: int | None = None,
                        keep_projector_layer: bool = False, optimizer: str = 'lars',
                        eval_batch_size: int = 1024, mesh=None) -> dict:
  """For each fraction: `fine_tune` on the bank's `lowlabel.label_subset(bank labels,
  fraction, seed)` (the low-label probe's subset) for `epochs_for(fraction)` epochs, scored
  top-1 on every query. `bank` and `queries` are `eval_data.EvalSet`s; `mesh` as
  `fine_tune`'s.

  Returns {lowlabel.fraction_name(f): {'test_accuracy', 'num_labels', 'epochs', 'steps',
  'batch_size', 'final_loss', 'seconds'}}."""
  from ssl_jax.evaluation import eval_data  # pylint: disable=g-import-not-at-top
  bank_labels = eval_set_labels(bank)
  results = {}
  for fraction in fractions:
    start = time.perf_counter()
    subset = lowlabel.label_subset(bank_labels, fraction, seed)
    images, labels = dataclasses.replace(bank, records=bank.records[subset]).arrays()
    tuned = fine_tune(config, params, batch_stats, images, labels, num_classes=num_classes,
                      epochs=epochs_for(fraction), batch_size=batch_size, seed=seed,
                      image_size=image_size, keep_projector_layer=keep_projector_layer,
                      optimizer=optimizer, mesh=mesh)
    logits, test_labels = eval_data.stream_features(tuned.frozen(), queries, eval_batch_size,
                                                    image_size)
    results[lowlabel.fraction_name(fraction)] = {
        'test_accuracy': float(np.mean(np.argmax(logits, axis=-1) == test_labels)),
        'num_labels': int(len(labels)), 'epochs': epochs_for(fraction),
        'steps': tuned.steps, 'batch_size': tuned.batch_size,
        'final_loss': float(tuned.losses[-1]), 'seconds': time.perf_counter() - start}
  return results
