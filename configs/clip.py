"""CLIP (Radford et al. 2021): image and text towers aligned by a symmetric InfoNCE.

  ssl-jax-train --config=configs/clip.py --workdir=workdirs/clip
  ssl-jax-train --config=configs/clip.py:backbone=vit_base,dataset=tfds:coco_captions ...
  ssl-jax-train --config=configs/clip.py:backbone=vit_base,dataset=pairs:/data/pairs.jsonl ...

Arguments: backbone (the image tower: convnet | resnet18 | resnet50 | vit_*), batch, epochs,
dataset (fashion_mnist_captions | tfds:coco_captions | pairs:<file.jsonl or .csv>), crop.

The default is the embedded demo: Fashion-MNIST with captions generated from each class's
name and a table of phrasings (held-out phrasings for the test split; `data/captions.py`),
the CPU ConvNet as the image tower on 16-pixel crops and a 2-block byte-level text
Transformer. Captions built from class names make it a check of the mechanics (training,
zero-shot prompts, retrieval), not a zero-shot result.

Elsewhere, the paper's recipe (its Sec. 2.5 and Table 19, ViT-B): batch 32,768, 32 epochs,
AdamW with lr 5e-4, weight decay 0.2, betas (0.9, 0.98), eps 1e-6, warm-up then cosine
decay, embedding dimension 512, temperature initialised at 0.07 and the logit scale clipped
at 100; a 12-block, 512-wide, 8-head causal text Transformer pooled at the end-of-text token,
77 tokens of context. The paper's BPE vocabulary needs a download; here the tokenizer is
byte-level by default, or a SentencePiece model trained on the training captions
(`python -m ssl_jax.data.text --train_sentencepiece ...`, then
`--config.text.tokenizer=sentencepiece:<file>.model`). Augmentation: a random crop only, as
the paper's.
"""

import math

import ml_collections

from ssl_jax import config_lib
from ssl_jax.configs import common

PAPER_BATCH = 32768
CPU_EPOCHS = 8.0


def parse_arg(arg):
  return config_lib.parse_arg(arg, backbone='convnet', batch=0, epochs=0.0,
                              dataset='fashion_mnist_captions', crop=0)


def text_config(cpu: bool) -> ml_collections.ConfigDict:
  """The text tower and tokenizer: CLIP's (77 tokens, 12 x 512) or the CPU demo's."""
  t = ml_collections.ConfigDict()
  t.tokenizer = 'bytes'          # or 'sentencepiece:<path>.model'
  t.context_length = 32 if cpu else 77  # the demo's captions are at most 31 bytes
  t.captions_per_image = 5       # COCO's five; the demo's K phrasings per image
  t.tower = 'text_micro' if cpu else 'text_base'
  t.causal = True                # CLIP's masked self-attention; False: bidirectional
  t.pooling = 'eot'              # the end-of-text token's features (CLIP), or 'mean'
  return t


def get_config(arg=None):
  arg = parse_arg(arg)
  c = common.method_config(arg, 'clip')
  c.method.embed_dim = 512
  c.method.init_log_scale = math.log(1 / 0.07)

  a = c.augment  # a random crop, nothing else
  a.crop_scale = (0.5, 1.0)
  a.flip_prob = 0.0
  a.jitter_prob = a.grayscale_prob = a.blur_prob = a.solarize_prob = 0.0

  c.optimizer.name = 'adamw'
  c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.98, 1e-6
  paper = common.ViTRecipe(base_lr=5e-4 * 256 / PAPER_BATCH, weight_decay=0.2,
                           warmup_epochs=0.2, batch=PAPER_BATCH, epochs=32.0, b2=0.98)
  common.set_backbone(c, arg, paper_epochs=paper.epochs, resnet_batch=paper.batch,
                      vit=paper, cpu_crop_scale=None)
  c.optimizer.name = 'adamw'  # also for ResNet and ConvNet image towers
  c.optimizer.lr_scaling = 'linear'
  c.optimizer.base_lr = paper.base_lr
  c.optimizer.weight_decay = paper.weight_decay
  c.optimizer.b2 = paper.b2
  cpu = common.cpu_recipe(arg)
  c.text = text_config(cpu)
  if cpu:
    c.method.embed_dim = 128
    c.num_epochs = arg.epochs or CPU_EPOCHS
    c.optimizer.base_lr = 1e-3
    c.optimizer.weight_decay = 0.1
    c.optimizer.warmup_epochs = 0.5
  return c
