"""DINO (Caron et al. 2021, "Emerging properties in self-supervised vision transformers";
reference code github.com/facebookresearch/dino, main_dino.py).

  ssl-jax-train --config=configs/dino.py --workdir=workdirs/dino
  ssl-jax-train --config=configs/dino.py:backbone=resnet50,dataset=tfds:imagenet2012 ...
  ssl-jax-train --config=configs/dino.py:backbone=vit_small,dataset=tfds:imagenet2012 ...

Arguments: backbone (convnet | resnet18 | resnet34 | resnet50 | vit_micro | vit_tiny |
vit_small | vit_base | vit_large), batch (0 picks the recipe's), epochs (0 picks the
recipe's), dataset (fashion_mnist | tfds:<name> | folder:<path>), crop (training crop side;
0 picks one for the dataset).

With a ResNet backbone the defaults are the paper's training recipe (Sec. 4, "Implementation
details"): batch 1024, 100 epochs, AdamW with lr 0.0005 x B/256 after 10 warm-up epochs and
cosine decay, weight decay 0.04; DINO head 2048 -> 2048 -> 256 -> 65536 with GELU and a
weight-normalised last layer (g fixed to 1), frozen for the first epoch; student temperature
0.1, teacher temperature 0.04 -> 0.07 over 30 epochs, centre momentum 0.9, teacher momentum
0.996 -> 1 (cosine); multi-crop 2 global + 8 local 96-pixel crops with the authors' ResNet
scales (0.14-1 and 0.05-0.14) and BYOL's augmentation (blur 1.0 / 0.1 and solarisation
0 / 0.2 on the global crops, blur 0.5 on the local ones); the weight decay rises 0.04 -> 0.4
on a cosine over the run and each parameter's gradient is clipped to norm 3 (main_dino.py's
weight_decay_end and clip_grad). Departure: the paper's lr ends at 1e-6, here at 0. The authors'
ResNet-50 run (README) used instead SGD lr 0.03 x B/256 with weight decay 1e-4 and a constant
teacher temperature 0.04: --config.optimizer.name=sgd --config.optimizer.base_lr=0.03
--config.optimizer.weight_decay=1e-4 --config.method.teacher_temperature=0.04.

With a ViT backbone the paper's ViT-S/16 recipe (Sec. 4; main_dino.py's defaults, which are
the paper's values unless said): ViT/16 at 224 pixels, class token, learned position
embedding; stochastic depth 0.1 in the student only (the teacher is built without);
AdamW with lr 0.0005 x B/256, 10 warm-up epochs then cosine decay, weight decay 0.04, batch
1024 (the paper's 16 GPUs x 64), 100 epochs; the head, temperatures, momentum and frozen last
layer as for the ResNet (norm_last_layer=True, main_dino.py's default; its README's best
ViT-S/16 run sets it False with 300 epochs: --config.method.norm_last_layer=False,
epochs=300); multi-crop with the ViT scales, global crops (0.4, 1) and 8 local 96-pixel
crops (0.05, 0.4) (main_dino.py's defaults). main_dino.py's own default teacher temperature
is 0.04 with no warm-up; the paper's 0.04 -> 0.07 over 30 epochs is kept here
(--config.method.teacher_temperature=0.04 for the former). The weight-decay rise, the
per-parameter gradient clipping and the departure (lr ending at 0 not 1e-6) are the ResNet
recipe's, and it trains in float16 autocast (here: --config.model.dtype=bfloat16).
vit_tiny, vit_base and vit_large take the same values (not the paper's per-size tuning).

The default is the CPU recipe for Fashion-MNIST, on the ConvNet and crops of configs/simclr.py
(16-pixel global crops of scale (0.14, 1), evaluated at 28 pixels) without local crops, as
solo-learn's CIFAR DINO (the ConvNet's 7-pixel local crops drove the head to uniform outputs);
smaller heads (512 wide, 128 bottleneck, 4096 outputs), the teacher temperature 0.04 from the
start (main_dino.py's default), teacher momentum 0.99 and the last layer frozen for 1 % of
the run; see the values set below for why. A ViT on Fashion-MNIST gets the same heads and
teacher with common.py's ViT CPU recipe, the ViT crop scales and 8-pixel local crops (two
4-pixel patches a side).
"""

from ssl_jax import models
from ssl_jax.configs import common

# Sec. 4, "Implementation details"; main_dino.py's defaults (lr, warmup_epochs, weight_decay,
# batch_size_per_gpu 64 on the paper's 16 GPUs, epochs).
VIT_RECIPE = common.ViTRecipe(base_lr=0.0005, weight_decay=0.04, warmup_epochs=10.0,
                              batch=1024, epochs=100.0)


def get_config(arg=None):
  arg = common.parse_arg(arg)
  c = common.method_config(arg, 'dino')
  m = c.method
  m.num_prototypes = 65536      # K, the head's output dimension
  m.projector_hidden_dim = 2048
  m.projector_output_dim = 256  # the head's bottleneck
  m.projector_num_layers = 3
  m.norm_last_layer = True
  m.student_temperature = 0.1
  m.teacher_temperature_start = 0.04
  m.teacher_temperature = 0.07
  m.teacher_warmup_epochs = 30.0
  m.center_momentum = 0.9
  m.target_momentum = 0.996
  m.freeze_last_layer_epochs = 1.0

  c.optimizer.name = 'adamw'
  c.optimizer.base_lr = 0.0005
  c.optimizer.lr_scaling = 'linear'
  c.optimizer.weight_decay = 0.04
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999

  a = c.augment
  common.byol_augmentation(a)
  a.crop_scale = (0.14, 1.0)
  a.blur_prob = 0.5             # the local crops'
  a.num_local_crops = 8
  a.local_crop_size = 0         # crop_size * 96 / 224
  a.local_crop_scale = (0.05, 0.14)
  if models.is_vit(arg.backbone):
    c.model.vit_pool = 'cls'
    c.model.vit_pos_embed = 'learned'
    c.model.drop_path_rate = 0.1
    a.crop_scale = (0.4, 1.0)
    a.local_crop_scale = (0.05, 0.4)

  # The global crops keep their scale ((0.14, 1), ViTs (0.4, 1)) beside the local crops'.
  common.set_backbone(c, arg, paper_epochs=100.0, resnet_batch=1024, cpu_crop_scale=None,
                      vit=VIT_RECIPE)
  if common.cpu_recipe(arg):
    m.projector_hidden_dim = 512
    m.projector_output_dim = 128
    m.num_prototypes = 4096
    # A small network's head starts by mapping every image to nearly the same bottleneck, so
    # the centred targets start close to uniform (teacher entropy 7.1-7.5 of ln 4096 = 8.3):
    # the sharpest teacher from the first step, main_dino.py's default (0.04, no warm-up),
    # where a warm-up towards 0.07 would flatten them further.
    m.teacher_temperature = 0.04
    m.teacher_warmup_epochs = 0.0
    # Evaluation scores the teacher: at 0.996 (cosine to 1) some 15 % of its random
    # initialisation would remain after a 4-epoch ConvNet run (936 steps; the paper's run
    # is 125k). 0.99 as the CPU BYOL recipe (solo-learn's CIFAR value).
    m.target_momentum = 0.99
    # 1 % of the recipe's run, as the paper's 1 of 100 epochs.
    m.freeze_last_layer_epochs = common.cpu_recipe_epochs(arg) / 100
    if arg.backbone == 'convnet':
      # No local crops, as solo-learn's CIFAR DINO: the ConvNet's 7-pixel local crops hold too
      # little of a Fashion-MNIST item, and the local-to-global terms (8 of every 9) drove
      # the head to uniform outputs (one-epoch probes: teacher entropy 8.2 of 8.3, kNN at
      # the random initialisation's; 2 local crops of scale 0.14-0.4 did the same).
      a.num_local_crops = 0
  else:
    # main_dino.py: the weight decay rises 0.04 -> 0.4 on a cosine over the run, and each
    # parameter's gradient is clipped to norm 3 (utils.clip_gradients).
    c.optimizer.weight_decay_end = 0.4
    c.optimizer.clip_grad_norm = 3.0
    c.optimizer.clip_per_parameter = True
  return c
