"""MoCo v3 (Chen, Xie & He 2021).

  ssl-jax-train --config=configs/moco_v3.py --workdir=workdirs/moco_v3
  ssl-jax-train --config=configs/moco_v3.py:backbone=resnet50,dataset=tfds:imagenet2012,batch=4096 ...

Arguments: backbone (convnet | resnet18 | resnet34 | resnet50), batch (0: the recipe's, 4096
for ResNets, 256 for the ConvNet), epochs, dataset (fashion_mnist | tfds:<name> |
folder:<path>), crop (training crop side; 0 picks one for the dataset).

With a ResNet backbone the paper's ResNet-50 recipe applies: batch 4096, LARS with
lr 0.3 x B/256, weight decay 1.5e-6, 10 warm-up epochs then cosine decay, 300 epochs;
temperature 1.0; momentum m from 0.99 to 1 on a cosine schedule; projector 3-layer MLP
(4096 hidden, 256 out) and predictor 2-layer MLP (4096 hidden), BN on every layer; BYOL's
asymmetric augmentation (blur p = 1.0 / 0.1, solarisation p = 0 / 0.2, colour jitter
(0.4, 0.4, 0.2, 0.1)) with crops of scale (0.2, 1) as in the reference code. The reference
code's ResNet variant differs slightly: a 2-layer projector and no BN after the predictor's
last layer (method.projector_num_layers=2, method.predictor_last_bn=False), and its
100-epoch run uses lr 0.6, weight decay 1e-6.

The default is the CPU recipe for Fashion-MNIST, modelled on configs/simclr.py's (a small
ConvNet on 16-pixel crops, evaluated at 20 pixels, LARS with linear scaling, 16 epochs),
with heads narrowed to 512 hidden / 128 out and the temperature lowered to 0.2 (the ViT
recipe's value; SimCLR measured best at 0.1 on this data, README). Not measured on its own.
"""

from ssl_jax.configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg)
  c = common.method_config(arg, 'moco_v3')
  c.method.temperature = 1.0
  c.method.target_momentum = 0.99
  c.method.projector_hidden_dim = 4096
  c.method.projector_output_dim = 256
  c.method.projector_num_layers = 3
  c.method.projector_last_bn = True
  c.method.predictor_hidden_dim = 4096
  c.method.predictor_last_bn = True

  c.optimizer.name = 'lars'
  c.optimizer.base_lr = 0.3
  c.optimizer.lr_scaling = 'linear'
  c.optimizer.weight_decay = 1.5e-6

  common.byol_augmentation(c.augment)
  c.augment.crop_scale = (0.2, 1.0)
  common.set_backbone(c, arg, paper_epochs=300.0, resnet_batch=4096)
  if arg.backbone == 'convnet':
    c.method.projector_hidden_dim = c.method.predictor_hidden_dim = 512
    c.method.projector_output_dim = 128
    c.method.temperature = 0.2
    c.optimizer.weight_decay = 1e-6
  return c
