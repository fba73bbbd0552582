"""BYOL (Grill et al. 2020).

  ssl-jax-train --config=configs/byol.py --workdir=workdirs/byol
  ssl-jax-train --config=configs/byol.py:backbone=resnet50,dataset=tfds:imagenet2012 ...

Arguments: backbone (convnet | resnet18 | resnet34 | resnet50), batch (0 picks the recipe's),
epochs (0 picks the recipe's), dataset (fashion_mnist | tfds:<name> | folder:<path>), crop
(training crop side; 0 picks one for the dataset).

With a ResNet backbone the defaults are the paper's ImageNet recipe (Sec. 3.3 and App. B/C):
batch 4096, 1000 epochs, LARS with lr 0.2 x B/256, 10 warm-up epochs and cosine decay,
weight decay 1.5e-6 (biases and BN excluded), projector and predictor MLPs 4096 -> 256 with
BN, target momentum tau_base = 0.996 raised to 1 on a cosine schedule, and the asymmetric
augmentation of Table 6: blur always on view 1 and with p = 0.1 on view 2, solarisation only
on view 2 (p = 0.2), colour jitter (0.4, 0.4, 0.2, 0.1).

The default is the CPU recipe for Fashion-MNIST, on the ConvNet and crops of configs/simclr.py
(16-pixel crops, evaluated at 28 pixels); see the values set below for what was changed and
why.
"""

from ssl_jax.configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg)
  c = common.method_config(arg, 'byol')
  c.method.projector_hidden_dim = 4096
  c.method.projector_output_dim = 256
  c.method.predictor_hidden_dim = 4096
  c.method.target_momentum = 0.996

  c.optimizer.name = 'lars'
  c.optimizer.base_lr = 0.2
  c.optimizer.lr_scaling = 'linear'
  c.optimizer.weight_decay = 1.5e-6

  common.byol_augmentation(c.augment)
  common.set_backbone(c, arg, paper_epochs=1000.0, resnet_batch=4096)
  if common.cpu_recipe(arg):
    c.method.projector_hidden_dim = 512
    c.method.projector_output_dim = 128
    c.method.predictor_hidden_dim = 512
    # Short-run values of solo-learn's CIFAR recipe: with the paper's tau = 0.996 the target
    # lags ~250 of a 4-epoch run's 936 steps (README table: the paper's values score lower).
    c.method.target_momentum = 0.99
  if arg.backbone == 'convnet':  # LARS values; a ViT's AdamW is common.py's
    c.optimizer.base_lr = 1.0
    c.optimizer.weight_decay = 1e-5
  return c
