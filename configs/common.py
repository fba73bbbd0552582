"""What the method configs share: their arguments, the backbone block with the Fashion-MNIST
CPU recipe, and BYOL's augmentation, which five other methods' papers reuse."""

from __future__ import annotations

import dataclasses

import ml_collections

from ssl_jax import config_lib, models

# Native image side per dataset, for ResNet runs (which train at full resolution).
# Anything else (other TFDS datasets, 'folder:<path>') trains at ImageNet's 224.
IMAGE_SIDE = {'fashion_mnist': 28, 'fashion_mnist_captions': 28, 'tfds:mnist': 28,
              'tfds:cifar10': 32, 'tfds:cifar100': 32, 'tfds:stl10': 96,
              'tfds:imagenet2012': 224, 'tfds:coco_captions': 224}
# The ConvNet CPU recipe's crop for datasets of larger images than Fashion-MNIST's.
CONVNET_LARGE_IMAGE_CROP = 64
CONVNET_EPOCHS = 16.0


def parse_arg(arg: str | None, **extra) -> ml_collections.ConfigDict:
  """The arguments every method config takes (after ':' on the command line): backbone
  (convnet | resnet18 | resnet34 | resnet50 | vit_micro | vit_tiny | vit_small | vit_base |
  vit_large), batch and epochs (0: the recipe's), dataset (fashion_mnist | tfds:<name> |
  folder:<path>) and crop (training crop side; 0: the recipe's); `extra` adds a config's
  own, with their defaults (or replaces one of these defaults)."""
  defaults = dict(backbone='convnet', batch=0, epochs=0.0, dataset='fashion_mnist', crop=0)
  return config_lib.parse_arg(arg, **{**defaults, **extra})


def method_config(arg, name: str) -> ml_collections.ConfigDict:
  """The base config for method `name` on the argument's dataset."""
  c = config_lib.base_config()
  c.data.name = arg.dataset
  if arg.dataset == 'tfds:stl10':
    # STL-10 is made for self-supervision: its 100k unlabelled images plus the 5k labelled
    # training images, as the papers train on it; the labelled splits evaluate.
    c.data.train_split = 'train+unlabelled'
  if arg.dataset in ('tfds:imagenet2012', 'tfds:imagenette'):
    c.data.eval_split = 'validation'  # ImageNet's test labels are withheld
  c.method.name = name
  return c


def set_backbone(c: ml_collections.ConfigDict, arg, *, paper_epochs: float,
                 resnet_batch: int, resnet_warmup_epochs: float = 10.0,
                 cpu_warmup_epochs: float = 1.0,
                 cpu_crop_scale: tuple[float, float] | None = (0.2, 1.0),
                 vit: ViTRecipe | None = None) -> None:
  """The backbone and the recipe fields that go with it, from the `backbone`, `dataset`,
  `crop`, `batch` and `epochs` arguments.

  'convnet' is the CPU recipe for Fashion-MNIST chosen in configs/simclr.py: a 16-32-64
  ConvNet with two convs per stage on 16-pixel crops, its features the last stage's
  averages over a 4 x 4 grid (1024 values: a global average of 64 channels loses where
  things are, which the linear probes need to beat raw pixels; README), evaluated on the
  whole images for datasets of at most 32 pixels (28 for Fashion-MNIST) and at 1.25 x the
  crop side (FixRes) on larger ones, 16 epochs, batch 256, `cpu_warmup_epochs` of warm-up,
  crop scale `cpu_crop_scale` (0.08 leaves blank patches of these centred objects; None keeps the
  config's, for multi-crop recipes) and the kNN monitor every 500 steps. At these crops
  Gaussian blur's kernel (10 % of the side, made odd) is one pixel, so blur does nothing:
  SimCLR likewise drops blur on 32-pixel CIFAR-10 (its App. B.9); set
  augment.blur_kernel_size (e.g. 3) to blur anyway.
  A ResNet trains at the dataset's native resolution (CIFAR-style stem up to 64 pixels) with
  the paper's `paper_epochs`, batch `resnet_batch` and `resnet_warmup_epochs`.
  A ViT ('vit_*') is set up by `_set_vit`, with the paper's ViT recipe `vit` if it has one.
  """
  c.model.name = arg.backbone
  if models.is_vit(arg.backbone):
    _set_vit(c, arg, vit or generic_vit_recipe(paper_epochs, resnet_batch),
             cpu_crop_scale=cpu_crop_scale)
  elif arg.backbone == 'convnet':
    c.model.widths = (16, 32, 64)
    c.model.convs_per_stage = 2
    c.model.pool_grid = 4
    side = IMAGE_SIDE.get(arg.dataset, 224)
    # Small images are scored whole, at their own side: on Fashion-MNIST the default run's
    # encoder scores higher on every probe than at 1.25 x the crop (README). The grid
    # readout gives features of the same size at any side.
    _cpu_recipe(c, arg, 16 if side <= 32 else CONVNET_LARGE_IMAGE_CROP, cpu_warmup_epochs,
                cpu_crop_scale, eval_size=side if side <= 32 else None)
  else:
    side = IMAGE_SIDE.get(arg.dataset, 224)
    c.model.width = 64
    c.model.small_images = side <= 64
    c.augment.crop_size = arg.crop or side
    c.num_epochs = arg.epochs or paper_epochs
    c.eval_every_steps = 5000
    c.batch_size = arg.batch or resnet_batch
    c.optimizer.warmup_epochs = resnet_warmup_epochs


def cpu_recipe(arg) -> bool:
  """Whether the arguments select a CPU recipe: the ConvNet on any dataset, or a ViT on
  28-pixel images (Fashion-MNIST, MNIST). Method configs narrow their heads (and shorten
  what spans the run) for these."""
  return arg.backbone == 'convnet' or (models.is_vit(arg.backbone) and
                                       IMAGE_SIDE.get(arg.dataset, 224) <= 28)


def cpu_recipe_epochs(arg) -> float:
  """The default length of the CPU recipe that the arguments select (`cpu_recipe`): 16
  epochs for the ConvNet, `CPU_VIT_EPOCHS` for a ViT. Configs scale what spans the run
  (warm-ups, freezes) with it, so that an `epochs` argument changes nothing else."""
  return CPU_VIT_EPOCHS if models.is_vit(arg.backbone) else CONVNET_EPOCHS


def _cpu_recipe(c: ml_collections.ConfigDict, arg, crop: int, warmup_epochs: float,
                crop_scale: tuple[float, float] | None,
                epochs: float = CONVNET_EPOCHS, eval_size: int | None = None) -> None:
  """The run fields of the Fashion-MNIST CPU recipe: `crop`-pixel crops (unless the argument
  gives one) evaluated at `eval_size` pixels (None: 1.25 x the crop side), `epochs` epochs of
  batch 256, `warmup_epochs` of warm-up, `crop_scale` (None keeps the config's) and the kNN
  monitor every 500 steps."""
  c.augment.crop_size = arg.crop or crop
  c.eval.image_size = eval_size or round(c.augment.crop_size * 1.25)
  c.num_epochs = arg.epochs or epochs
  c.eval_every_steps = 500
  c.batch_size = arg.batch or 256
  c.optimizer.warmup_epochs = warmup_epochs
  if crop_scale is not None:
    c.augment.crop_scale = crop_scale


@dataclasses.dataclass(frozen=True)
class ViTRecipe:
  """A paper's ViT training recipe at ImageNet scale: AdamW with lr `base_lr` x B/256 (peak,
  after `warmup_epochs` of linear warm-up, then cosine decay), decoupled weight decay
  `weight_decay` on the weights (not on biases and normalisation parameters), betas
  (0.9, `b2`), batch `batch`, `epochs` epochs."""
  base_lr: float
  weight_decay: float
  warmup_epochs: float
  batch: int
  epochs: float
  b2: float = 0.999


def generic_vit_recipe(epochs: float, batch: int) -> ViTRecipe:
  """For methods whose papers train no ViT: MoCo v3's optimizer (AdamW, lr 1.5e-4 x B/256,
  40 warm-up epochs; betas PyTorch's defaults) with weight decay 0.05, between MoCo v3's 0.1
  and DINO's 0.04, and the method's own epochs and batch. Not tuned."""
  return ViTRecipe(base_lr=1.5e-4, weight_decay=0.05, warmup_epochs=40.0, batch=batch,
                   epochs=epochs)


# The ViT CPU recipe for Fashion-MNIST (28-pixel images), whatever the method, on the ConvNet
# recipe's 16-pixel crops with 4-pixel patches (16 tokens): AdamW at lr 2e-3 x B/256,
# weight decay 0.05, 0.2 epochs of warm-up, patch tokens averaged, 4 epochs. Measured with
# SimCLR on vit_micro, 2 epochs, kNN with 10k/2k images at 20 pixels: averaged 0.748, the
# class token 0.740 (random init 0.556 and 0.668, raw pixels 0.752); lr 1e-3 with a 1-epoch
# warm-up 0.750. With the full evaluation (README), 2 epochs 0.7745, 4 epochs 0.7888 (random
# init 0.6186, raw pixels 0.7913); 4 epochs of vit_micro take about as long as the ConvNet's
# 16 (a ViT-Ti step costs some 15 times vit_micro's).
CPU_VIT_BASE_LR = 2e-3
CPU_VIT_WEIGHT_DECAY = 0.05
CPU_VIT_EPOCHS = 4.0
CPU_VIT_WARMUP_EPOCHS = 0.2
CPU_VIT_POOL = 'gap'


def vit_patch_size(crop: int) -> int:
  """The patch side for a ViT on `crop`-pixel crops: 16 from 96 pixels (ViT/16 at 224: a
  14 x 14 grid), 4 from 32 (CIFAR: 8 x 8), 2 between (28-pixel MNIST: 14 x 14, as at 224), and
  4 again up to 16 pixels: the CPU recipe's 16-pixel crops then give 16 tokens where patch 2
  would give 64, four times the MLP cost and 16 times the attention's, on a CPU."""
  if crop >= 96:
    return 16
  return 4 if crop >= 32 or crop <= 16 else 2


def _set_vit(c: ml_collections.ConfigDict, arg, recipe: ViTRecipe, *,
             cpu_crop_scale: tuple[float, float] | None) -> None:
  """A ViT's recipe fields: AdamW with linear scaling, and

  - on datasets of 28-pixel images (Fashion-MNIST, MNIST), the CPU recipe: the ConvNet's run
    fields (crops, evaluation size, batch, crop scale, kNN monitor; `_cpu_recipe`) with the
    `CPU_VIT_*` values above (epochs, lr, weight decay, warm-up, pooling), the same for
    every method (a paper's pooling applies off the CPU recipe);
  - elsewhere `recipe` at the dataset's native resolution (`arg.crop` overrides; ImageNet's
    224 for unknown datasets), with at most half the run as warm-up (for short runs).

  The patch side follows the crop (`vit_patch_size`); the evaluation size is rounded to
  whole patches, and multi-crop local crops default to a multiple of the patch near
  crop_size x 96 / 224.
  """
  c.optimizer.name = 'adamw'
  c.optimizer.lr_scaling = 'linear'
  c.optimizer.b1 = 0.9
  if IMAGE_SIDE.get(arg.dataset, 224) <= 28:
    _cpu_recipe(c, arg, 16, CPU_VIT_WARMUP_EPOCHS, cpu_crop_scale, epochs=CPU_VIT_EPOCHS)
    c.optimizer.base_lr = CPU_VIT_BASE_LR
    c.optimizer.weight_decay = CPU_VIT_WEIGHT_DECAY
    c.optimizer.b2 = 0.999
    c.model.vit_pool = CPU_VIT_POOL
  else:
    c.augment.crop_size = arg.crop or IMAGE_SIDE.get(arg.dataset, 224)
    c.num_epochs = arg.epochs or recipe.epochs
    c.eval_every_steps = 5000
    c.batch_size = arg.batch or recipe.batch
    c.optimizer.warmup_epochs = min(recipe.warmup_epochs, c.num_epochs / 2)
    c.optimizer.base_lr = recipe.base_lr
    c.optimizer.weight_decay = recipe.weight_decay
    c.optimizer.b2 = recipe.b2
  patch = vit_patch_size(c.augment.crop_size)
  c.model.patch_size = patch
  if c.eval.image_size % patch:
    # The CPU recipe's 1.25 x crop side, rounded to whole patches.
    c.eval.image_size = round(c.eval.image_size / patch) * patch
  if c.augment.num_local_crops and not c.augment.local_crop_size:
    c.augment.local_crop_size = max(
        patch, round(c.augment.crop_size * 96 / 224 / patch) * patch)


def byol_augmentation(a: ml_collections.ConfigDict) -> None:
  """BYOL's asymmetric augmentation (Grill et al. 2020, Table 6), which MoCo v3, Barlow
  Twins, VICReg, NNCLR and DINO adopt: colour jitter (0.4, 0.4, 0.2, 0.1) with p = 0.8,
  grayscale p = 0.2, blur always on view 1 and with p = 0.1 on view 2, solarisation on view 2
  only (p = 0.2)."""
  a.brightness, a.contrast, a.saturation, a.hue = 0.4, 0.4, 0.2, 0.1
  a.jitter_prob = 0.8
  a.grayscale_prob = 0.2
  a.blur_sigma = (0.1, 2.0)
  a.per_view.blur_prob = (1.0, 0.1)
  a.per_view.solarize_prob = (0.0, 0.2)
