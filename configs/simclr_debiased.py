"""SimCLR with the debiased contrastive loss (Chuang et al. 2020).

  ssl-jax-train --config=configs/simclr_debiased.py --workdir=workdirs/simclr_debiased
  ssl-jax-train --config=configs/simclr_debiased.py:backbone=resnet50,dataset=tfds:stl10 ...

Arguments: those of configs/simclr.py. The negatives of NT-Xent are corrected for the
same-class images among them, with class prior tau_plus = 0.1 (the papers' value, and
Fashion-MNIST's exact prior: 10 balanced classes).

The default is configs/simclr.py's CPU recipe for Fashion-MNIST (ConvNet, 16-pixel crops,
evaluation at 20 pixels, LARS, 16 epochs) with the debiased estimator. With a ResNet backbone
the paper's recipe applies (their STL10/CIFAR10 SimCLR, github.com/chingyaoc/DCL): Adam,
lr 1e-3 unscaled, weight decay 1e-6, temperature 0.5, batch 256, 400 epochs, a 512-wide
projector to 128 dimensions. Here the learning rate follows the trainer's cosine decay (the
paper keeps it constant) and AdamW's decoupled weight decay stands in for Adam's L2 term
(the same at 1e-6).
"""

import importlib.util
import os

from ssl_jax import config_lib


def _simclr_config(arg):
  spec = importlib.util.spec_from_file_location(
      'simclr_config', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'simclr.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg=None):
  c = _simclr_config(arg)
  c.method.negatives = 'debiased'
  c.method.tau_plus = 0.1
  c.method.beta = 0.0
  if c.model.name != 'convnet':
    c.method.temperature = 0.5
    c.method.projector_hidden_dim = 512
    c.method.projector_output_dim = 128
    c.optimizer.name = 'adamw'
    c.optimizer.base_lr = 1e-3
    c.optimizer.lr_scaling = 'none'
    c.optimizer.weight_decay = 1e-6
    c.optimizer.warmup_epochs = 0.0
    # configs/simclr.py's arguments, to tell an explicit epochs= from its default.
    epochs = config_lib.parse_arg(arg, backbone='', batch=0, epochs=0.0, dataset='',
                                  crop=0).epochs
    c.num_epochs = epochs or 400.0
  return c
