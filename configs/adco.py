"""AdCo (Hu et al. 2021): MoCo-style contrast against a bank of adversarially trained
negatives.

  ssl-jax-train --config=configs/adco.py --workdir=workdirs/adco
  ssl-jax-train --config=configs/adco.py:backbone=resnet50,dataset=tfds:imagenet2012 ...

Arguments: backbone (convnet | resnet18 | resnet34 | resnet50), batch, epochs, dataset
(fashion_mnist | tfds:<name> | folder:<path>), crop (training crop side; 0 picks one for the
dataset).

With a ResNet backbone the paper's ImageNet recipe applies (github.com/maple-research-lab/AdCo,
README commands and ops/argparser.py): K = 65536 negatives, encoder temperature 0.12, bank
temperature 0.02, bank learning rate 3 with momentum 0.9 and weight decay 1e-4, bank
initialised with the first keys, key-encoder momentum 0.999, symmetric loss (70.6 % vs 68.6 %
top-1 without it at 200 epochs, single crop), SGD lr 0.03 x B/256 with momentum 0.9 and
weight decay 1e-4, cosine decay, batch 256, 200 epochs, a 2048-wide projector to 128.

The default is the CPU recipe for Fashion-MNIST of configs/simclr.py (ConvNet, 16-pixel
crops, evaluation at 28 pixels, LARS with linear scaling, 16 epochs), with a bank of 4096
(16 batches; the paper's 8192 and 16384 were within 0.4 points of 65536) and key-encoder
momentum 0.99, which suits a run of a few thousand steps as 0.999 suits MoCo's 1M.
"""

from ssl_jax.configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg)
  c = common.method_config(arg, 'adco')
  c.method.temperature = 0.12            # encoder's softmax temperature (moco_t)
  c.method.memory_temperature = 0.02     # the adversary's temperature (mem_t)
  c.method.memory_lr = 3.0
  c.method.memory_momentum = 0.9
  c.method.memory_weight_decay = 1e-4
  c.method.queue_size = 65536            # the bank of adversarial negatives
  c.method.init_bank_from_keys = True
  c.method.target_momentum = 0.999
  c.method.symmetric = True
  c.method.projector_hidden_dim = 2048
  c.method.projector_output_dim = 128
  c.method.projector_num_layers = 2
  c.method.projector_last_bn = False

  c.optimizer.name = 'sgd'
  c.optimizer.base_lr = 0.03
  c.optimizer.lr_scaling = 'linear'
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4

  common.set_backbone(c, arg, paper_epochs=200.0, resnet_batch=256, resnet_warmup_epochs=0.0)
  if common.cpu_recipe(arg):
    c.method.projector_hidden_dim = 512
    c.method.queue_size = 4096
    c.method.target_momentum = 0.99
  if arg.backbone == 'convnet':  # a ViT's AdamW is common.py's
    c.optimizer.name = 'lars'
    c.optimizer.base_lr = 0.3
    c.optimizer.weight_decay = 1e-6
  return c
