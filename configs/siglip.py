"""SigLIP (Zhai et al. 2023): CLIP's towers trained with the pairwise sigmoid loss.

  ssl-jax-train --config=configs/siglip.py --workdir=workdirs/siglip

Arguments as configs/clip.py, from which this config starts. The paper's changes: the loss,
a learnable temperature t = exp(t') from t' = log 10 and bias from -10, and (its Sec. 4,
from-scratch SigLIP at batch 32k) AdamW with lr 1e-3, weight decay 1e-4 and beta2 0.95,
which it found to stabilise training. `method.chunked` (default True) computes the loss
without a global similarity matrix, passing text chunks around the devices.
"""

import math

from ssl_jax.configs import clip, common


def get_config(arg=None):
  c = clip.get_config(arg)
  c.method.name = 'siglip'
  c.method.init_log_scale = math.log(10.0)
  c.method.init_bias = -10.0
  c.method.chunked = True
  if not common.cpu_recipe(clip.parse_arg(arg)):
    c.optimizer.base_lr = 1e-3 * 256 / clip.PAPER_BATCH
    c.optimizer.weight_decay = 1e-4
    c.optimizer.b2 = 0.95
  return c
