"""NNCLR (Dwibedi et al. 2021).

  ssl-jax-train --config=configs/nnclr.py --workdir=workdirs/nnclr
  ssl-jax-train --config=configs/nnclr.py:backbone=resnet50,dataset=tfds:imagenet2012,batch=4096 ...

Arguments: backbone (convnet | resnet18 | resnet34 | resnet50), batch (0: the recipe's, 4096
for ResNets, 256 for the ConvNet), epochs, dataset (fashion_mnist | tfds:<name> |
folder:<path>), crop (training crop side; 0 picks one for the dataset).

With a ResNet backbone the paper's ImageNet recipe applies (Sec. 3.3): batch 4096, LARS with
lr 0.3 x B/256 (4.8), weight decay 1e-6, 10 warm-up epochs then cosine decay, 1000 epochs;
support set of 98304 projections, temperature 0.1; projector 3-layer MLP (2048 hidden,
256 out) and predictor 2-layer MLP (4096 hidden); BYOL's augmentation (blur p = 1.0 / 0.1,
solarisation p = 0 / 0.2, colour jitter (0.4, 0.4, 0.2, 0.1), crops of scale (0.08, 1)).

The default is the CPU recipe for Fashion-MNIST, modelled on configs/simclr.py's (a small
ConvNet on 16-pixel crops, evaluated at 28 pixels, LARS with linear scaling, 16 epochs),
with 512-wide heads, a support set of 4096 (16 batches, like configs/moco_v2.py's queue) and
temperature 0.2 (solo-learn's CIFAR value); its 4-epoch row is in the README's method table.
"""

from ssl_jax.configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg)
  c = common.method_config(arg, 'nnclr')
  c.method.temperature = 0.1
  c.method.queue_size = 98304
  c.method.projector_hidden_dim = 2048
  c.method.projector_output_dim = 256
  c.method.projector_num_layers = 3
  c.method.projector_last_bn = True
  c.method.predictor_hidden_dim = 4096

  c.optimizer.name = 'lars'
  c.optimizer.base_lr = 0.3
  c.optimizer.lr_scaling = 'linear'
  c.optimizer.weight_decay = 1e-6

  common.byol_augmentation(c.augment)
  common.set_backbone(c, arg, paper_epochs=1000.0, resnet_batch=4096)
  if common.cpu_recipe(arg):
    c.method.queue_size = 4096
    # solo-learn's CIFAR NNCLR value; 4-epoch runs scored a little higher than with 0.1 (README).
    c.method.temperature = 0.2
    c.method.projector_hidden_dim = 512
    c.method.projector_output_dim = 128
    c.method.predictor_hidden_dim = 512
  return c
