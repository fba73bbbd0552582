"""DeepCluster-v2 (Caron et al. 2020, SwAV paper App. B).

  ssl-jax-train --config=configs/deepcluster_v2.py --workdir=workdirs/deepcluster_v2
  ssl-jax-train --config=configs/deepcluster_v2.py:backbone=resnet50,dataset=tfds:imagenet2012 ...

Arguments: backbone (convnet | resnet18 | resnet34 | resnet50), batch (0 picks the recipe's),
epochs (0 picks the recipe's), dataset (fashion_mnist | tfds:<name> | folder:<path>), crop
(training crop side; 0 picks one for the dataset).

With a ResNet backbone the defaults are the paper's ImageNet recipe (the authors'
deepclusterv2_800ep_pretrain.sh and main_deepclusterv2.py's defaults): batch 4096 (64 x 64
GPUs), 800 epochs (the paper also reports 400: `epochs=400`), LARS with lr 4.8 (0.3 x B/256),
10 warm-up epochs and cosine decay, weight decay 1e-6; projector 2048 -> 128, three heads of
3000 prototypes (k-means centroids, 10 iterations, recomputed every epoch), temperature 0.1,
multi-crop 2 x 224 (scale 0.14-1) + 6 x 96 (scale 0.05-0.14), SimCLR's colour distortion and
blur. The first epoch is the reference's memory-filling pass (`init_memory`, outside its
epochs: methods/deepcluster_v2.py), so the run has one more epoch and the warm-up one more,
which keeps 800 trained epochs with 10 of warm-up; the warm-up then starts from lr 4.8 / 11
instead of the script's 0.3, and the cosine ends at 0 instead of 0.0048 (options this repo's
schedule does not have).

The default is the CPU recipe for Fashion-MNIST, on the ConvNet and crops of configs/swav.py
(16-pixel global crops, 7-pixel local crops); see the values set below for what was changed
and why.
"""

from ssl_jax.configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg)
  c = common.method_config(arg, 'deepcluster_v2')
  m = c.method
  m.projector_hidden_dim = 2048
  m.projector_output_dim = 128
  m.num_clusters = (3000, 3000, 3000)  # one k-means clustering per head
  m.temperature = 0.1
  m.kmeans_iterations = 10

  c.optimizer.name = 'lars'
  c.optimizer.base_lr = 0.3
  c.optimizer.lr_scaling = 'linear'
  c.optimizer.weight_decay = 1e-6

  a = c.augment
  a.crop_scale = (0.14, 1.0)
  a.num_local_crops = 6
  a.local_crop_size = 0         # crop_size * 96 / 224
  a.local_crop_scale = (0.05, 0.14)

  # The global crops keep their scale (0.14, 1): the local crops take (0.05, 0.14).
  common.set_backbone(c, arg, paper_epochs=800.0, resnet_batch=4096, cpu_crop_scale=None)
  # Epoch 0 fills the memory bank with the networks frozen (the reference's init_memory):
  # one more epoch, and one more of warm-up, so that the trained epochs keep theirs.
  c.num_epochs += 1
  c.optimizer.warmup_epochs += 1
  if common.cpu_recipe(arg):
    m.projector_hidden_dim = 512
    # Three heads of 300 clusters for the 60,000 images: about 200 images a cluster, of the
    # order of the paper's 430 (3,000 for ImageNet's 1.28M), and 30 clusters a class, finer
    # than the 10 classes as 3,000 is than ImageNet's 1,000. Unlike SwAV's prototypes,
    # these need not be fewer than a batch: k-means runs on the whole memory bank. Each
    # epoch's k-means (3 x 10 iterations over 60,000 x 128) costs seconds on a CPU.
    m.num_clusters = (300, 300, 300)
  return c
