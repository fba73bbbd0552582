"""iBOT (Zhou et al. 2022, "iBOT: Image BERT pre-training with online tokenizer"; reference
code github.com/bytedance/ibot, main_ibot.py and its README).

  ssl-jax-train --config=configs/ibot.py --workdir=workdirs/ibot
  ssl-jax-train --config=configs/ibot.py:dataset=tfds:imagenet2012 --workdir=workdirs/ibot_vits ...

Arguments: backbone (a ViT: vit_micro | vit_tiny | vit_small | vit_base | vit_large; default
vit_micro on 28-pixel datasets, vit_small elsewhere), batch, epochs, dataset (fashion_mnist |
tfds:<name> | folder:<path>), crop (training crop side; 0 picks one for the dataset).

Off the CPU recipe (ImageNet), the authors' ViT-S/16 run (their README, the `args` of the
released checkpoint; main_ibot.py's defaults otherwise; paper App. A): ViT/16 at 224 pixels,
class token, learned position embedding, stochastic depth 0.1 in the student only; a head
shared by the class and patch tokens (shared_head, shared_head_teacher), 3 layers 2048 wide,
bottleneck 256, 8192 outputs for both, last layer not normalised (norm_last_layer False), frozen
for the first epoch; student temperature 0.1, teacher temperatures 0.04 -> 0.07 for the class
token and for the patches over 30 epochs, centre momentum 0.9 for both centres, teacher
momentum 0.996 -> 1 (cosine); lambda1 = lambda2 = 1; blockwise masks on half of the global
crops (`--pred_ratio 0 0.3 --pred_ratio_var 0 0.2`: ratio 0, or uniform in [0.1, 0.5]) with
aspect ratios in (0.3, 1 / 0.3), from the first epoch; AdamW lr 0.0005 x B/256 after 10
warm-up epochs, cosine decay, weight decay 0.04, batch 1024 (16 GPUs x 64), 800 epochs;
multi-crop 2 global crops of scale (0.25, 1) and 10 local 96-pixel crops of (0.05, 0.25),
DINO's (BYOL's) augmentation. Departures, as configs/dino.py's: the weight decay's cosine
rise 0.04 -> 0.4, the lr's floor 1e-6 and gradient clipping at 3 need optimizer options this
repo does not have; float16 autocast is --config.model.dtype=bfloat16 here.

The default is a CPU recipe for Fashion-MNIST: configs/common.py's ViT CPU recipe (vit_micro,
4-pixel patches, AdamW lr 2e-3 x B/256, weight decay 0.05, batch 256, 4 epochs) on the whole
28-pixel image's crops as configs/mae.py (a 7 x 7 patch grid, so that blocks of patches can be
masked: the recipe's 16-pixel crops give 4 x 4) with `CPU_LOCAL_CROPS` 12-pixel local crops
(3 x 3 patches), the class token as the representation (the paper's, which the class-token
loss trains), smaller heads (512 wide, 128 bottleneck, 1024 outputs), and the warm-up of the
teacher temperatures and the frozen last layer shortened in proportion to the run.
"""

from ssl_jax import models
from ssl_jax.configs import common

# main_ibot.py's defaults and the README's ViT-S/16 run (batch_size_per_gpu 64 on 16 GPUs).
VIT_RECIPE = common.ViTRecipe(base_lr=0.0005, weight_decay=0.04, warmup_epochs=10.0,
                              batch=1024, epochs=800.0)
# The CPU recipe's global crops and patches (configs/mae.py's) and its local crops: fewer
# than the paper's 10, for the run to fit a CPU budget.
CPU_CROP = 28
CPU_PATCH = 4
CPU_LOCAL_CROP = 12
CPU_LOCAL_CROPS = 4


def _backbone_given(arg: str | None) -> bool:
  return any(item.split('=', 1)[0].strip() == 'backbone' for item in (arg or '').split(','))


def get_config(arg=None):
  parsed = common.parse_arg(arg)
  cpu_dataset = common.IMAGE_SIDE.get(parsed.dataset, 224) <= 28
  if not _backbone_given(arg):
    parsed.backbone = 'vit_micro' if cpu_dataset else 'vit_small'
  c = common.method_config(parsed, 'ibot')
  m = c.method
  m.num_prototypes = 8192         # K, the class token's outputs (--out_dim)
  m.num_patch_prototypes = 8192   # the patch tokens' (--patch_out_dim)
  m.shared_head = True
  m.shared_head_teacher = True
  m.projector_hidden_dim = 2048
  m.projector_output_dim = 256    # the head's bottleneck
  m.projector_num_layers = 3
  m.norm_last_layer = False
  m.student_temperature = 0.1
  m.teacher_temperature_start = 0.04
  m.teacher_temperature = 0.07
  m.teacher_patch_temperature_start = 0.04
  m.teacher_patch_temperature = 0.07
  m.teacher_warmup_epochs = 30.0
  m.center_momentum = 0.9
  m.target_momentum = 0.996
  m.freeze_last_layer_epochs = 1.0
  m.cls_loss_weight = 1.0         # lambda1
  m.patch_loss_weight = 1.0       # lambda2
  m.mask_ratio = 0.3              # --pred_ratio
  m.mask_ratio_spread = 0.2       # --pred_ratio_var
  m.masked_crop_fraction = 0.5    # --pred_ratio 0 0.3: half the crops unmasked
  m.mask_aspect_ratio = (0.3, 1 / 0.3)

  c.optimizer.name = 'adamw'
  c.optimizer.base_lr = 0.0005
  c.optimizer.lr_scaling = 'linear'
  c.optimizer.weight_decay = 0.04
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999

  a = c.augment
  common.byol_augmentation(a)
  a.blur_prob = 0.5               # the local crops'
  a.crop_scale = (0.25, 1.0)
  a.num_local_crops = 10
  a.local_crop_size = 0           # crop_size * 96 / 224
  a.local_crop_scale = (0.05, 0.25)
  c.model.vit_pool = 'cls'
  c.model.vit_pos_embed = 'learned'
  c.model.drop_path_rate = 0.1

  cpu = common.cpu_recipe(parsed)
  if cpu and models.is_vit(parsed.backbone) and not parsed.crop:
    parsed.crop = CPU_CROP
  common.set_backbone(c, parsed, paper_epochs=VIT_RECIPE.epochs, resnet_batch=VIT_RECIPE.batch,
                      cpu_crop_scale=None, vit=VIT_RECIPE)
  if cpu:
    m.projector_hidden_dim = 512
    m.projector_output_dim = 128
    m.num_prototypes = m.num_patch_prototypes = 1024
    # Fractions of the run as the ViT CPU recipes of configs/dino.py.
    m.teacher_warmup_epochs = common.cpu_recipe_epochs(parsed) / 4
    m.freeze_last_layer_epochs = common.cpu_recipe_epochs(parsed) / 16
    if models.is_vit(parsed.backbone):
      c.model.vit_pool = 'cls'     # common.py's CPU recipe averages the patch tokens
      c.model.patch_size = CPU_PATCH
      c.eval.image_size = c.augment.crop_size
      a.num_local_crops = CPU_LOCAL_CROPS
      a.local_crop_size = CPU_LOCAL_CROP
  return c
