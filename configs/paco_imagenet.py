r"""PaCo / GPaCo on ImageNet-1k and ImageNet-LT (Cui et al., "Parametric
Contrastive Learning", ICCV 2021, arXiv 2107.12028; "Generalized Parametric
Contrastive Learning", TPAMI 2023, arXiv 2209.12400).

Command (8 accelerators; TFDS imagenet2012 or imagenet_lt under data_dir):
  python -m contrastive.main --config=configs/paco_imagenet.py:paco \
      --workdir=gs://BUCKET/paco_r50_400ep --config.input.data_dir=gs://BUCKET/tfds
  ImageNet-LT: `--config=configs/paco_imagenet.py:paco,dataset=imagenet_lt`.

Hardware: the official scripts ran 8 GPUs (ImageNet, batch 256 / 512) and 4
GPUs (ImageNet-LT, batch 128); a TPU v3-8 / v4-8 or 8 GPUs.
Setting (dvlab-research/Parametric-Contrastive-Learning scripts; methods.md
section 13): ResNet-50, MoCo v2 head 2048-ReLU-128, a linear classifier on
the pooled features whose logits are the class centres
(`model.linear_classes`), labels in the loss, labelled queue K = 8192,
tau (`moco-t`) 0.2, beta 1, gamma 1, SGD momentum 0.9 with 10 warm-up
epochs + cosine (the training scripts' argparse defaults; PaCo's
Full-ImageNet script itself not read), 400 epochs.
  paco, imagenet2012  (PaCo/Full-ImageNet/sh/train_resnet50.sh): batch 256,
      lr 0.04, wd 1e-4, alpha 0.05, key encoder momentum 0.999 (constant).
  gpaco, imagenet2012 (GPaCo/LT/sh/ImageNet/train_resnet50.sh): batch 512,
      lr 0.08, wd 1e-4, alpha 0.05, label smoothing 0.1, no momentum
      encoder (the queue is kept).
  paco, imagenet_lt   (PaCo/LT/sh/ImageNetLT_train_R50.sh, paco_lt.py
      defaults): batch 128, lr 0.02, wd 5e-4, alpha 0.05, momentum 0.999.
  gpaco, imagenet_lt  (GPaCo/LT/sh/LT/ImageNetLT_train_R50.sh): batch 128,
      lr 0.04, wd 5e-4, alpha 0.045, label smoothing 0.1.
The learning rates are written per 256 images (linear scaling) so that
changing the batch keeps the scripts' ratio.
Expected top-1 of the joint classifier itself (`classifier_eval.json`, not a
linear probe; official README, methods.md section 13): ImageNet PaCo 79.3,
GPaCo 79.7 (val); ImageNet-LT PaCo 57.0, GPaCo 58.5 (ImageNet-LT test =
the ImageNet val images). The linear probe and kNN of the frozen encoder
run as for every method.
Data: TFDS `imagenet_lt` (train 115.8k long-tailed, validation 20k, test
= the 50k ImageNet val images) is built from the manually downloaded
ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (`python -m
contrastive.data.prepare imagenet_lt --data_dir=DIR --manual_dir=...`,
which also fetches the ImageNet_LT split lists); the user must provide those archives.
Deviations:
  - ImageNet-LT: the log prior of the class centres, as the official LT
    code's `cal_weight_for_classes`, comes from `config.loss.class_prior`:
    the trainer counts the training split's classes once at start (one
    pass over its records, images not decoded).
  - SimCLR-style augmentation on both views (crops 0.08-1, jitter strength
    0.5 with p 1, grayscale 0.2, blur 0.5, the official `sim` view), then
    RandAugment(2, 10) on view 0 (PaCo's query view; GPaCo: on both views)
    with timm's per-layer probability 0.5 (`input.augment.randaugment_*`);
    timm's magnitude noise (`mstd0.5`) is not implemented, and the official
    query view has no grayscale or blur, which view 0 keeps here.
  - PaCo: both views are queries (anchors) and both keys are enqueued;
    the official PaCo has one query view and enqueues one key per image.
    (GPaCo's two views are both anchors officially too.)
Args: `method=paco|gpaco`, `dataset=imagenet2012|imagenet_lt`, `epochs=400`.
"""

from configs import common

# (method, dataset) -> batch, lr per 256 images, weight decay, alpha.
SETTINGS = {
    ("paco", "imagenet2012"): dict(batch_size=256, lr=0.04,
                                   weight_decay=1e-4, alpha=0.05),
    ("gpaco", "imagenet2012"): dict(batch_size=512, lr=0.04,
                                    weight_decay=1e-4, alpha=0.05),
    ("paco", "imagenet_lt"): dict(batch_size=128, lr=0.04,
                                  weight_decay=5e-4, alpha=0.05),
    ("gpaco", "imagenet_lt"): dict(batch_size=128, lr=0.08,
                                   weight_decay=5e-4, alpha=0.045),
}


def get_config(arg=None):
  args = common.parse_arg(arg, method="paco", dataset="imagenet2012",
                          epochs=400)
  if (args.method, args.dataset) not in SETTINGS:
    raise ValueError(
        f"method must be 'paco' or 'gpaco' and dataset 'imagenet2012' or "
        f"'imagenet_lt', got {args.method!r}, {args.dataset!r}.")
  setting = SETTINGS[(args.method, args.dataset)]
  config = common.base_config()
  config.model.update(depth=50, width=1.0, linear_classes=1000)
  config.model.head.update(hidden_dims=(2048,), out_dim=128, use_bn=False)
  config.loss.update(name=args.method, temperature=0.2, use_labels=True)
  config.loss.kwargs = dict(
      alpha=setting["alpha"], beta=1.0, gamma=1.0,
      label_smoothing=0.1 if args.method == "gpaco" else 0.0)
  # GPaCo has no momentum encoder: only the queue size is read.
  config.momentum.update(base=0.999, schedule="constant", queue_size=8192)
  config.input.update(dataset=args.dataset,
                      batch_size=setting["batch_size"], image_size=224)
  config.input.augment = common.simclr_augment(0.5, blur_prob=0.5,
                                               crop_area_min=0.08)
  config.input.augment.color_jitter_prob = 1.0
  config.input.augment.update(randaugment_magnitude=10.0,
                              randaugment_prob=0.5)
  if args.method == "gpaco":
    config.input.augment.randaugment_layers = 2
  else:
    config.input.augment.per_view = ({"randaugment_layers": 2},)
  config.optim.update(name="sgd", lr=setting["lr"], lr_scaling="linear",
                      weight_decay=setting["weight_decay"], momentum=0.9,
                      nesterov=False, warmup_epochs=10)
  config.total_epochs = float(args.epochs)
  if args.dataset == "imagenet_lt":
    config.loss.class_prior = True
    config.linear_eval.update(enabled=True, protocol="simclr",
                              train_split="train", test_split="test",
                              knn_k=(20, 200))
    # About every 20 epochs (904 steps per epoch at batch 128).
    config.online_eval.update(every_steps=18_000)
  else:
    config.linear_eval.update(enabled=True, protocol="simclr",
                              train_split="train", test_split="validation",
                              knn_k=(20, 200))
    config.online_eval.update(every_steps=25_000,
                              knn_train_split="train[:10%]")
  return config
