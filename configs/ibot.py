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
warm-up epochs, cosine decay, weight decay 0.04 rising to 0.4 (cosine), each parameter's
gradient clipped to norm 3 (configs/dino.py's), batch 1024 (16 GPUs x 64), 800 epochs;
multi-crop 2 global crops of scale (0.25, 1) and 10 local 96-pixel crops of (0.05, 0.25),
DINO's (BYOL's) augmentation. Departure, as configs/dino.py's: the lr's floor is 0, not
1e-6; float16 autocast is --config.model.dtype=bfloat16 here.

The default is a CPU recipe for Fashion-MNIST: configs/dino.py's (its heads 512 wide with a
128 bottleneck, no teacher temperature warm-up, the patches' teacher temperature 0.04,
teacher momentum 0.99, last layer frozen for 1 % of the run) on configs/common.py's ViT CPU
recipe (vit_micro, 16-pixel crops of 4-pixel patches, a 4 x 4 grid, evaluated at 20 pixels;
weight decay 0.05, batch 256, 4 epochs) with iBOT's changes below: main_ibot.py's lr (5e-4 x
B/256) and normalised last layer, a sharper class-token teacher (0.02), 1024 outputs, a
256-wide head and no local crops (the head runs on every patch token: these keep 4 epochs
within some 15 minutes on 2 CPU cores), the class token as the representation (the
paper's). The 28-pixel crops (7 x 7 patches) and 4 local crops used before cost 5 times as
much per step.
"""

from ssl_jax.configs import common, dino

# main_ibot.py's defaults and the README's ViT-S/16 run (batch_size_per_gpu 64 on 16 GPUs):
# configs/dino.py's ViT-S/16 optimizer, for 800 epochs.
VIT_RECIPE = common.ViTRecipe(base_lr=0.0005, weight_decay=0.04, warmup_epochs=10.0,
                              batch=1024, epochs=800.0)


def get_config(arg=None):
  parsed = common.parse_arg(arg, backbone='')  # '': not given
  cpu_dataset = common.IMAGE_SIDE.get(parsed.dataset, 224) <= 28
  # configs/dino.py's config for the same arguments, with iBOT's default backbone (a ViT:
  # vit_micro on 28-pixel datasets, vit_small elsewhere); then what iBOT changes.
  extra = []
  if not parsed.backbone:
    parsed.backbone = 'vit_micro' if cpu_dataset else 'vit_small'
    extra.append(f'backbone={parsed.backbone}')
  cpu = common.cpu_recipe(parsed)
  c = dino.get_config(','.join(item for item in [arg or ''] + extra if item))
  c.method.name = 'ibot'
  m = c.method
  m.num_prototypes = 8192         # K, the class token's outputs (--out_dim)
  m.num_patch_prototypes = 8192   # the patch tokens' (--patch_out_dim)
  m.shared_head = True
  m.shared_head_teacher = True
  m.norm_last_layer = False
  m.teacher_patch_temperature_start = m.teacher_temperature_start
  m.teacher_patch_temperature = m.teacher_temperature
  m.cls_loss_weight = 1.0         # lambda1
  m.patch_loss_weight = 1.0       # lambda2
  m.mask_ratio = 0.3              # --pred_ratio
  m.mask_ratio_spread = 0.2       # --pred_ratio_var
  m.masked_crop_fraction = 0.5    # --pred_ratio 0 0.3: half the crops unmasked
  m.mask_aspect_ratio = (0.3, 1 / 0.3)
  if not cpu:
    c.num_epochs = parsed.epochs or VIT_RECIPE.epochs

  a = c.augment
  a.crop_scale = (0.25, 1.0)
  a.num_local_crops = 10
  a.local_crop_scale = (0.05, 0.25)
  c.model.vit_pool = 'cls'

  if cpu:
    m.num_prototypes = m.num_patch_prototypes = 1024
    # The ViT CPU recipe's lr (2e-3) drove the teacher's patch targets to uniform within
    # 100 steps (entropy 6.6 of ln 1024 = 6.9); main_ibot.py's 5e-4 x B/256 kept them at 6.2.
    c.optimizer.base_lr = 0.0005
    # main_ibot.py's default: "not normalizing ... can make the training unstable".
    m.norm_last_layer = True
    # The class token's targets became the same for every image by step 100 at 0.04
    # (entropy 6.90 of ln 1024 = 6.93, 0.02 below the entropy of their mean); at 0.02 they
    # kept 0.3 of image-specific information (6.46 vs 6.79 after an epoch). The patches' 0.04.
    m.teacher_temperature_start = m.teacher_temperature = 0.02
    # The head runs on every patch token, which makes it most of a step's cost.
    m.projector_hidden_dim = 256
    a.num_local_crops = 0
    c.model.vit_pool = 'cls'  # common.py's CPU recipe averages the patch tokens
  return c
