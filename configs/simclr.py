"""SimCLR (Chen et al. 2020).

  ssl-jax-train --config=configs/simclr.py --workdir=workdirs/simclr
  ssl-jax-train --config=configs/simclr.py:backbone=resnet50,dataset=tfds:imagenet2012,batch=4096,epochs=100 ...

Arguments: backbone (convnet | resnet18 | resnet34 | resnet50 | vit_micro | vit_tiny |
vit_small | vit_base | vit_large), batch, epochs, dataset (fashion_mnist | tfds:<name> |
folder:<path>), crop (training crop side; 0 picks one for the dataset).

The default is the CPU recipe for Fashion-MNIST: a small ConvNet trained on 16-pixel crops,
which on 2 cores sees 16 epochs in minutes (README has the numbers). XLA's CPU
convolutions are slow, and at 16 pixels a step costs a fifth of one at 28 while the kNN
accuracy is as good, so more epochs fit in the budget. The encoder is evaluated on the whole
28-pixel images: random-resized crops zoom in during training, so objects look larger than
in the full image, and evaluating at a higher resolution than the crops' matches their
apparent size (Touvron et al. 2019, "FixRes"; README: 28 beats 24 and 20 on kNN).
With a ResNet backbone the paper's ImageNet recipe applies: LARS, lr 0.3 x B/256,
10 warm-up epochs, weight decay 1e-6, temperature 0.1, 2048-wide projector.
A ViT on Fashion-MNIST (`:backbone=vit_micro`: 4 blocks of width 64, 4-pixel patches on the
same 16-pixel crops) takes configs/common.py's ViT CPU recipe (AdamW lr 2e-3 x B/256, 4
epochs, averaged patch tokens; measured there) and this projector; elsewhere a ViT takes the
generic ViT recipe of configs/common.py (the paper trains none).
"""

from ssl_jax.configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg)
  c = common.method_config(arg, 'simclr')
  c.method.temperature = 0.1
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
    # measured here: temperature 0.5 < 0.2 < 0.1 > 0.05 (kNN, 3 epochs; README)
  return c
