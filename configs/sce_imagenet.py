r"""SCE on ImageNet-1k: Similarity Contrastive Estimation (Denize et al.,
WACV 2023, arXiv 2111.14585).

Command (TPU pod or 8+ accelerators; TFDS imagenet2012 under data_dir):
  python -m contrastive.main --config=configs/sce_imagenet.py \
      --workdir=gs://BUCKET/sce_r50_200ep --config.input.data_dir=gs://BUCKET/tfds

Hardware: global batch 4096; eztorch ran it on 8 A100-80G GPUs (docs
`sce_wacv.md`); here designed for 32 TPU v3 chips like SimCLR at 4096.
Setting (juliendenize/eztorch `configs/run/pretrain/sce/resnet50/
resnet50_imagenet.yaml` and the docs' commands): ResNet-50, projector
4096-4096-256 with BN on every layer, queue 65536, key encoder momentum
0.99 rising to 1 (cosine), tau 0.1, tau_m 0.07, lambda (`coefficient`)
0.5, symmetric loss, LARS lr 0.3 x B/256 = 4.8, wd 1e-6, 10 warm-up
epochs + cosine, 200 epochs. The docs change lr to 0.6 for 100 epochs and
wd to 1.5e-6 for 1000 epochs; `epochs=100` / `epochs=1000` do the same.
Expected linear-eval top-1 (ImageNet val; eztorch docs table, 2 x 224
crops): 72.1 (100 epochs), 72.7 (200, the default), 73.3 (300), 74.1
(1000); 75.4 with multi-crop at 200 epochs (not reproducible here yet).
Linear evaluation: the SimCLR protocol (`linear_eval.protocol="simclr"`);
eztorch's own linear-eval recipe was not checked.
Deviations:
  - Predictor: MoCo v3's 2-layer 4096-256 MLP on the online branch
    (`model.predictor`), as eztorch's; its exact sizes there not checked.
  - The contrast set holds the other images' keys of the global batch as
    well as the queue (the paper's description); the eztorch config keeps
    `use_keys=False` (own key + queue only).
  - MoCo v3's two view recipes (blur 1.0 / 0.1, solarize 0 / 0.2,
    `input.augment.per_view`) with jitter strength 0.5 on both (saturation
    0.4 rather than 0.2 and hue 0.1: SimCLR's jitter ties the four).
  - Weight decay skips BN parameters and biases (eztorch decays them:
    `exclude_wd_norm/bias: False`).
Note: both keys of every image are enqueued, so the 65536 keys are those
of the last 8 steps' images.
Arg: number of epochs (default 200).
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, epochs=200)
  config = common.base_config()
  config.model.update(depth=50, width=1.0)
  # eztorch projector_resnet50_mlp3_bn3: 2048-4096-4096-256, BN everywhere.
  config.model.head.update(hidden_dims=(4096, 4096), out_dim=256,
                           use_bn=True)
  # The online branch's predictor (4096-256, BN + ReLU hidden); the keys
  # are the key encoder's projections.
  config.model.predictor.update(hidden_dims=(4096,), out_dim=256)
  config.loss.update(name="sce", temperature=0.1, use_labels=False)
  config.loss.kwargs = dict(coefficient=0.5, temperature_m=0.07,
                            symmetric=True)
  config.momentum.update(base=0.99, schedule="cosine", queue_size=65536)
  config.input.update(dataset="imagenet2012", batch_size=4096, image_size=224)
  config.input.augment = common.simclr_augment(0.5, blur_prob=0.5,
                                               crop_area_min=0.08)
  config.input.augment.solarize_prob = 0.0
  # Asymmetric views (view 0 always blurred, view 1 rarely and solarized
  # at 0.2).
  config.input.augment.per_view = (
      {"blur_prob": 1.0, "solarize_prob": 0.0},
      {"blur_prob": 0.1, "solarize_prob": 0.2})
  config.optim.update(name="lars", lr=0.6 if args.epochs == 100 else 0.3,
                      lr_scaling="linear",
                      weight_decay=1.5e-6 if args.epochs == 1000 else 1e-6,
                      warmup_epochs=10)
  config.total_epochs = float(args.epochs)
  config.linear_eval.update(enabled=True, protocol="simclr",
                            train_split="train", test_split="validation",
                            knn_k=(20, 200))
  config.online_eval.update(every_steps=5000, knn_train_split="train[:10%]")
  return config
