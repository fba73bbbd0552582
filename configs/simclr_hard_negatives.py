"""SimCLR with hard-negative sampling (Robinson et al. 2021).

  ssl-jax-train --config=configs/simclr_hard_negatives.py --workdir=workdirs/simclr_hard
  ssl-jax-train --config=configs/simclr_hard_negatives.py:backbone=resnet50,dataset=tfds:stl10 ...

Arguments: those of configs/simclr.py. The debiased loss of configs/simclr_debiased.py
(tau_plus = 0.1) with the negatives importance-weighted by exp(beta * s / t). The weights
depend on beta / t only: the paper's beta = 1.0 at t = 0.5 (their released command,
github.com/joshr17/HCL, and their best on STL10: 0.5, 1 and 2 were within 1.1 points, 6 was
4 points worse) is beta / t = 2, so beta = 2 t here: 1.0 with the ResNet recipe, 0.2 at the
CPU recipe's t = 0.1, where beta = 1.0 (beta / t = 10) learned more slowly (README, "Notes
from development"). Set --config.method.beta along with a new --config.method.temperature.
The CPU recipe and the ResNet recipe (Adam 1e-3, temperature 0.5, 400 epochs) are those of
configs/simclr_debiased.py, which the paper shares.
"""

from ssl_jax.configs import simclr_debiased


def get_config(arg=None):
  c = simclr_debiased.get_config(arg)
  c.method.negatives = 'hard'
  c.method.beta = 2.0 * c.method.temperature  # the paper's beta / t, see above
  return c
