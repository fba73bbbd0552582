"""Hyperbolic contrastive learning (Ermolov et al. 2022, "Hyperbolic Vision Transformers").

  ssl-jax-train --config=configs/hyperbolic.py --workdir=workdirs/hyperbolic
  ssl-jax-train --config=configs/hyperbolic.py:backbone=vit_small,dataset=tfds:imagenet2012 ...

Arguments: backbone (vit_micro, the default | vit_tiny | vit_small | vit_base | vit_large |
convnet | resnet18 | resnet34 | resnet50), batch, epochs, dataset (fashion_mnist |
tfds:<name> | folder:<path>), crop (training crop side; 0 picks one for the dataset).

The loss values are the paper's (their train.py and hyptorch, github:htdt/hyp_metric):
curvature c = 0.1, temperature 0.2, feature clipping radius 2.3, 128-dimensional
embeddings.

The paper does supervised metric learning: it fine-tunes ViT-S/16 pre-trained with DINO (or
on ImageNet-21k) on CUB, Cars, SOP or In-Shop, with class-labelled positives, a linear head
(384 -> 128), AdamW at a constant lr of 1e-5 (DINO weights; 3e-5 for the others), PyTorch's
default weight decay 0.01, batch 900 (896 here, to divide over devices), gradient norms clipped at 3, 100 epochs (their
train.py defaults). This self-supervised recipe takes from it, on real data with a ViT: the
optimizer (AdamW, their lr as the peak at their batch, weight decay 0.01, no warm-up), the
batch, the epochs, the linear head and the loss values; positives are the other augmented
view of the image. Not taken: the DINO initialisation (runs start from random weights, so
that lr, tuned for fine-tuning, is far too small from scratch: pass a larger
optimizer.base_lr, e.g. the generic ViT recipe's 1.5e-4 x B/256), the constant lr (the
schedule is the library's cosine). Their gradient-norm clipping at 3 is kept on real data
with a ViT (`optimizer.clip_grad_norm`); the CPU recipe leaves it out.

The default is the ViT CPU recipe for Fashion-MNIST (configs/common.py: vit_micro, 4
blocks of width 64, 4-pixel patches on 16-pixel crops, AdamW lr 2e-3 x B/256, 4 epochs,
batch 256, averaged patch tokens, evaluated at 20 pixels) with SimCLR's CPU projector (2
layers, 512 hidden): from random weights a non-linear projector is what SimCLR found to
help the encoder's features. `backbone=convnet` and ResNets take SimCLR's optimisation (LARS
lr 0.3 x B/256, weight decay 1e-6) and its CPU and ImageNet recipes.
"""

from ssl_jax.configs import common

# ViT-S/16 fine-tuned from DINO (their README and train.py defaults): lr 1e-5 at batch 900,
# expressed as lr x B/256 for the library's linear scaling. The batch is their 900 rounded
# to 896, a multiple of 128, so that it divides over any power-of-two slice up to 128 chips.
PAPER_BATCH = 896
PAPER_VIT = common.ViTRecipe(base_lr=1e-5 * 256 / 900, weight_decay=0.01,
                             warmup_epochs=0.0, batch=PAPER_BATCH, epochs=100.0)


def get_config(arg=None):
  # vit_micro is the default backbone; an argument's backbone= comes later and wins.
  arg = common.parse_arg(','.join(filter(None, ['backbone=vit_micro', arg])))
  c = common.method_config(arg, 'hyperbolic')
  c.method.curvature = 0.1
  c.method.temperature = 0.2
  c.method.clip_radius = 2.3
  # Their head: one linear layer to the 128-dimensional embedding.
  c.method.projector_hidden_dim = 2048
  c.method.projector_output_dim = 128
  c.method.projector_num_layers = 1
  c.method.projector_last_bn = False

  # Convnet and ResNets: SimCLR's optimisation (a ViT's recipe replaces it in set_backbone).
  c.optimizer.name = 'lars'
  c.optimizer.base_lr = 0.3
  c.optimizer.lr_scaling = 'linear'
  c.optimizer.weight_decay = 1e-6

  common.set_backbone(c, arg, paper_epochs=PAPER_VIT.epochs, resnet_batch=256, vit=PAPER_VIT)
  if common.cpu_recipe(arg):
    c.method.projector_hidden_dim = 512
    c.method.projector_num_layers = 2
  elif c.model.name.startswith('vit'):
    c.optimizer.clip_grad_norm = 3.0  # train.py's clip_grad_norm_(..., 3), a global norm
  return c
