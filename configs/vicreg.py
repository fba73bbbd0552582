"""VICReg (Bardes et al. 2022).

  ssl-jax-train --config=configs/vicreg.py --workdir=workdirs/vicreg
  ssl-jax-train --config=configs/vicreg.py:backbone=resnet50,dataset=tfds:imagenet2012 ...

Arguments: backbone (convnet | resnet18 | resnet34 | resnet50), batch (0 picks the recipe's),
epochs (0 picks the recipe's), dataset (fashion_mnist | tfds:<name> | folder:<path>), crop
(training crop side; 0 picks one for the dataset).

With a ResNet backbone this is the paper's ImageNet recipe (Sec. 4.1 and Appendix C): a
3-layer 8192-8192-8192 expander, lambda = mu = 25 and nu = 1 in eq. 6, eps = 1e-4 in eq. 1,
LARS with lr 0.2 x B/256 (the paper's "base learning rate 0.2") and weight decay 1e-6, batch
2048, 1000 epochs with 10 warm-up epochs, and BYOL's asymmetric augmentations.

The loss follows the authors' code (and lightly's VICRegLoss), which averages the two views'
variance terms, mu [v(Z) + v(Z')] / 2, where eq. 6 as printed sums them: variance_weight = 25
is the authors' std_coeff = 25 (eq. 6 as printed would be variance_weight = 50). The cosine
schedule decays to 0 rather than to 1/1000 of the peak (the trainer's schedule is shared by
all methods).

The default is the CPU recipe for Fashion-MNIST, modelled on configs/simclr.py's ConvNet
branch (16-pixel crops, evaluation at 28 pixels, widths 16-32-64, 16 epochs, LARS with
linear scaling) with a 512-512-512 expander; README has the measurements behind it.
"""

from ssl_jax.configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg)
  c = common.method_config(arg, 'vicreg')
  c.method.invariance_weight = 25.0   # lambda of eq. 6
  c.method.variance_weight = 25.0     # mu, on the views' average (the authors' std_coeff)
  c.method.covariance_weight = 1.0    # nu
  c.method.variance_epsilon = 1e-4    # eps of eq. 1
  c.method.projector_hidden_dim = 8192
  c.method.projector_output_dim = 8192
  c.method.projector_num_layers = 3

  c.optimizer.name = 'lars'
  c.optimizer.base_lr = 0.2
  c.optimizer.lr_scaling = 'linear'
  c.optimizer.weight_decay = 1e-6

  common.byol_augmentation(c.augment)  # as the paper (Appendix C)
  common.set_backbone(c, arg, paper_epochs=1000.0, resnet_batch=2048)
  if common.cpu_recipe(arg):
    c.method.projector_hidden_dim = 512
    c.method.projector_output_dim = 512
  return c
