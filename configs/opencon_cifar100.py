r"""OpenCon on CIFAR-100, open world: 50 seen classes with half their images
labelled, 50 novel classes (Sun & Li, "OpenCon: Open-world Contrastive
Learning", TMLR 2023, arXiv 2208.02764).

Command (TFDS cifar100 prepared under data_dir; `open_world` derives the
partially labelled split from it on first use):
  python -m contrastive.main --config=configs/opencon_cifar100.py \
      --workdir=/tmp/opencon_cifar100 --config.input.data_dir=$HOME/tensorflow_datasets

Hardware: one GPU or a TPU v3-8 (global batch 512).
Setting (official `main_cifar.py` defaults): ResNet-18 (CIFAR stem),
head 512-BN-ReLU-128; L = SimCLR over the unlabelled images (tau 0.4) +
0.2 SupCon over the labelled ones (tau 0.1) + 0.1 prototype-pseudo-label
contrast over the unlabelled images flagged novel (below the 30th
percentile of the labelled images' standardised prototype scores; tau 0.7)
- 0.05 the entropy term; 100 prototypes moved by EMA (0.9); SGD lr 0.02,
momentum 0.9, wd 5e-4, cosine, 200 epochs.
Expected (CIFAR-100 test, clustering accuracy with Hungarian matching,
`clustering_eval.json`): the paper's all / seen / novel figures are
unverified (methods.md section 18), so none is quoted; ORCA's protocol is
implemented (`contrastive/evaluation/clustering.py`).
Deviations: trains from scratch (the official run starts from ORCA's
SimCLR-pretrained ResNet-18, not provided here); SimCLR's CIFAR
augmentation on both views; everything over the global batch (the
official runs on one GPU); details in contrastive/losses/opencon.py.
Args: `epochs=200`.
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, epochs=200)
  config = common.base_config()
  config.model.update(depth=18, width=1.0, cifar_stem=True)
  config.model.head.update(hidden_dims=(512,), out_dim=128, use_bn=True)
  config.loss.update(name="opencon", temperature=0.4, use_labels=False)
  config.loss.kwargs = dict(num_seen=50, labeled_ratio=0.5,
                            supcon_temperature=0.1, semicon_temperature=0.7,
                            w_simclr=1.0, w_supcon=0.2, w_semicon=0.1,
                            w_ent=0.05)
  config.momentum.prototype_momentum = 0.9
  config.input.update(dataset="open_world/cifar100_seen50_labeled50",
                      batch_size=512, image_size=32, shuffle_buffer=50_000)
  config.input.augment = common.simclr_augment(0.5, blur_prob=0.0,
                                               crop_area_min=0.2)
  config.optim.update(name="sgd", lr=0.02, lr_scaling="none",
                      weight_decay=5e-4, momentum=0.9, nesterov=False,
                      warmup_epochs=0)
  config.total_epochs = float(args.epochs)
  config.linear_eval.update(enabled=True, train_split="train",
                            test_split="test", knn_k=(20, 200))
  return config
