r"""CMC on ImageNet-1k: contrastive multiview coding of the L and ab channels
(Tian et al., ECCV 2020, arXiv 1906.05849).

Command (8 accelerators; TFDS imagenet2012 under data_dir):
  python -m contrastive.main --config=configs/cmc_imagenet.py \
      --workdir=gs://BUCKET/cmc_r50_240ep --config.input.data_dir=gs://BUCKET/tfds

Hardware: 8 accelerators, e.g. one TPU v3-8 or v4-8, global batch 256
(the official ResNet-50 runs: batch 128 on 8 GPUs).
Setting: one random crop (area 0.08-1) + flip + colour jitter per image,
converted to Lab and split into L and ab (`model.modalities="lab"`), each
embedded by its own ResNet-50 at half width (the two together about one
ResNet-50; the official "resnet50v1" split, width unverified) with a
linear 128-d head; the full-graph objective over the two views (for two
views the same as the core view), tau 0.07; SGD lr 0.03 at batch 256
(linear scaling), momentum 0.9, wd 1e-4, cosine, 240 epochs.
Expected linear-eval top-1 (ImageNet val) of the concatenated L and ab
features: about 63 for ResNet-50 (CMC README's table; its later version
with a wider split and RandAugment about 70.6 is unverified); CMC's linear
protocol uses lr 30 (`linear_eval.protocol="moco"` is that recipe).
Deviations: negatives are the global batch (255 per anchor here), not the
official memory bank of K = 4096 features per view (NCE or softmax, bank
momentum 0.5), so expect less; the Lab channels are scaled by fixed
constants (L / 100, ab / 128) instead of the official per-channel mean and
std; the learning rate and schedule are ours (unverified).
Args: `epochs=240`, `width=0.5` (per view).
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, epochs=240, width=0.5)
  config = common.base_config()
  config.model.update(name="multiview_resnet", modalities="lab", depth=50,
                      width=args.width)
  config.model.head.update(hidden_dims=(), out_dim=128, use_bn=False)
  config.loss.update(name="cmc", temperature=0.07, use_labels=False)
  config.loss.kwargs = dict(graph="full_graph")
  config.input.update(dataset="imagenet2012", batch_size=256, image_size=224,
                      views=1)
  config.input.augment = common.simclr_augment(0.5, blur_prob=0.0,
                                               crop_area_min=0.08)
  config.optim.update(name="sgd", lr=0.03, lr_scaling="linear",
                      weight_decay=1e-4, momentum=0.9, nesterov=False,
                      warmup_epochs=0.0)
  config.total_epochs = float(args.epochs)
  config.linear_eval.update(enabled=True, protocol="moco",
                            train_split="train", test_split="validation",
                            knn_k=(20, 200))
  config.online_eval.update(every_steps=25_000,
                            knn_train_split="train[:10%]")
  return config
