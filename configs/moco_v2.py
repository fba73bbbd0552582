"""MoCo v2 (He et al. 2020; Chen et al. 2020, "Improved baselines").

  ssl-jax-train --config=configs/moco_v2.py --workdir=workdirs/moco_v2
  ssl-jax-train --config=configs/moco_v2.py:backbone=resnet50,dataset=tfds:imagenet2012 ...

Arguments: backbone (convnet | resnet18 | resnet34 | resnet50), batch, epochs, dataset
(fashion_mnist | tfds:<name> | folder:<path>), crop (training crop side; 0 picks one for the
dataset), symmetric (add the swapped-views loss term; off in the paper).

With a ResNet backbone the paper's ImageNet recipe applies (MoCo v2, 200 epochs): SGD with
momentum 0.9, lr 0.03 x B/256, weight decay 1e-4, cosine decay without warm-up; queue of
65536 keys, momentum m = 0.999, temperature 0.2; MLP head 2048-128 (fc-ReLU-fc); crops of
scale (0.2, 1), colour jitter (0.4, 0.4, 0.4, 0.1) with p = 0.8, grayscale p = 0.2, blur
p = 0.5. Deviations: the optimizer leaves biases and BN parameters out of weight decay
(the project's mask; the reference decays them), and BN is synchronised over the global
batch by default instead of shuffled per GPU (`ssl_jax/methods/moco_v2.py` says why;
`method.shuffle_bn_group_size=32` gives a shuffled BN with the paper's 32-image groups).

The default is the CPU recipe for Fashion-MNIST, modelled on configs/simclr.py's (a small
ConvNet on 16-pixel crops, evaluated at 28 pixels, LARS with linear scaling, 16 epochs),
adjusted for MoCo (not measured on its own: the README's numbers are SimCLR's): a 4096-key
queue (16 batches), m = 0.99 (a run of ~3,700 steps is too short for 0.999, whose key
encoder would lag ~1,000 steps), and SimCLR's stronger colour jitter (weakening SimCLR's
augmentation cost it 2.4 points on these grayscale images). Do not lower m much further:
with m = 0.9 a short run collapsed while its contrastive accuracy rose to 0.95
(`ssl_jax/methods/moco_v2.py` says why).
"""

from ssl_jax.configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, symmetric=False)
  c = common.method_config(arg, 'moco_v2')
  c.method.temperature = 0.2
  c.method.queue_size = 65536
  c.method.target_momentum = 0.999
  c.method.projector_hidden_dim = 2048
  c.method.projector_output_dim = 128
  c.method.symmetric = arg.symmetric
  # 0: BatchNorm synchronised over the global batch. > 0: shuffled BN over groups of this
  # many images, shuffle_bn_groups groups per shuffled block (the paper: 32 images x 8 GPUs).
  c.method.shuffle_bn_group_size = 0
  c.method.shuffle_bn_groups = 8

  c.optimizer.name = 'sgd'
  c.optimizer.base_lr = 0.03
  c.optimizer.lr_scaling = 'linear'
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4

  a = c.augment
  a.crop_scale = (0.2, 1.0)
  a.brightness, a.contrast, a.saturation, a.hue = 0.4, 0.4, 0.4, 0.1
  a.jitter_prob = 0.8
  a.grayscale_prob = 0.2
  a.blur_prob = 0.5

  common.set_backbone(c, arg, paper_epochs=200.0, resnet_batch=256, resnet_warmup_epochs=0.0)
  if common.cpu_recipe(arg):
    a.brightness, a.contrast = 0.8, 0.8  # SimCLR's strength: better here (README)
    c.method.queue_size = 4096
    c.method.target_momentum = 0.99
    c.method.projector_hidden_dim = 512
  if arg.backbone == 'convnet':  # a ViT's AdamW is common.py's
    c.optimizer.name = 'lars'
    c.optimizer.base_lr = 0.3
    c.optimizer.weight_decay = 1e-6
  return c
