"""SimCLR with the decoupled contrastive loss, DCL or DCLW (Yeh et al. 2022).

  ssl-jax-train --config=configs/simclr_decoupled.py --workdir=workdirs/simclr_decoupled
  ssl-jax-train --config=configs/simclr_decoupled.py:weighted=true --workdir=workdirs/simclr_dclw
  ssl-jax-train --config=configs/simclr_decoupled.py:backbone=resnet50,dataset=tfds:imagenet2012 ...

Arguments: those of configs/simclr.py, and weighted (false: DCL; true: DCLW, the positive term
weighted by the negative von Mises-Fisher weights with sigma = 0.5, the paper's and lightly's).
NT-Xent with the positive pair removed from the denominator (`ssl_jax/losses/decoupled.py`).

The default is configs/simclr.py's CPU recipe for Fashion-MNIST (ConvNet, 16-pixel crops,
evaluation at 28 pixels, LARS, temperature 0.1, 16 epochs) with the decoupled loss. With a
ResNet backbone the paper's ImageNet recipe applies, which is SimCLR's at a small batch:
batch 256, 200 epochs, LARS with weight decay 1e-6 and 10 warm-up epochs, temperature 0.1, a
2048-wide projector to 128 dimensions, lr 0.075 x sqrt(B) (SimCLR's square-root scaling for
small batches, App. B.1: 1.2 at batch 256), as lightly's ResNet-50 DCL and DCLW ImageNet
benchmarks set it (benchmarks/imagenet/resnet50/dcl*.py). Deviations: the paper's text was not
available here, so the learning rate is lightly's; the paper's best result (68.2 %) comes from
further tuned hyperparameters not reproduced here. A ViT takes configs/simclr.py's recipe.
"""

from ssl_jax.configs import common, simclr


def get_config(arg=None):
  parsed = common.parse_arg(arg, weighted=False)
  # configs/simclr.py knows the shared arguments only.
  shared = ','.join(item for item in (arg or '').split(',')
                    if item and item.split('=', 1)[0].strip() != 'weighted')
  c = simclr.get_config(shared or None)
  c.method.negatives = 'decoupled'
  c.method.dcl_weighting = 'vmf' if parsed.weighted else 'none'
  c.method.dcl_sigma = 0.5  # read with 'vmf' only; set always, so an override can switch
  if c.model.name.startswith('resnet'):  # a ViT keeps common.py's optimizer recipe
    c.optimizer.base_lr = 0.075
    c.optimizer.lr_scaling = 'sqrt'
    c.num_epochs = parsed.epochs or 200.0
  return c
