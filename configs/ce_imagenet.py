r"""Supervised cross-entropy ResNet-50 on ImageNet-1k: the "CE" column.

The baseline every SupCon / SimCLR table sets beside the contrastive
encoders: the same ResNet-50 and input pipeline as `simclr_imagenet.py`
and `supcon_imagenet.py`, trained end to end with a linear classifier and
cross-entropy (`config.trainer="supervised"`, contrastive/supervised.py).

  python -m contrastive.main --config=configs/ce_imagenet.py \
      --workdir=gs://$BUCKET/ce_r50 \
      --config.input.data_dir=gs://$BUCKET/tensorflow_datasets

Variants (`:arg`): `epochs=N` (default 90), `depth=N` (50, 101, 200).

Hardware: a TPU v3-32 slice (32 chips) for the global batch 4096 with
global BatchNorm; any mesh dividing 4096 works.
Expected: top-1 76.5 of the trained classifier on the 50k validation
images (`classifier_eval.json`) for ResNet-50 at 90 epochs, the supervised
baseline SimCLR (Chen et al. 2020) plots against its linear evaluation;
SupCon (Khosla et al. 2020) reports 77-78 for its CE ResNet-50 with
stronger augmentation (AutoAugment). Both figures unverified: not checked
against the PDFs here.

Recipe: the standard large-batch supervised one (Goyal et al. 2017; the
LARS setting of You et al. 2017 for batch 4096): random resized crop
(8-100% of the area) and flip only, no colour distortion (SimCLR Table 5:
stronger colour augmentation does not help supervised training); LARS with
momentum 0.9, lr 0.1 x batch / 256 = 1.6, weight decay 1e-4, 5 warm-up
epochs then cosine decay; no label smoothing. The frozen encoder is also
probed with the contrastive runs' linear protocol (`linear_eval`), so the
CE column reads the same way as theirs.
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, epochs=90.0, depth=50)
  if args.depth not in (50, 101, 200):
    raise ValueError(f"depth must be 50, 101 or 200, got {args.depth}.")
  if args.epochs <= 0:
    raise ValueError(f"epochs must be positive, got {args.epochs}.")
  config = common.base_config()
  config.trainer = "supervised"
  config.model.update(depth=args.depth, width=1.0)
  config.input.update(dataset="imagenet2012", train_split="train",
                      batch_size=4096, views=1, image_size=224,
                      shuffle_buffer=50_000)
  config.input.augment = common.simclr_augment(1.0, blur_prob=0.0,
                                               crop_area_min=0.08)
  config.input.augment.update(color_jitter_prob=0.0, grayscale_prob=0.0)
  config.optim.update(name="lars", lr=0.1, lr_scaling="linear",
                      weight_decay=1e-4, momentum=0.9, warmup_epochs=5.0)
  config.total_epochs = args.epochs
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.supervised.update(init_from=None, label_smoothing=0.0)
  config.linear_eval.update(enabled=True, protocol="simclr",
                            train_split="train", test_split="validation")
  return config
