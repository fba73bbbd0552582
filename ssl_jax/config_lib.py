"""Shared pieces of the experiment configs in `configs/`: the argument-string parser, the
fields every experiment has, and validation that names the fix for each problem."""

from __future__ import annotations

import json
import os

import ml_collections
from ml_collections import config_dict


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'key=value,key=value' (the part after ':' in --config=file.py:ARG).

  Values are converted to the type of the default; an unknown key is an error listing the
  known ones, so a typo never silently falls back to a default.
  """
  result = ml_collections.ConfigDict(defaults)
  if not arg:
    return result
  for item in arg.split(','):
    if '=' not in item:
      raise ConfigError(f'Config argument {item!r} is not key=value; known keys: '
                        f'{sorted(defaults)}.')
    key, value = (s.strip() for s in item.split('=', 1))
    if key not in defaults:
      raise ConfigError(f'Unknown config argument {key!r}; known: {sorted(defaults)}.')
    default = defaults[key]
    if isinstance(default, bool):
      if value.lower() not in ('true', 'false', '1', '0'):
        raise ConfigError(f'Config argument {key} must be true or false, got {value!r}.')
      result[key] = value.lower() in ('true', '1')
    else:
      result[key] = type(default)(value)
  return result


def base_config() -> ml_collections.ConfigDict:
  """Fields every experiment has. Method configs fill `method` and adjust the rest."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 256                  # global batch, over all devices and hosts
  # > 1: the exact gradient of the whole batch's loss with the activations of one of this many
  # micro-batches in memory at a time (ssl_jax/microbatch.py; README, "Large batches").
  c.microbatches = 1
  c.num_epochs = 1.0
  c.total_steps = 0                   # > 0 overrides num_epochs
  c.log_every_steps = 50
  c.eval_every_steps = 0              # periodic kNN monitor; 0 = only at the end
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3

  c.method = ml_collections.ConfigDict()
  c.method.name = 'simclr'

  c.model = ml_collections.ConfigDict()
  c.model.name = 'resnet18'
  c.model.width = 64                  # ResNet first-stage channels
  c.model.small_images = True         # CIFAR-style stem for inputs <= 32 pixels
  c.model.widths = (32, 64, 128)      # ConvNet stage channels
  c.model.convs_per_stage = 2
  c.model.pool_grid = 1               # ConvNet features: averages over a grid x grid partition
  c.model.dtype = 'float32'           # 'bfloat16' computes in bf16, parameters stay float32
  # Vision Transformers (vit_micro, vit_tiny, vit_small, vit_base, vit_large).
  c.model.patch_size = 16             # augment.crop_size must be a multiple
  c.model.vit_pool = 'cls'            # 'cls' (class token) or 'gap' (mean of patch tokens)
  c.model.vit_pos_embed = 'learned'   # 'learned' or 'sincos' (MoCo v3's fixed 2-D sin-cos)
  # Stochastic depth in the online network's ViT blocks (targets and teachers never drop).
  c.model.drop_path_rate = 0.0
  c.model.layer_scale_init = 0.0      # LayerScale's initial gain; 0 = no LayerScale
  c.model.vit_frozen_patch_embed = False  # MoCo v3's random, frozen patch projection
  # Rematerialisation: each residual block's activations are recomputed in the backward pass
  # instead of stored (jax.checkpoint), trading compute for memory. remat_policy names what is
  # still saved ('' = the default chosen by measurement, models/remat.py).
  c.model.remat = False
  c.model.remat_policy = ''
  # The projector and predictor MLPs' normalisation: 'batch' (BatchNorm, as the papers) or
  # 'layer' (LayerNorm, no batch statistics: with a ViT, microbatches > 1 is then exact).
  c.model.head_norm = 'batch'

  # The device mesh: ('data', 'fsdp'). The batch is split over all devices; parameters,
  # optimizer state and target networks are split over the fsdp axis (1 = replicated, plain
  # data parallelism). fsdp must divide the number of devices.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.fsdp = 1

  c.data = ml_collections.ConfigDict()
  # 'fashion_mnist', 'tfds:<name>' (e.g. 'tfds:cifar10', 'tfds:imagenet2012') or
  # 'folder:<path>' (class sub-folders give labels; a flat folder is unlabelled).
  c.data.name = 'fashion_mnist'
  c.data.data_dir = config_dict.placeholder(str)
  c.data.download = False
  c.data.train_split = 'train'        # labels optional (e.g. stl10's 'unlabelled')
  # The labelled images of the kNN monitor and the final evaluation: '' = data.name. With no
  # labels there, label-based evaluation is off (said in the log); named here explicitly, a
  # source without labels is an error.
  c.data.eval_name = ''
  c.data.eval_train_split = 'train'   # kNN memory bank (labels used only for evaluation)
  c.data.eval_split = 'test'          # queries; a folder without test/ uses val/
  # Input worker processes: -1 = as many as the host has cores (up to 16) for encoded
  # images, which are decoded and cropped on the host, and none for in-memory arrays.
  c.data.worker_count = -1
  # An image that cannot be decoded is replaced by the next one with a warning naming it
  # (and counted); False makes it an error.
  c.data.skip_corrupt = True

  c.augment = ml_collections.ConfigDict()
  c.augment.crop_size = 28
  c.augment.crop_scale = (0.08, 1.0)
  c.augment.crop_ratio = (3 / 4, 4 / 3)
  c.augment.flip_prob = 0.5
  c.augment.jitter_prob = 0.8
  c.augment.brightness = 0.8
  c.augment.contrast = 0.8
  c.augment.saturation = 0.8
  c.augment.hue = 0.2
  c.augment.grayscale_prob = 0.2
  c.augment.blur_prob = 0.5
  c.augment.blur_sigma = (0.1, 2.0)
  c.augment.blur_kernel_size = 0      # 0 = 10 % of the crop side, made odd (SimCLR)
  c.augment.solarize_prob = 0.0
  # Per-view overrides for the global views, e.g. per_view.blur_prob = (1.0, 0.1) (BYOL).
  c.augment.per_view = ml_collections.ConfigDict()
  # Multi-crop (SwAV, DINO): extra low-resolution views of small regions.
  c.augment.num_local_crops = 0
  c.augment.local_crop_size = 0       # 0 = crop_size * 96 / 224, the papers' ratio
  c.augment.local_crop_scale = (0.05, 0.4)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'lars'           # 'lars', 'sgd' or 'adamw'
  c.optimizer.base_lr = 0.3
  c.optimizer.lr_scaling = 'linear'   # 'linear' (x B/256), 'sqrt' (x sqrt(B)) or 'none'
  c.optimizer.warmup_epochs = 10.0
  c.optimizer.weight_decay = 1e-6
  # Set: the weight decay rises (or falls) by a cosine from weight_decay to this value at the
  # last step (DINO, iBOT: 0.04 -> 0.4); unset: constant.
  c.optimizer.weight_decay_end = config_dict.placeholder(float)
  # Set: gradients clipped to this norm before the optimizer, their global norm or, with
  # clip_per_parameter, each parameter's (DINO's and iBOT's rule); unset: no clipping.
  c.optimizer.clip_grad_norm = config_dict.placeholder(float)
  c.optimizer.clip_per_parameter = False
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.trust_coefficient = 0.001
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999

  c.eval = ml_collections.ConfigDict()
  c.eval.knn_k = 200
  c.eval.knn_temperature = 0.07
  c.eval.batch_size = 1024
  # Evaluation resolution. Images stored at one size (Fashion-MNIST, CIFAR) are resized to
  # this side (0: as stored). Encoded, variable-size images get the short side resized to
  # resize_size (0: image_size x 256/224) and the central square of image_size (0: the
  # training crop): torchvision's Resize(256) + CenterCrop(224) at ImageNet.
  c.eval.image_size = 0
  c.eval.resize_size = 0
  c.eval.periodic_bank_size = 10000   # the periodic kNN monitor: examples spread over the split
  c.eval.periodic_test_size = 2000
  c.eval.final_bank_size = 0          # 0 = the whole split, for the final evaluation
  c.eval.final_test_size = 0
  c.eval.baselines = True             # also score raw pixels and the random-init encoder
  # The random-init encoder is scored with its BatchNorm statistics replaced by the exact
  # mean/variance of each layer's input (training mode) over this many batches of
  # eval.batch_size training images, preprocessed as for evaluation; its initial statistics
  # (0, 1) make its score swing with the seed. 0 keeps them. The trained encoder keeps its own.
  c.eval.bn_refresh_batches = 20
  # A linear classifier trained during pre-training on the frozen features of the first view
  # (labels reach only the classifier); costs one inference forward pass per step.
  c.eval.online_probe = False
  c.eval.online_probe_lr = 1e-2
  # Representation diagnostics (alignment, uniformity, spectrum, effective rank, spread) on
  # this many test images, at every periodic evaluation and at the end; plots in the workdir.
  c.eval.diagnostics = True
  c.eval.diagnostics_size = 1000
  # Collapse alarm: a warning and the metric collapse_alarm=1 when the effective rank or the
  # spread (normalised std x sqrt(D)) of the frozen features falls below these fractions.
  # Healthy small encoders here sit at 0.3-0.6 and 0.2-0.5 (post-ReLU features all point into
  # one orthant, so their spread is below that of a sphere); a collapsed one at 1/D and 0.
  c.eval.collapse_min_rank_fraction = 0.05
  c.eval.collapse_min_std_fraction = 0.05
  c.eval.plots = True
  return c


def _tuples(value):
  """JSON turns tuples into lists; configs (and hashable module fields) use tuples."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def save_json(config: ml_collections.ConfigDict, path: str) -> None:
  """Writes the config where `load_json` (evaluation, `ssl_jax.pretrained`) finds it."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(config.to_json(indent=2, sort_keys=True))
  os.replace(tmp, path)  # atomic: a reader never sees half a file


def load_json(path: str) -> ml_collections.ConfigDict:
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'{path} does not exist: this is not a workdir written by ssl_jax training (it saves '
        'its config there at start). Pass the --workdir given to ssl-jax-train.')
  with open(path) as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))


def flatten(config, prefix: str = '') -> dict:
  """{'optimizer.base_lr': 0.3, ...}: the form hyper-parameter tables want."""
  flat = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value if isinstance(value, (int, float, str, bool)) else str(value)
  return flat


class ConfigError(ValueError):
  """A config that cannot run; the message lists every problem and its fix."""


class DataError(ConfigError):
  """Data that cannot be used as given (missing, empty, undecodable); the message names the
  fix. The command line prints it alone, as a config error."""


def _per_view_problems(augment_config, num_global_views: int) -> list[str]:
  """augment.per_view: known fields, one value per global view, probabilities in [0, 1]."""
  from ssl_jax.data import augment  # imports jax, as the registries do
  problems = []
  for field, values in (augment_config.get('per_view') or {}).items():
    if field not in augment.PER_VIEW_FIELDS:
      problems.append(f'augment.per_view.{field} is not a per-view field; known: '
                      f'{", ".join(augment.PER_VIEW_FIELDS)}.')
      continue
    if not isinstance(values, (tuple, list)) or len(values) != num_global_views:
      problems.append(f'augment.per_view.{field} needs one value per global view '
                      f'({num_global_views} for this method), got {values!r}.')
      continue
    if field.endswith('_prob') and not all(0 <= v <= 1 for v in values):
      problems.append(f'augment.per_view.{field} must hold probabilities in [0, 1], '
                      f'got {tuple(values)}.')
  return problems


# Fields that had another name in one method's config than the same concept in the others':
# a config written with the old name fails with the new one named.
RENAMED_METHOD_FIELDS = {
    'target_momentum_base': 'target_momentum',   # BYOL
    'teacher_momentum_base': 'target_momentum',  # DINO
    'base_momentum': 'target_momentum',          # MoCo v3
    'momentum': 'target_momentum',               # MoCo v2
    'queue_length': 'queue_size',                # SwAV
    'bank_size': 'queue_size',                   # AdCo
    'mlp_hidden_dim': 'projector_hidden_dim (and predictor_hidden_dim)',  # MoCo v3
    'output_dim': 'projector_output_dim (MoCo v3) or num_prototypes (DINO)',
    'head_hidden_dim': 'projector_hidden_dim',   # DINO
    'bottleneck_dim': 'projector_output_dim',    # DINO
    'head_num_layers': 'projector_num_layers',   # DINO
}


def validate(config: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1):
  """Checks everything that can be checked before any work starts."""
  # Imported here: the registries import jax/flax, which config files should not need.
  from ssl_jax import methods, models, optim
  from ssl_jax.data import sources
  from ssl_jax.models import heads, remat, vit

  problems = []

  def check(ok, message):
    if not ok:
      problems.append(message)

  b = config.batch_size
  check(b > 0, f'batch_size must be positive, got {b}.')
  check(b <= 0 or b % num_devices == 0,
        f'batch_size={b} is not divisible by the {num_devices} devices: set --config.batch_size '
        f'to a multiple of {num_devices} (e.g. {max(num_devices, b // num_devices * num_devices)}).')
  check(b <= 0 or b % num_processes == 0,
        f'batch_size={b} is not divisible by the {num_processes} processes (hosts).')
  check(config.num_epochs > 0 or config.total_steps > 0,
        'Set num_epochs > 0 or total_steps > 0.')
  fsdp = config.get('mesh', {}).get('fsdp', 1)
  check(fsdp >= 1 and num_devices % fsdp == 0,
        f'mesh.fsdp={fsdp} must be a positive divisor of the {num_devices} devices (the '
        'parameters are split over fsdp of them, the batch over all).')
  check(config.log_every_steps > 0, 'log_every_steps must be positive.')
  check(config.checkpoint_every_steps > 0, 'checkpoint_every_steps must be positive.')
  check(config.keep_checkpoints >= 1, 'keep_checkpoints must be at least 1.')
  check(config.eval_every_steps >= 0, 'eval_every_steps must be >= 0 (0 disables it).')
  check(config.method.name in methods.METHODS,
        f'method.name={config.method.name!r} is unknown; known: {sorted(methods.METHODS)}.')
  if 'temperature' in config.method:
    check(config.method.temperature > 0, 'method.temperature must be positive.')
  check(config.model.name in models.ENCODERS,
        f'model.name={config.model.name!r} is unknown; known: {sorted(models.ENCODERS)}.')
  check(config.model.dtype in models.DTYPES,
        f'model.dtype={config.model.dtype!r} is unknown; known: {sorted(models.DTYPES)}.')
  m = config.model
  # .get: configs saved before the ViT fields existed have none of them.
  patch = m.get('patch_size', 16)
  check(patch > 0, f'model.patch_size must be positive, got {patch}.')
  check(m.get('vit_pool', 'cls') in vit.POOLS,
        f'model.vit_pool={m.get("vit_pool")!r} is unknown; known: {vit.POOLS}.')
  check(m.get('vit_pos_embed', 'learned') in vit.POS_EMBEDS,
        f'model.vit_pos_embed={m.get("vit_pos_embed")!r} is unknown; known: {vit.POS_EMBEDS}.')
  problems.extend(remat.validate(m))
  check(m.get('pool_grid', 1) >= 1,
        f'model.pool_grid must be >= 1 (1: the global average), got {m.get("pool_grid")}.')
  check(m.get('head_norm', 'batch') in heads.NORMS,
        f'model.head_norm={m.get("head_norm")!r} is unknown; known: {heads.NORMS}.')
  k = config.get('microbatches', 1)
  check(k >= 1, f'microbatches must be >= 1 (1: the whole batch at once), got {k}.')
  check(k < 1 or b <= 0 or b % num_devices or (b // num_devices) % k == 0,
        f'microbatches={k} must divide the {b // max(num_devices, 1)} rows that each of the '
        f'{num_devices} devices holds (batch_size / devices): set batch_size to a multiple of '
        f'{num_devices * k}, or microbatches to a divisor of {b // max(num_devices, 1)}.')
  check(0 <= m.get('drop_path_rate', 0.0) < 1,
        f'model.drop_path_rate must be in [0, 1), got {m.get("drop_path_rate")}.')
  if models.is_vit(m.name) and patch > 0:
    sizes = [('augment.crop_size', config.augment.crop_size)]
    if config.augment.num_local_crops:
      sizes.append(('the local crop side (augment.local_crop_size)',
                    config.augment.local_crop_size or
                    round(config.augment.crop_size * 96 / 224)))
    if config.eval.image_size:
      sizes.append(('eval.image_size', config.eval.image_size))
    for name, size in sizes:
      check(size % patch == 0,
            f'{name}={size} is not a multiple of model.patch_size={patch}: the ViT would drop '
            f'the last {size % patch} pixels. Set it to a multiple of {patch} (e.g. '
            f'{max(patch, size // patch * patch)}) or change model.patch_size.')
  check(config.optimizer.name in optim.OPTIMIZERS,
        f'optimizer.name={config.optimizer.name!r} is unknown; known: {list(optim.OPTIMIZERS)}.')
  check(config.optimizer.lr_scaling in ('linear', 'sqrt', 'none'),
        "optimizer.lr_scaling must be 'linear', 'sqrt' or 'none'.")
  check(config.optimizer.base_lr > 0, 'optimizer.base_lr must be positive.')
  check(config.optimizer.warmup_epochs >= 0, 'optimizer.warmup_epochs must be >= 0.')
  wd_end = config.optimizer.get('weight_decay_end')
  check(wd_end is None or wd_end >= 0,
        'optimizer.weight_decay_end must be >= 0 (or unset for a constant weight decay).')
  clip = config.optimizer.get('clip_grad_norm')
  check(clip is None or clip > 0,
        'optimizer.clip_grad_norm must be > 0 (or unset for no gradient clipping).')
  for field in ('name', 'eval_name'):
    name = config.data.get(field, '')
    check((field == 'eval_name' and not name) or sources.is_known_name(name),
          f'data.{field}={name!r} is unknown; use one of {sorted(sources.KNOWN_SOURCES)}, '
          "'tfds:<dataset name>' or 'folder:<path>'.")
  check(config.data.get('worker_count', 0) >= -1,
        'data.worker_count must be >= 0, or -1 for the default.')
  a = config.augment
  check(a.crop_size > 0, 'augment.crop_size must be positive.')
  check(a.blur_kernel_size == 0 or a.blur_kernel_size % 2 == 1,
        f'augment.blur_kernel_size must be odd, or 0 for 10 % of the crop side; got '
        f'{a.blur_kernel_size}.')
  check(0 < a.crop_scale[0] <= a.crop_scale[1] <= 1,
        f'augment.crop_scale must satisfy 0 < min <= max <= 1, got {a.crop_scale}.')
  check(0 < a.crop_ratio[0] <= a.crop_ratio[1], 'augment.crop_ratio must be 0 < min <= max.')
  for name in ('flip_prob', 'jitter_prob', 'grayscale_prob', 'blur_prob', 'solarize_prob'):
    check(0 <= a[name] <= 1, f'augment.{name} must be a probability in [0, 1], got {a[name]}.')
  check(a.num_local_crops >= 0, 'augment.num_local_crops must be >= 0.')
  check(0 < a.local_crop_scale[0] <= a.local_crop_scale[1] <= 1,
        f'augment.local_crop_scale must satisfy 0 < min <= max <= 1, got {a.local_crop_scale}.')
  for old, new in RENAMED_METHOD_FIELDS.items():
    check(old not in config.method, f'method.{old} is now called method.{new}: rename it.')
  if config.method.name in methods.METHODS:
    method_cls = methods.method_class(config.method.name)
    problems.extend(method_cls.config_problems(config))
    problems.extend(_per_view_problems(a, method_cls.num_views))
  e = config.eval
  check(e.knn_k > 0, 'eval.knn_k must be positive.')
  check(e.knn_temperature > 0, 'eval.knn_temperature must be positive.')
  check(e.batch_size > 0 and e.batch_size % num_devices == 0,
        f'eval.batch_size={e.batch_size} must be a positive multiple of the {num_devices} '
        'devices, over which evaluation batches are sharded.')
  check(e.get('resize_size', 0) >= 0 and e.image_size >= 0,
        'eval.image_size and eval.resize_size must be >= 0 (0: the default).')
  check(e.get('bn_refresh_batches', 0) >= 0,
        'eval.bn_refresh_batches must be >= 0 (0 scores the random-init baseline with its '
        'initial BatchNorm statistics).')
  check(e.diagnostics_size > 1, 'eval.diagnostics_size must be at least 2 images.')
  for name in ('collapse_min_rank_fraction', 'collapse_min_std_fraction'):
    check(0 <= e[name] < 1, f'eval.{name} must be in [0, 1) (0 disables that alarm).')
  if problems:
    raise ConfigError('Invalid config:\n  - ' + '\n  - '.join(problems))
