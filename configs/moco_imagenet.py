r"""MoCo v2 on ImageNet-1k (Chen, Fan, Girshick, He, arXiv 2003.04297).

Command (8 accelerators; TFDS imagenet2012 under data_dir):
  python -m contrastive.main --config=configs/moco_imagenet.py \
      --workdir=gs://BUCKET/mocov2_r50_200ep --config.input.data_dir=gs://BUCKET/tfds

Hardware: global batch 256, as the facebookresearch/moco README's 8 V100 GPUs
(53 h for 200 epochs there); a TPU v3-8 / v4-8 or 8 GPUs.
Setting (README command with `--mlp --moco-t 0.2 --aug-plus --cos`, the
main_moco.py defaults): ResNet-50, head 2048-ReLU-128 without BN, tau 0.2,
queue 65536, key encoder an EMA with constant momentum 0.999, SGD momentum
0.9, lr 0.03 at batch 256 (linear scaling), wd 1e-4, cosine without
warm-up, 200 epochs; augmentation crops of 0.2-1, colour jitter
0.4/0.4/0.4/0.1 (strength 0.5) with p 0.8, grayscale 0.2, blur 0.5, flip.
Expected linear-eval top-1 (ImageNet val): 67.5 +- 0.1 (README, mean of 5
runs; released checkpoint 67.7; methods.md quotes 67.5, there unverified;
read here from the README). Linear evaluation: MoCo's main_lincls.py
(`linear_eval.protocol="moco"`: SGD lr 30, batch 256, 100 epochs, steps at
60 / 80).
Deviations from the official code:
  - The loss is symmetrised (both views are queries, MoCo v3's pairing) and
    the other images' keys of the global batch are negatives next to the
    queue (contrastive/losses/moco.py); MoCo v2 uses one direction per image
    and the queue only. Each image gives two anchors per step, twice MoCo
    v2's queries per epoch; expect about 67.5 or above, not exactly it.
  - Both keys of every image are enqueued, so the 65536-entry queue spans
    the last 32768 images (128 steps), half MoCo v2's span; set
    `--config.momentum.queue_size=131072` for the same span.
  - BatchNorm statistics are global over the batch (synchronised), not
    MoCo v2's per-GPU BN with shuffled keys.
Arg: number of epochs (default 200; the README's 800-epoch run: 71.1).
"""

from configs import common


def mocov2_config(epochs: int):
  """MoCo v2's ResNet-50 ImageNet recipe (also MoCHi's base)."""
  config = common.base_config()
  config.model.update(depth=50, width=1.0)
  # main_moco.py `--mlp`: fc(2048, 2048)-ReLU-fc(2048, 128), no BN.
  config.model.head.update(hidden_dims=(2048,), out_dim=128, use_bn=False)
  config.loss.update(name="moco", temperature=0.2, use_labels=False)
  config.loss.kwargs = dict()
  config.momentum.update(base=0.999, schedule="constant", queue_size=65536)
  config.input.update(dataset="imagenet2012", batch_size=256, image_size=224)
  # `--aug-plus`: ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8 is strength 0.5.
  config.input.augment = common.simclr_augment(0.5, blur_prob=0.5,
                                               crop_area_min=0.2)
  config.optim.update(name="sgd", lr=0.03, lr_scaling="linear",
                      weight_decay=1e-4, momentum=0.9, nesterov=False,
                      warmup_epochs=0.0)
  config.total_epochs = float(epochs)
  config.linear_eval.update(enabled=True, protocol="moco",
                            train_split="train", test_split="validation",
                            knn_k=(20, 200))
  # About every 5 epochs at batch 256 (5004 steps per epoch).
  config.online_eval.update(every_steps=25_000,
                            knn_train_split="train[:10%]")
  return config


def get_config(arg=None):
  args = common.parse_arg(arg, epochs=200)
  return mocov2_config(args.epochs)
