"""VICReg (Bardes et al. 2022).

  ssl-jax-train --config=configs/vicreg.py --workdir=workdirs/vicreg
  ssl-jax-train --config=configs/vicreg.py:backbone=resnet50,dataset=tfds:imagenet2012 ...

Arguments: backbone (convnet | resnet18 | resnet34 | resnet50), batch (0 picks the recipe's),
epochs (0 picks the recipe's), dataset (fashion_mnist | tfds:<name>), crop (training crop
side; 0 picks one for the dataset).

With a ResNet backbone this is the paper's ImageNet recipe (Sec. 4.1 and Appendix C): a
3-layer 8192-8192-8192 expander, lambda = mu = 25 and nu = 1 in eq. 6, eps = 1e-4 in eq. 1,
LARS with lr 0.2 x B/256 (the paper's "base learning rate 0.2") and weight decay 1e-6, batch
2048, 1000 epochs with 10 warm-up epochs, and BYOL's asymmetric augmentations.

The loss is eq. 6 as written, mu [v(Z) + v(Z')]; the reference code averages the two
variance terms instead, i.e. its std_coeff = 25 is mu = 12.5 here: set
method.variance_weight = 12.5 to reproduce it exactly. The cosine schedule decays to 0
rather than to 1/1000 of the peak (the trainer's schedule is shared by all methods).

The default is the CPU recipe for Fashion-MNIST, modelled on configs/simclr.py's ConvNet
branch (16-pixel crops, evaluation at 20 pixels, widths 16-32-64, 16 epochs, LARS with
linear scaling) with a 512-512-512 expander; README has the measurements behind it.
"""

from ssl_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, backbone='convnet', batch=0, epochs=0.0,
                             dataset='fashion_mnist', crop=0)
  c = config_lib.base_config()
  c.data.name = arg.dataset

  c.method.name = 'vicreg'
  c.method.invariance_weight = 25.0   # lambda of eq. 6
  c.method.variance_weight = 25.0     # mu
  c.method.covariance_weight = 1.0    # nu
  c.method.variance_epsilon = 1e-4    # eps of eq. 1
  c.method.projector_hidden_dim = 8192
  c.method.projector_output_dim = 8192
  c.method.projector_num_layers = 3

  c.optimizer.name = 'lars'
  c.optimizer.base_lr = 0.2
  c.optimizer.lr_scaling = 'linear'
  c.optimizer.weight_decay = 1e-6

  # BYOL's augmentations (Grill et al. 2020, Table 6), as the paper uses (Appendix C).
  a = c.augment
  a.brightness, a.contrast, a.saturation, a.hue = 0.4, 0.4, 0.2, 0.1
  a.jitter_prob = 0.8
  a.grayscale_prob = 0.2
  a.per_view.blur_prob = (1.0, 0.1)
  a.per_view.solarize_prob = (0.0, 0.2)

  config_lib.set_backbone(c, arg, paper_epochs=1000.0)
  if arg.backbone == 'convnet':
    c.batch_size = arg.batch or 256
    c.method.projector_hidden_dim = 512
    c.method.projector_output_dim = 512
    a.crop_scale = (0.2, 1.0)  # 0.08 leaves blank patches of these centred objects
    c.optimizer.warmup_epochs = 1.0
  else:
    c.batch_size = arg.batch or 2048
    c.optimizer.warmup_epochs = 10.0
  return c
