"""MoCo v1 (He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation
Learning"), as a config of the MoCo v2 method (`ssl_jax/methods/moco_v2.py`).

  ssl-jax-train --config=configs/moco_v1.py --workdir=workdirs/moco_v1
  ssl-jax-train --config=configs/moco_v1.py:backbone=resnet50,dataset=tfds:imagenet2012 ...

Arguments: those of configs/moco_v2.py. What v1 has that v2 changed (Chen et al. 2020,
"Improved baselines"): a linear head, one fc from the features to 128 dimensions
(`method.projector_hidden_dim = 0`), temperature 0.07, and the augmentation of the reference
code (github.com/facebookresearch/moco, main_moco.py without --aug-plus): crops of scale
(0.2, 1), colour jitter (0.4, 0.4, 0.4, 0.4) applied always, grayscale p = 0.2, flip, no blur.

With a ResNet backbone the paper's ImageNet recipe applies (Sec. 4.1): SGD with momentum 0.9,
lr 0.03 x B/256, weight decay 1e-4, batch 256, 200 epochs; queue of 65536 keys, m = 0.999.
Deviations: the paper divides the learning rate by 10 at epochs 120 and 160, and the
optimizer module has no step schedule, so it decays by a cosine without warm-up (v2's); the
reference converts to grayscale before the jitter and here the jitter comes first (the same
except for hue and clipping: brightness, contrast and saturation commute with a linear
grayscale); and configs/moco_v2.py's deviations (no weight decay on biases and BN
parameters, BN synchronised over the global batch instead of shuffled).

The default is configs/moco_v2.py's CPU recipe for Fashion-MNIST (ConvNet on 16-pixel crops,
LARS, a 4096-key queue, m = 0.99, SimCLR's brightness and contrast strength 0.8) with v1's
linear head, temperature and jitter probability. Not measured on its own.
"""

from ssl_jax.configs import common, moco_v2


def get_config(arg=None):
  c = moco_v2.get_config(arg)
  c.method.temperature = 0.07
  c.method.projector_hidden_dim = 0  # MoCo v1's linear head
  c.method.projector_output_dim = 128

  a = c.augment
  a.crop_scale = (0.2, 1.0)
  a.brightness, a.contrast, a.saturation, a.hue = 0.4, 0.4, 0.4, 0.4
  a.jitter_prob = 1.0
  a.grayscale_prob = 0.2
  a.blur_prob = 0.0
  if common.cpu_recipe(common.parse_arg(arg, symmetric=False)):
    a.brightness, a.contrast = 0.8, 0.8  # configs/moco_v2.py's CPU strength
  return c
