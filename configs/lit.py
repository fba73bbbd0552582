"""LiT (Zhai et al. 2022): a text tower tuned to a locked image tower of this library.

  ssl-jax-train --config=configs/simclr.py --workdir=workdirs/simclr       # the image tower
  ssl-jax-train --config=configs/lit.py:image_tower=workdirs/simclr --workdir=workdirs/lit

Arguments: image_tower (the workdir of any vision run: its evaluated encoder is locked),
batch, epochs, dataset (fashion_mnist_captions | tfds:coco_captions | pairs:<file>), loss
(softmax, the paper's, or sigmoid). The tower's model block, training crop and evaluation
size are copied from its workdir's config.json, so the network has the checkpoint's
structure and the tower sees images as it was evaluated.

Off the CPU demo, the paper's recipe: batch 16,384 (its Sec. 4 ablations; 32k for the
largest runs), AdamW with lr 1e-3 and weight decay 1e-4, warm-up then cosine decay, the
contrastive softmax loss, no projection on the image side (the locked features are the
embedding), and CLIP's text tower. On the demo: the CPU text tower and 8 epochs, as
configs/clip.py.
"""

import math
import os

from ssl_jax import config_lib
from ssl_jax.configs import clip, common

PAPER_BATCH = 16384


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, image_tower='', batch=0, epochs=0.0,
                             dataset='fashion_mnist_captions', loss='softmax')
  c = clip.get_config(f'dataset={arg.dataset}')
  c.method.name = 'lit'
  c.method.image_tower = arg.image_tower
  c.method.image_tower_step = 0           # 0: the latest checkpoint
  c.method.loss = arg.loss
  c.method.init_bias = -10.0              # the sigmoid loss's (SigLIP's) initial bias
  if arg.loss == 'sigmoid':
    c.method.init_log_scale = math.log(10.0)
  tower_config = os.path.join(arg.image_tower, 'config.json')
  if arg.image_tower and os.path.exists(tower_config):
    tower = config_lib.load_json(tower_config)
    c.model = tower.model
    c.augment.crop_size = tower.eval.image_size or tower.augment.crop_size
    c.eval.image_size = tower.eval.image_size
  # Else method.image_tower's check names the fix before any work.
  if common.IMAGE_SIDE.get(arg.dataset, 224) > 28:  # real data: the paper's recipe
    c.text = clip.text_config(cpu=False)
    c.batch_size = arg.batch or PAPER_BATCH
    c.optimizer.base_lr = 1e-3 * 256 / PAPER_BATCH
    c.optimizer.weight_decay = 1e-4
  else:
    c.batch_size = arg.batch or c.batch_size
  c.num_epochs = arg.epochs or c.num_epochs
  return c
