r"""InterCLR on ImageNet-1k: MoCo v2 plus inter-image invariance from an
online-clustered memory bank (Xie et al., "Delving into Inter-Image
Invariance for Unsupervised Visual Representations", IJCV 2022, arXiv
2008.11702).

Command (8 accelerators; TFDS imagenet2012 under data_dir):
  python -m contrastive.main --config=configs/interclr_imagenet.py \
      --workdir=gs://BUCKET/interclr_r50_200ep --config.input.data_dir=gs://BUCKET/tfds

Hardware: as MoCo v2 (configs/moco_imagenet.py): global batch 256 (the
official 8 x 32), 8 GPUs or a TPU v3-8 / v4-8. The memory bank (1.28M x 128
float32, 656 MB) and its clusters are split over the devices' rows
(`sharding.PER_IMAGE_STATE`); each step gathers it for the nearest-row
search.
Setting (mmselfsup `interclr_moco` config, the official implementation):
MoCo v2's ResNet-50 recipe (tau 0.2, queue 65536, momentum 0.999, SGD lr
0.03, cosine, 200 epochs, head 2048-ReLU-128) with L = 0.75 L_intra (MoCo)
+ 0.25 L_inter; L_inter is MarginNCE (margin -0.5) of each query against a
random memory-bank feature of its own k-means cluster and 16384 features
drawn from the 128000 bank rows nearest to it, its own cluster excluded;
10000 clusters of the bank.
Expected linear-eval top-1 (ImageNet val, mmselfsup's feature5 protocol):
68.04 (mmselfsup README, 200 epochs). Ours: MoCo's linear protocol
(`linear_eval.protocol="moco"`).
Deviations: those of configs/moco_imagenet.py (symmetrised MoCo, both keys
enqueued, global BN); every view is a query of L_inter (the official
uses one); the bank stores each image's newest key-encoder feature (update
rate 1) and starts as random unit vectors, filled over the first epoch;
the bank is re-clustered every epoch by 10 Lloyd iterations from random
rows (the official hook's interval and seeding unverified).
Args: `epochs=200`.
"""

from configs import common
from configs import moco_imagenet


def get_config(arg=None):
  args = common.parse_arg(arg, epochs=200)
  config = moco_imagenet.mocov2_config(args.epochs)
  config.loss.update(name="interclr", temperature=0.2, use_labels=False)
  config.loss.kwargs = dict(intra_weight=0.75, inter_weight=0.25,
                            margin=-0.5, num_negatives=16384,
                            semi_hard_pool=128000)
  config.momentum.update(bank_update_rate=1.0, bank_clusters=10_000,
                         bank_cluster_every_epochs=1.0,
                         bank_kmeans_iterations=10)
  config.input.example_index = True
  return config
