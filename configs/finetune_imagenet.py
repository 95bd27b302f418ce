r"""SimCLR semi-supervised fine-tuning on 1% / 10% of the ImageNet labels.

A `simclr_imagenet.py` (ResNet-50) pretraining run's encoder and a
zero-initialised linear classifier are fine-tuned together with
cross-entropy on the TFDS subsets `imagenet2012_subset/1pct` (12,811
images) or `/10pct` (128,116), then scored on the 50k validation images.

  python -m contrastive.main --config=configs/finetune_imagenet.py:1pct \
      --workdir=gs://$BUCKET/finetune_1pct \
      --config.input.data_dir=gs://$BUCKET/tensorflow_datasets \
      --config.supervised.init_from=gs://$BUCKET/simclr_r50

Hardware: a TPU v3-32 slice (32 chips) as the pretraining run, for the
global batch 4096 with global BN; any mesh dividing 4096 works.
Expected (SimCLR, Chen et al. 2020, Table 7, ResNet-50 1x pretrained 1000
epochs; unverified: not checked against the PDF here): top-1 48.3 / top-5
75.5 with 1% of the labels, top-1 65.6 / top-5 87.8 with 10%. A 100-epoch
pretraining run gives less.
Hyper-parameters (SimCLR appendix B.5; unverified): batch 4096, Nesterov
momentum 0.9, lr 0.05 x batch / 256 = 0.8, no warm-up, no weight decay or
other regularisation, random resized crop + flip only, 60 epochs for 1% and
30 for 10%. The learning-rate decay (cosine here, as every schedule of this
codebase) is unverified. SimCLR v2 instead fine-tunes from the projection
head's first layer; this fine-tunes the encoder (SimCLR v1).

Variants (`:arg`): `1pct` (default), `10pct`.
"""

from configs import common

SUBSETS = {"1pct": 60.0, "10pct": 30.0}


def get_config(arg=None):
  args = common.parse_arg(arg, subset="1pct")
  if args.subset not in SUBSETS:
    raise ValueError(f"Variant must be one of {sorted(SUBSETS)}, got "
                     f"'{args.subset}'.")
  config = common.base_config()  # ResNet-50 as simclr_imagenet.py.
  config.trainer = "supervised"
  config.input.update(dataset=f"imagenet2012_subset/{args.subset}",
                      train_split="train", batch_size=4096, views=1,
                      image_size=224, shuffle_buffer=50_000)
  config.input.augment = common.simclr_augment(1.0, blur_prob=0.0,
                                               crop_area_min=0.08)
  config.input.augment.update(color_jitter_prob=0.0, grayscale_prob=0.0)
  config.optim.update(name="sgd", lr=0.05, lr_scaling="linear",
                      weight_decay=0.0, momentum=0.9, nesterov=True,
                      warmup_epochs=0.0)
  config.total_epochs = SUBSETS[args.subset]
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  config.supervised.update(label_smoothing=0.0)
  # The subset's TFDS builder carries the full validation split.
  config.linear_eval.update(enabled=False, test_split="validation",
                            batch_size=1024)
  return config
