r"""FNC on ImageNet-1k (Huynh et al., WACV 2022, arXiv 2011.11765).

Command (TPU pod; TFDS imagenet2012 under data_dir):
  python -m contrastive.main --config=configs/fnc_imagenet.py \
      --workdir=gs://BUCKET/fnc_r50 --config.input.data_dir=gs://BUCKET/tfds

Hardware: designed for a TPU pod (global batch 4096 images x 10 views, the
encoder work of 5 SimCLR steps; google-research/fnc ran on TPUs).
Setting: the official example command and flags: ResNet-50, batch 4096,
2 main + 8 support views (`support_size` 8), false negatives by top-10 and
cosine > 0.7, attraction, LARS lr 0.1 with square-root batch scaling
(0.1 x sqrt(4096) = 6.4), wd 1e-4, tau 0.1, 3-layer head -> 128, 100
epochs. Differences: SimCLR's augmentations instead of the RandAugment
the FNC README adds; no EMA memory bank (`memory_multiplier` 0).
Expected linear-eval top-1 (ImageNet val): 74.4 top-1 / 91.8 top-5 for the
released ResNet-50 (FNC README; its pre-training length is unverified, the
100-epoch command will land lower).
Args: `fn_mode=attract|eliminate`, `support=8`, `epochs=100`.
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, fn_mode="attract", support=8, epochs=100)
  config = common.base_config()
  config.model.update(depth=50, width=1.0)
  config.model.head.update(hidden_dims=(2048, 2048), out_dim=128)
  config.loss.update(name="fnc", temperature=0.1, use_labels=False)
  config.loss.kwargs = dict(fn_mode=args.fn_mode, fn_topk=10,
                            fn_threshold=0.7)
  config.input.update(dataset="imagenet2012", batch_size=4096,
                      image_size=224, views=2 + args.support)
  config.optim.update(name="lars", lr=0.1, lr_scaling="sqrt",
                      weight_decay=1e-4, warmup_epochs=10)
  config.total_epochs = float(args.epochs)
  config.linear_eval.update(enabled=True, protocol="simclr",
                            train_split="train", test_split="validation",
                            knn_k=(20, 200))
  config.online_eval.update(every_steps=5000, knn_train_split="train[:10%]")
  return config
