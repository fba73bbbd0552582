"""Triplet loss with semi-hard negatives (Schroff et al. 2015, FaceNet) between two augmented
views of each image.

  ssl-jax-train --config=configs/triplet.py --workdir=workdirs/triplet
  ssl-jax-train --config=configs/triplet.py:backbone=resnet50,dataset=tfds:imagenet2012,batch=4096 ...

Arguments: backbone (convnet | resnet18 | resnet34 | resnet50), batch, epochs, dataset
(fashion_mnist | tfds:<name> | folder:<path>), crop (training crop side; 0 picks one for the
dataset).

FaceNet's loss values apply everywhere: margin alpha = 0.2 on squared distances between
l2-normalised 128-dimensional embeddings, semi-hard negatives mined in the batch (here the
global batch: every view is an anchor, the other view of its image its positive, both views
of every other image its candidates). When an anchor has no semi-hard negative the farthest
negative is used, as TF-Addons' triplet_semihard_loss does (method.fallback).
FaceNet trains supervised face embeddings with AdaGrad, so there is no published
self-supervised recipe: the optimisation is configs/simclr.py's (LARS, linear scaling), its
CPU recipe by default (ConvNet, 16-pixel crops, evaluation at 28 pixels, 16 epochs) and its
ImageNet recipe with a ResNet backbone.
"""

from ssl_jax.configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg)
  c = common.method_config(arg, 'triplet')
  c.method.margin = 0.2
  c.method.fallback = 'easiest'   # or 'hardest': the closest negative
  c.method.projector_hidden_dim = 2048
  c.method.projector_output_dim = 128
  c.method.projector_num_layers = 2
  c.method.projector_last_bn = False

  c.optimizer.name = 'lars'
  c.optimizer.base_lr = 0.3
  c.optimizer.lr_scaling = 'linear'
  c.optimizer.weight_decay = 1e-6

  common.set_backbone(c, arg, paper_epochs=100.0, resnet_batch=256)
  if common.cpu_recipe(arg):
    c.method.projector_hidden_dim = 512
  return c
