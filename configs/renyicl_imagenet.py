r"""RényiCL on ImageNet-1k (Lee & Shin, NeurIPS 2022, arXiv 2208.06270).

Command (8+ accelerators; TFDS imagenet2012 under data_dir):
  python -m contrastive.main --config=configs/renyicl_imagenet.py \
      --workdir=gs://BUCKET/renyicl_r50_300ep --config.input.data_dir=gs://BUCKET/tfds

Hardware: global batch 1024 (kyungmnlee/RenyiCL `main_renyicl.py` default,
MoCo v3's code base); one TPU v3-8 / v4-8 or 8 GPUs.
Setting (the README's "reproduce our results" command and main_renyicl.py
defaults): ResNet-50, MoCo v3 projector 4096-4096-256 with BN, critic
temperature 0.5, gamma 2, alpha 1/65536 (`--alpha 1 --scale_alpha
65536`), no queue, momentum encoder 0.99 rising to 1 (`--ema-cos`), LARS
lr 0.8 x B/256 = 3.2, wd 1e-6, 5 warm-up epochs + cosine, large crops of
0.2-1 (`--crop-min=.2`), 300 epochs.
Expected linear-eval top-1 (ImageNet val): 76.2 (README, 300 epochs with
`--n_crops 6` small crops; methods.md section 20). Without the small
crops expect clearly less: the README's MoCo v3 baseline gains from the
same multi-crop, and the paper's 2-view figures are not quoted here
(unverified). Linear evaluation: the SimCLR protocol (SGD, batch 4096, lr
0.1 x B/256, 90 epochs), close to RényiCL's main_lincls.py (SGD, batch
4096; its other values not checked).
Deviations:
  - Multi-crop as 2 large 224 px views + 6 small 96 px ones
    (`input.small_views`; each small-crop query meets both large keys):
    the small crops' area range 0.05-0.14 is SwAV's, RényiCL's own value
    not checked here.
  - Predictor: MoCo v3's 2-layer 4096-256 MLP on the online branch
    (`model.predictor`), as the official code.
  - The official source / target views' blur 1.0 / 0.1 and solarize
    0 / 0.2 (`input.augment.per_view`), jitter strength 0.5 on both; the
    source view (view 0) adds RandAugment(2, 10), each layer applied with
    probability 0.5 (timm's default; the official setting unverified); no
    random erasing.
Arg: number of epochs (default 300; the README's 100-epoch commands too).
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, epochs=300)
  config = common.base_config()
  config.model.update(depth=50, width=1.0)
  config.model.head.update(hidden_dims=(4096, 4096), out_dim=256,
                           use_bn=True)
  # The online branch's predictor (4096-256, BN + ReLU hidden); the keys
  # are the key encoder's projections.
  config.model.predictor.update(hidden_dims=(4096,), out_dim=256)
  config.loss.update(name="renyicl", temperature=0.5, use_labels=False)
  config.loss.kwargs = dict(gamma=2.0, alpha=1.0 / 65536)
  config.momentum.update(base=0.99, schedule="cosine", queue_size=0)
  config.input.update(dataset="imagenet2012", batch_size=1024, image_size=224,
                      views=2, small_views=6, small_image_size=96,
                      small_crop_area=(0.05, 0.14))
  config.input.augment = common.simclr_augment(0.5, blur_prob=0.5,
                                               crop_area_min=0.2)
  config.input.augment.solarize_prob = 0.0
  # Asymmetric views (view 0 always blurred, view 1 rarely and solarized
  # at 0.2); multi-crop small views take the shared blur 0.5, solarize 0.
  config.input.augment.per_view = (
      {"blur_prob": 1.0, "solarize_prob": 0.0, "randaugment_layers": 2,
       "randaugment_magnitude": 10.0},
      {"blur_prob": 0.1, "solarize_prob": 0.2})
  config.optim.update(name="lars", lr=0.8, lr_scaling="linear",
                      weight_decay=1e-6, warmup_epochs=5)
  config.total_epochs = float(args.epochs)
  config.linear_eval.update(enabled=True, protocol="simclr",
                            train_split="train", test_split="validation",
                            knn_k=(20, 200))
  # About every 8 epochs at batch 1024 (1251 steps per epoch).
  config.online_eval.update(every_steps=10_000,
                            knn_train_split="train[:10%]")
  return config
