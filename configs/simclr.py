"""SimCLR (Chen et al. 2020).

  python -m ssl_jax.main --config=configs/simclr.py --workdir=/tmp/simclr
  python -m ssl_jax.main --config=configs/simclr.py:backbone=resnet50,batch=4096,epochs=800 ...

The default is tuned for Fashion-MNIST on a 2-core CPU in about 10 minutes (see README);
`backbone=resnet18` / `resnet50` with the paper's settings are for accelerators.
"""

from ssl_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, backbone='convnet', batch=256, epochs=10.0,
                             dataset='fashion_mnist')
  c = config_lib.base_config()
  c.batch_size = arg.batch
  c.num_epochs = arg.epochs
  c.data.name = arg.dataset

  c.method.name = 'simclr'
  c.method.temperature = 0.2
  c.method.projector_hidden_dim = 512
  c.method.projector_output_dim = 128
  c.method.projector_num_layers = 2
  c.method.projector_last_bn = False

  c.model.name = arg.backbone
  if arg.backbone.startswith('resnet'):
    # The paper's ImageNet recipe: LARS, lr 0.3 x B/256, 10 warm-up epochs, wd 1e-6.
    c.method.temperature = 0.1
    c.method.projector_hidden_dim = 2048
    c.optimizer.name = 'lars'
    c.optimizer.base_lr = 0.3
    c.optimizer.weight_decay = 1e-6
    c.optimizer.warmup_epochs = 10.0
  else:
    c.optimizer.name = 'lars'
    c.optimizer.base_lr = 0.3
    c.optimizer.weight_decay = 1e-6
    c.optimizer.warmup_epochs = 1.0
  return c
