"""SimSiam (Chen & He 2021).

  ssl-jax-train --config=configs/simsiam.py --workdir=workdirs/simsiam
  ssl-jax-train --config=configs/simsiam.py:backbone=resnet50,dataset=tfds:imagenet2012 ...

Arguments: backbone (convnet | resnet18 | resnet34 | resnet50), batch (0 picks the recipe's),
epochs (0 picks the recipe's), dataset (fashion_mnist | tfds:<name> | folder:<path>), crop
(training crop side; 0 picks one for the dataset).

With a ResNet backbone the defaults are the paper's ImageNet recipe (Sec. 3, App. A): batch
512, 100 epochs, SGD with momentum 0.9, lr 0.05 x B/256 on a cosine schedule without
warm-up, weight decay 1e-4; a 3-layer projector (2048 wide, BN on every layer including the
output), a bottleneck predictor 2048 -> 512 -> 2048, and MoCo v2's augmentation (crop scale
(0.2, 1), colour jitter (0.4, 0.4, 0.4, 0.1), blur p = 0.5). The paper keeps the predictor's
lr constant; this trainer decays it with the rest (see ssl_jax/methods/simsiam.py).
`--config.method.stop_gradient=False` is the paper's collapsing ablation (Fig. 2).

The default is the CPU recipe for Fashion-MNIST, on the ConvNet and crops of configs/simclr.py
(16-pixel crops, evaluated at 28 pixels); see the values set below for what was changed and
why.
"""

from ssl_jax.configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg)
  c = common.method_config(arg, 'simsiam')
  c.method.projector_hidden_dim = 2048
  c.method.projector_output_dim = 2048
  c.method.projector_num_layers = 3
  c.method.predictor_hidden_dim = 512
  c.method.stop_gradient = True

  c.optimizer.name = 'sgd'
  c.optimizer.base_lr = 0.05
  c.optimizer.lr_scaling = 'linear'
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4

  a = c.augment
  a.crop_scale = (0.2, 1.0)
  a.brightness, a.contrast, a.saturation, a.hue = 0.4, 0.4, 0.4, 0.1
  a.jitter_prob = 0.8
  a.grayscale_prob = 0.2
  a.blur_prob = 0.5
  a.blur_sigma = (0.1, 2.0)

  common.set_backbone(c, arg, paper_epochs=100.0, resnet_batch=512, resnet_warmup_epochs=0.0,
                      cpu_warmup_epochs=0.0)
  if common.cpu_recipe(arg):
    c.method.projector_hidden_dim = 512
    c.method.projector_output_dim = 512
    c.method.predictor_hidden_dim = 128
  if arg.backbone == 'convnet':  # SGD values; a ViT's AdamW is common.py's
    # solo-learn's CIFAR values: the paper's lr 0.05 and weight decay 1e-4 score lower here
    # (README table).
    c.optimizer.base_lr = 0.5
    c.optimizer.weight_decay = 1e-5
  # Healthy small encoders here sit at 0.3-0.6 and 0.2-0.5 (post-ReLU features all point into
  # one orthant, so their spread is below that of a sphere); a collapsed one at 1/D and 0.
  c.eval.collapse_min_rank_fraction = 0.05
  c.eval.collapse_min_std_fraction = 0.05
  c.eval.plots = True
  return c
