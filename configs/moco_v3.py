"""MoCo v3 (Chen, Xie & He 2021, "An Empirical Study of Training Self-Supervised Vision
Transformers"; reference code github.com/facebookresearch/moco-v3).

  ssl-jax-train --config=configs/moco_v3.py --workdir=workdirs/moco_v3
  ssl-jax-train --config=configs/moco_v3.py:backbone=resnet50,dataset=tfds:imagenet2012,batch=4096 ...
  ssl-jax-train --config=configs/moco_v3.py:backbone=vit_small,dataset=tfds:imagenet2012 ...

Arguments: backbone (convnet | resnet18 | resnet34 | resnet50 | vit_micro | vit_tiny |
vit_small | vit_base | vit_large), batch (0: the recipe's), epochs, dataset (fashion_mnist |
tfds:<name> | folder:<path>), crop (training crop side; 0 picks one for the dataset).

With a ResNet backbone the paper's ResNet-50 recipe applies: batch 4096, LARS with
lr 0.3 x B/256, weight decay 1.5e-6, 10 warm-up epochs then cosine decay, 300 epochs;
temperature 1.0; momentum m from 0.99 to 1 on a cosine schedule; projector 3-layer MLP
(4096 hidden, 256 out) and predictor 2-layer MLP (4096 hidden), BN on every layer; BYOL's
asymmetric augmentation (blur p = 1.0 / 0.1, solarisation p = 0 / 0.2, colour jitter
(0.4, 0.4, 0.2, 0.1)) with crops of scale (0.2, 1) as in the reference code. The reference
code's ResNet variant differs slightly: a 2-layer projector and no BN after the predictor's
last layer (method.projector_num_layers=2, method.predictor_last_bn=False), and its
100-epoch run uses lr 0.6, weight decay 1e-6.

With a ViT backbone the paper's ViT recipe (Sec. 4 and 5, App. A; the reference's CONFIG.md
commands for ViT-Small and ViT-Base, which are identical): ViT/16 at 224 pixels with the
class token as the representation, MoCo v3's random patch projection frozen for the whole run
(`--stop-grad-conv1`: no gradient, no weight decay, no optimizer state; the paper's Sec. 4.1
stability fix) and its fixed 2-D sin-cos position embedding; AdamW with lr 1.5e-4 x B/256,
weight decay 0.1, betas (0.9, 0.999) (PyTorch's defaults: the reference passes none), 40
warm-up epochs then cosine decay, batch 4096, 300 epochs; temperature 0.2; momentum 0.99 -> 1
(cosine); the heads as for the ResNet, BN on every layer including the predictor's last (the
reference's ViT variant agrees); BYOL's augmentation with crops of scale (0.08, 1) (the
reference's default crop-min, which its ViT commands keep; its ResNet commands pass 0.2).
vit_base and vit_large take the same values (the reference's ViT-B command is ViT-S's; the
paper's ViT-L values were not checked here). Departures: the reference's ViT-S has 12
attention heads (head dimension 32) where this registry has DeiT's 6, at the same parameter
count; its initialisation is Xavier-uniform (qkv split in three, the patch projection
included) where ours is timm's truncated normal and LeCun normal (models/vit.py); its AdamW
decays every parameter, biases and LayerNorm included, ours only the weights
(optim.decay_mask); it trains in float16 autocast (here: --config.model.dtype=bfloat16).

The default is the CPU recipe for Fashion-MNIST, modelled on configs/simclr.py's (a small
ConvNet on 16-pixel crops, evaluated at 28 pixels, LARS with linear scaling, 16 epochs),
with heads narrowed to 512 hidden / 128 out and the temperature lowered to 0.2 (the ViT
recipe's value; SimCLR measured best at 0.1 on this data, README); on the ConvNet, the
reference's 100-epoch lr 0.6 and weight decay 1e-6.
A ViT on Fashion-MNIST gets the same heads and temperature with common.py's ViT CPU recipe,
and keeps the frozen patch projection and sin-cos position embedding.
"""

from ssl_jax import models
from ssl_jax.configs import common

# Sec. 4 and App. A; CONFIG.md's ViT-Small and ViT-Base commands (-b 4096 by default).
VIT_RECIPE = common.ViTRecipe(base_lr=1.5e-4, weight_decay=0.1, warmup_epochs=40.0,
                              batch=4096, epochs=300.0)


def get_config(arg=None):
  arg = common.parse_arg(arg)
  c = common.method_config(arg, 'moco_v3')
  c.method.temperature = 1.0
  c.method.target_momentum = 0.99
  c.method.projector_hidden_dim = 4096
  c.method.projector_output_dim = 256
  c.method.projector_num_layers = 3
  c.method.projector_last_bn = True
  c.method.predictor_hidden_dim = 4096
  c.method.predictor_last_bn = True

  c.optimizer.name = 'lars'
  c.optimizer.base_lr = 0.3
  c.optimizer.lr_scaling = 'linear'
  c.optimizer.weight_decay = 1.5e-6

  common.byol_augmentation(c.augment)
  c.augment.crop_scale = (0.2, 1.0)
  if models.is_vit(arg.backbone):
    c.method.temperature = 0.2
    c.model.vit_pool = 'cls'
    c.model.vit_pos_embed = 'sincos'
    c.model.vit_frozen_patch_embed = True
    c.augment.crop_scale = (0.08, 1.0)
  # The CPU recipes keep crops of scale (0.2, 1) (0.08 leaves blank patches of Fashion-MNIST's
  # centred objects: common.set_backbone).
  common.set_backbone(c, arg, paper_epochs=300.0, resnet_batch=4096, vit=VIT_RECIPE)
  if common.cpu_recipe(arg):
    c.method.projector_hidden_dim = c.method.predictor_hidden_dim = 512
    c.method.projector_output_dim = 128
    c.method.temperature = 0.2
  if arg.backbone == 'convnet':
    # The reference's 100-epoch ResNet-50 values (its shortest schedule; README): at the
    # 300-epoch lr of 0.3 the 4-epoch run scored within the noise of its random
    # initialisation on the whole 28-pixel images.
    c.optimizer.base_lr = 0.6
    c.optimizer.weight_decay = 1e-6
  return c
