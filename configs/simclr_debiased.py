"""SimCLR with the debiased contrastive loss (Chuang et al. 2020).

  ssl-jax-train --config=configs/simclr_debiased.py --workdir=workdirs/simclr_debiased
  ssl-jax-train --config=configs/simclr_debiased.py:backbone=resnet50,dataset=tfds:stl10 ...

Arguments: those of configs/simclr.py. The negatives of NT-Xent are corrected for the
same-class images among them, with class prior tau_plus = 0.1 (the papers' value, and
Fashion-MNIST's exact prior: 10 balanced classes).

The default is configs/simclr.py's CPU recipe for Fashion-MNIST (ConvNet, 16-pixel crops,
evaluation at 28 pixels, LARS, 16 epochs) with the debiased estimator. With a ResNet backbone
the paper's recipe applies (their STL10/CIFAR10 SimCLR, github.com/chingyaoc/DCL): Adam,
lr 1e-3 unscaled, weight decay 1e-6, temperature 0.5, batch 256, 400 epochs, a 512-wide
projector to 128 dimensions. Here the learning rate follows the trainer's cosine decay (the
paper keeps it constant) and AdamW's decoupled weight decay stands in for Adam's L2 term
(the same at 1e-6). A ViT off the CPU recipe takes the paper's temperature and projector
with common.py's ViT optimizer recipe; on Fashion-MNIST, configs/simclr.py's ViT CPU recipe.
"""

from ssl_jax.configs import common, simclr


def get_config(arg=None):
  c = simclr.get_config(arg)
  c.method.negatives = 'debiased'
  c.method.tau_plus = 0.1
  c.method.beta = 0.0
  if not common.cpu_recipe(common.parse_arg(arg)):
    c.method.temperature = 0.5
    c.method.projector_hidden_dim = 512
    c.method.projector_output_dim = 128
  if c.model.name.startswith('resnet'):  # a ViT keeps common.py's optimizer recipe
    c.optimizer.name = 'adamw'
    c.optimizer.base_lr = 1e-3
    c.optimizer.lr_scaling = 'none'
    c.optimizer.weight_decay = 1e-6
    c.optimizer.warmup_epochs = 0.0
    c.num_epochs = common.parse_arg(arg).epochs or 400.0
  return c
