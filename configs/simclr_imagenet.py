r"""SimCLR on ImageNet-1k (Chen et al., ICML 2020, arXiv 2002.05709).

Command (TPU pod; data as TFDS imagenet2012 under --config.input.data_dir):
  python -m contrastive.main --config=configs/simclr_imagenet.py:r50,epochs=100 \
      --workdir=gs://BUCKET/simclr_r50_100ep --config.input.data_dir=gs://BUCKET/tfds

Hardware: designed for 32 TPU v3 chips (64 cores), global batch 4096
(google-research/simclr README: "batch 4096 requires at least 32 TPUs").
Setting: ResNet-50 (x1/x2/x4), LARS lr 0.3 x B/256 = 4.8, wd 1e-6,
tau 0.1, 10 warm-up epochs + cosine, global BN, head 2048-2048-128 with BN.

Expected linear-eval top-1 (ImageNet val):
  r50   ~64.5 after 100 epochs (README recipe), 69.3 after 1000 (paper;
        released checkpoint 69.1) -- the 69.3 is unverified against the PDF.
  r50x2 74.2 (paper and README), r50x4 76.5 (abstract; checkpoint 76.6).
After pretraining, the SimCLR linear-eval protocol runs on the frozen
encoder (`linear_eval.protocol="simclr"`: Nesterov SGD, batch 4096, lr
0.1 x B/256, 90 epochs, crop + flip; contrastive/evaluation/
linear_protocols.py), with the online probe and kNN alongside.
"""

from configs import common

WIDTHS = {"r50": 1.0, "r50x2": 2.0, "r50x4": 4.0}


def get_config(arg=None):
  args = common.parse_arg(arg, variant="r50", epochs=100)
  if args.variant not in WIDTHS:
    raise ValueError(f"variant must be one of {sorted(WIDTHS)}.")
  config = common.base_config()
  config.model.update(depth=50, width=WIDTHS[args.variant])
  config.loss.update(name="simclr", temperature=0.1)
  config.input.update(dataset="imagenet2012", batch_size=4096, image_size=224)
  config.optim.update(name="lars", lr=0.3, lr_scaling="linear",
                      weight_decay=1e-6, warmup_epochs=10)
  config.total_epochs = float(args.epochs)
  config.linear_eval.update(enabled=True, protocol="simclr",
                            train_split="train", test_split="validation",
                            knn_k=(20, 200))
  # Online kNN against 10% of the training set: 128k x 2048 features fit
  # one chip's memory; the offline kNN after training uses all of it.
  config.online_eval.update(every_steps=5000, knn_train_split="train[:10%]")
  return config
