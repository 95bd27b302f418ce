r"""SimCLR + DCL / DCLW on ImageNet-1k (Yeh et al., ECCV 2022, arXiv 2110.06848).

Command (TPU pod or 8 accelerators; TFDS imagenet2012 under data_dir):
  python -m contrastive.main --config=configs/dcl_imagenet.py:dcl \
      --workdir=gs://BUCKET/dcl_r50_200ep --config.input.data_dir=gs://BUCKET/tfds

Hardware: the paper's point is the small batch: global batch 256, which fits
8 GPUs or a TPU v3-8 / v4-8 (the paper's exact hardware: unverified).
Setting: ResNet-50, SimCLR's recipe (augmentations, 2048-2048-128 head with
BN, LARS, 10 warm-up epochs + cosine) at batch 256 for 200 epochs, tau 0.1,
DCLW with sigma 0.5. The learning rate follows SimCLR's square-root scaling
for small batches (0.075 x sqrt(B) = 1.2); the paper's lr and tau for this
run are unverified.
Expected linear-eval top-1 (ImageNet val): 68.2 for SimCLR + DCL at batch
256, 200 epochs (abstract; +6.4 over SimCLR's ~61.8 in the same setting).
The DCLW figure is not in the abstract (unverified).
Variants: `dcl` (default) or `dclw`; `epochs=N`.
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, method="dcl", epochs=200)
  if args.method not in ("dcl", "dclw"):
    raise ValueError(f"method must be 'dcl' or 'dclw', got {args.method!r}.")
  config = common.base_config()
  config.model.update(depth=50, width=1.0)
  config.loss.update(name=args.method, temperature=0.1, use_labels=False)
  if args.method == "dclw":
    config.loss.kwargs = dict(sigma=0.5)
  config.input.update(dataset="imagenet2012", batch_size=256, image_size=224)
  config.optim.update(name="lars", lr=0.075, lr_scaling="sqrt",
                      weight_decay=1e-6, warmup_epochs=10)
  config.total_epochs = float(args.epochs)
  config.linear_eval.update(enabled=True, protocol="simclr",
                            train_split="train", test_split="validation",
                            knn_k=(20, 200))
  config.online_eval.update(every_steps=25_000,
                            knn_train_split="train[:10%]")
  return config
