r"""ResCom on CIFAR-100-LT / CIFAR-10-LT (Zhong et al., "Rebalanced Siamese
Contrastive Mining for Long-Tailed Recognition", arXiv 2203.11506).

Command (one accelerator is plenty; TFDS cifar100 prepared under data_dir,
from which `cifar_lt` builds the long-tailed split once):
  python -m contrastive.data.prepare cifar100 --data_dir=$HOME/tensorflow_datasets
  python -m contrastive.main --config=configs/rescom_cifar_lt.py:imbalance=100 \
      --workdir=/tmp/rescom_cifar100_lt --config.input.data_dir=$HOME/tensorflow_datasets

Hardware: one GPU or a TPU v3-8 (global batch 128).
Setting: the official CIFAR-100-LT config (`config/cifar100_imb001.yaml`):
Balanced Softmax on a linear classifier plus con_weight 0.5 x the
class-balanced supervised contrastive loss (effective-number weights, beta
0.999999) over the batch's two views, 1 hard positive (least similar) and
400 hard negatives (most similar) from a queue of 10 keys per class fed
with view 0's embeddings; tau 0.2, SGD lr 0.1 at batch 128, 400 epochs.
The long-tailed split is Cao et al.'s exponential profile (`cifar_lt`,
`contrastive/data/long_tail.py`), the test split the balanced 10k images.
Expected top-1 of the end-to-end classifier (`classifier_eval.json`, with
many/medium/few-shot groups at 100 / 20 training images): CIFAR-100-LT
53.8 / 58.0 / 66.1 at imbalance 100 / 50 / 10, CIFAR-10-LT 84.9 / 88.0 /
92.0 (ResCom README, ResNet-32).
Deviations: ResNet-18 with the CIFAR stem instead of ResNet-32 (not in the
model zoo; ResNet-18 is larger, so expect at least the README's figures if
the recipe transfers, which is unverified); head 512-BN-ReLU-128 rather
than 64-BN-ReLU-32; SimCLR's CIFAR augmentation on both views (the official
code's view recipes and RandAugment settings are not in the released config
and are unverified); the queue sees the global batch's view-0 keys in
batch-major order (the official code loops over its gathered batch the
same way); weight decay 5e-4 and the 5-epoch warm-up are ours.
Args: `dataset=cifar100|cifar10`, `imbalance=100|50|10`, `epochs=400`.
"""

from configs import common

IMBALANCES = (10, 50, 100)


def get_config(arg=None):
  args = common.parse_arg(arg, dataset="cifar100", imbalance=100, epochs=400)
  if args.dataset not in ("cifar10", "cifar100"):
    raise ValueError(f"dataset must be cifar10 or cifar100, got "
                     f"{args.dataset!r}.")
  if args.imbalance not in IMBALANCES:
    raise ValueError(f"imbalance must be one of {IMBALANCES}, got "
                     f"{args.imbalance}.")
  num_classes = 100 if args.dataset == "cifar100" else 10
  config = common.base_config()
  config.model.update(depth=18, width=1.0, cifar_stem=True,
                      linear_classes=num_classes)
  config.model.head.update(hidden_dims=(512,), out_dim=128, use_bn=True)
  config.loss.update(name="rescom", temperature=0.2, use_labels=True)
  # 400 hard negatives need (C - 1) x 10 >= 400 keys: CIFAR-10 has 90.
  config.loss.kwargs = dict(
      con_weight=0.5, num_hard_positives=1,
      num_hard_negatives=400 if num_classes == 100 else 90,
      effective_num_beta=0.999999)
  config.momentum.class_queue_size = 10
  config.input.update(
      dataset=f"cifar_lt/{args.dataset}_if{args.imbalance}", batch_size=128,
      image_size=32, shuffle_buffer=20_000)
  config.input.augment = common.simclr_augment(0.5, blur_prob=0.0,
                                               crop_area_min=0.2)
  config.optim.update(name="sgd", lr=0.1, lr_scaling="none",
                      weight_decay=5e-4, momentum=0.9, nesterov=False,
                      warmup_epochs=5)
  config.total_epochs = float(args.epochs)
  config.linear_eval.update(enabled=True, train_split="train",
                            test_split="test",
                            long_tail_thresholds=(100, 20))
  return config
