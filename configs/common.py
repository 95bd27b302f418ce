"""Defaults every config starts from; each paper config overrides a few keys.

Every key the trainer reads exists here, so `--config.x.y=...` on any config
either sets a real key or fails (configs are locked by `main.py`).
"""

import ml_collections
from ml_collections import config_dict


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `variant=r50,epochs=350` (or a bare `r50`) against `defaults`.

  A bare word sets the first default key. Values are converted to the
  default's type.
  """
  parsed = ml_collections.ConfigDict(defaults)
  if not arg:
    return parsed
  first_key = next(iter(defaults))
  for item in arg.split(","):
    key, _, value = item.partition("=")
    if not _:
      key, value = first_key, item
    if key not in defaults:
      raise ValueError(f"Unknown config argument '{key}'; known: "
                       f"{sorted(defaults)}.")
    kind = type(defaults[key])
    if kind is bool:
      parsed[key] = value.lower() in ("1", "true", "yes", "")
    else:
      parsed[key] = kind(value)
  return parsed


# Many / medium / few-shot thresholds of Fashion-MNIST-LT (its classes keep
# 60..6000 images; contrastive/evaluation/long_tail.py).
FASHION_MNIST_LT_THRESHOLDS = (1000, 200)


def set_fashion_mnist_dataset(config: ml_collections.ConfigDict,
                              dataset: str) -> None:
  """Trains on `dataset` (a Fashion-MNIST builder); long-tailed ones
  (`fashion_mnist_lt/...`) also get the many / medium / few-shot scores."""
  if not dataset.startswith(("fashion_mnist_idx", "fashion_mnist_lt/",
                             "biased_fashion_mnist/",
                             "open_world/fashion_mnist")):
    raise ValueError(f"dataset must be a Fashion-MNIST builder "
                     f"(fashion_mnist_idx, fashion_mnist_lt/if10|if50|if100,"
                     f" open_world/fashion_mnist_seen5_labeled50), got "
                     f"{dataset!r}.")
  config.input.dataset = dataset
  if dataset.startswith("fashion_mnist_lt/"):
    config.linear_eval.long_tail_thresholds = FASHION_MNIST_LT_THRESHOLDS


def simclr_augment(strength: float = 1.0, blur_prob: float = 0.5,
                   crop_area_min: float = 0.08) -> ml_collections.ConfigDict:
  """SimCLR's view recipe; `blur_prob=0` for CIFAR-sized images."""
  return ml_collections.ConfigDict(dict(
      crop_area_min=crop_area_min,
      crop_area_max=1.0,
      crop_aspect_min=3 / 4,
      crop_aspect_max=4 / 3,
      flip=True,
      color_jitter_prob=0.8,
      color_strength=strength,
      grayscale_prob=0.2,
      blur_prob=blur_prob,
      solarize_prob=0.0,
      # Per-view changes of the post-crop options (color_jitter_prob,
      # color_strength, grayscale_prob, blur_prob, solarize_prob) for the
      # first views, e.g. BYOL's ({"blur_prob": 1.0}, {"blur_prob": 0.1,
      # "solarize_prob": 0.2}); () for the same recipe on every view.
      per_view=(),
      # RandAugment after the colour ops (contrastive/data/randaugment.py):
      # N layers (0: off) of magnitude M in [0, 10], each applied with
      # randaugment_prob (timm's rand-n2-m10: 2, 10.0, 0.5). tf.data only.
      randaugment_layers=0,
      randaugment_magnitude=10.0,
      randaugment_prob=0.5,
      # ReLICv2's saliency masking: each large view, with this probability,
      # has its background set to saliency_fill (after the crop, before the
      # colour ops). Needs a dataset with a "saliency" feature: uint8
      # [H, W, 1] masks, 255 = salient (contrastive/data/input_pipeline.py).
      saliency_prob=0.0,
      saliency_fill=0.0,
      # Colour jitter, grayscale, blur and solarize in the jitted train step
      # instead of tf.data (contrastive/data/device_augment.py): for hosts
      # that cannot keep up with the accelerators.
      on_device=False,
  ))


def base_config() -> ml_collections.ConfigDict:
  """SimCLR ResNet-50 on ImageNet, 100 epochs: the root of every config."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # "contrastive" (contrastive/train.py) or "supervised": cross-entropy on
  # the encoder plus a linear classifier (contrastive/supervised.py), from
  # scratch (the CE baseline) or from `supervised.init_from` (fine-tuning).
  config.trainer = "contrastive"
  # [(axis name, size)]; -1 takes the remaining devices.
  config.mesh = [("data", -1)]

  # dtype "bfloat16": mixed precision, the encoder and head compute in bf16
  # while parameters, BN statistics, optimizer and every loss stay float32
  # (contrastive/models/encoder.py). Meant for TPU/GPU: on CPU it is no
  # faster, rather slower (smoke step: same CPU time, ~20% more wall time).
  config.model = dict(
      name="resnet", depth=50, width=1.0, cifar_stem=False, bn_momentum=0.9,
      dtype="float32",
      head=dict(hidden_dims=(2048, 2048), out_dim=128, use_bn=True),
      # Learnable class prototypes in the embedding space (ESupCon): the
      # number of classes, or 0 for none.
      num_prototypes=0,
      # Deep Bregman divergence: K sub-networks on the encoder features
      # (0: none), each Dense(hidden_dim)-ReLU-Dense(1).
      bregman=dict(subnetworks=0, hidden_dim=256),
      # A linear classifier on the features whose logits the loss uses as
      # class centres (PaCo, GPaCo): the number of classes, or 0 for none.
      linear_classes=0,
      # MoCo v3 / BYOL predictor on the online branch: an MLP (BN + ReLU
      # hidden layers, no BN on the output) from the projection to out_dim
      # (0: none); momentum losses then take the key encoder's projection.
      predictor=dict(hidden_dims=(), out_dim=0),
      # name="multiview_resnet" (CMC): an encoder and head per modality,
      # "lab" (L | ab) or "intensity_gradients" (grayscale | Sobel d/dx,
      # d/dy); contrastive/models/multiview.py.
      modalities="lab")

  # Momentum-encoder and queue losses (moco, mochi, sce, relic, renyicl,
  # paco, gpaco; contrastive/momentum.py): the key encoder's EMA momentum
  # rises from `base` to 1 along a cosine ("cosine", BYOL / MoCo v3) or
  # stays at `base` ("constant", MoCo v2: 0.999); the queue holds
  # `queue_size` past keys (0: negatives from the batch only); ResCom's
  # class-balanced queue holds `class_queue_size` keys per class. Unused by
  # other losses.
  # InterCLR's memory bank holds a feature per training image, blended in
  # at `bank_update_rate` (1: replaced) and clustered by k-means into
  # `bank_clusters` every `bank_cluster_every_epochs`.
  config.momentum = dict(base=0.99, schedule="cosine", queue_size=0,
                         class_queue_size=8, bank_update_rate=1.0,
                         bank_clusters=10_000, bank_cluster_every_epochs=1.0,
                         bank_kmeans_iterations=10,
                         # OpenCon's prototypes' EMA momentum.
                         prototype_momentum=0.9)

  # IFND (contrastive/pseudo_labels.py): every `refresh_every_epochs` the
  # training set is embedded and clustered by spherical k-means at each k
  # of `cluster_counts`; the most confident fraction of images, rising from
  # `start_fraction` to `end_fraction` over training, keep their
  # pseudo-label. Unused by other losses.
  config.pseudo_labels = dict(cluster_counts=(10,), refresh_every_epochs=1.0,
                              start_fraction=0.0, end_fraction=1.0,
                              iterations=20)

  # `use_labels` passes the class labels to the loss (SupCon); `kwargs` are
  # the loss's own options, e.g. variant / contrast_mode / base_temperature.
  # `loss_impl` says how anchors meet the global batch, all with the same
  # value and gradient: "gather" ([local, global] logits), "blockwise"
  # (streamed column blocks; memory O(local * block + global * dim)) or
  # "ring" (ppermute; memory independent of the global batch);
  # `block_size` 0 picks the block from the local batch.
  # `class_prior` (PaCo, GPaCo on long-tailed data): the trainer counts the
  # classes of input.train_split once and passes their frequencies, whose
  # log the loss adds to the classifier's logits.
  config.loss = dict(name="simclr", temperature=0.1, use_labels=False,
                     loss_impl="gather", block_size=0, class_prior=False,
                     kwargs=ml_collections.ConfigDict())
  # GradCache: > 0 embeds the global batch in this many chunks without
  # keeping activations, takes the loss gradient w.r.t. the embeddings, then
  # back-propagates chunk by chunk, so activation memory is that of one
  # chunk. BatchNorm then normalises each chunk with its own statistics,
  # still global over the devices (see contrastive/grad_cache.py). 0: off.
  config.grad_cache_chunks = 0

  config.input = dict(
      dataset="imagenet2012",
      data_dir=config_dict.placeholder(str),
      train_split="train",
      batch_size=4096,  # Global, in images (each gives `views` views).
      views=2,
      # Multi-crop (SwAV, ReLICv2, RényiCL): this many more views per image
      # at `small_image_size`, cropped from `small_crop_area` of the image
      # (same augmentations otherwise), embedded in their own pass and
      # appended after the `views` ones (the key encoder sees those only).
      small_views=0,
      # Each batch carries "index", the image's position in the split (for
      # per-image state: IFND's pseudo-labels, InterCLR's memory bank);
      # streamed datasets (ImageNet) number whole splits only.
      example_index=False,
      small_image_size=96,
      small_crop_area=(0.05, 0.14),
      image_size=224,
      shuffle_buffer=50_000,
      augment=simclr_augment(1.0, blur_prob=0.5))

  config.optim = dict(
      name="lars", lr=0.3, lr_scaling="linear", weight_decay=1e-6,
      momentum=0.9, nesterov=False, trust_coefficient=1e-3,
      warmup_epochs=10.0)

  config.total_epochs = 100.0
  config.total_steps = config_dict.placeholder(int)  # Overrides epochs if set.
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  # A workdir remembers the config it was started with (config.json).
  # "auto": resume if the config matches it (keys that do not change the
  # trained model, e.g. logging or the run's length, may differ) and refuse
  # otherwise; "force": resume despite a different config.
  config.resume = "auto"
  # A finished run started again prints the results it recorded (no
  # training, no evaluation); True evaluates its final state again.
  config.reevaluate = False
  # A non-finite loss or gradient: "raise" stops the run before anything
  # non-finite is checkpointed; "skip" keeps the previous parameters and
  # optimizer state for that step (counted in the `skipped_steps` metric).
  config.nonfinite = "raise"

  config.linear_eval = dict(
      enabled=False,
      dataset=config_dict.placeholder(str),  # Default: config.input.dataset.
      train_split="train",
      test_split="validation",
      batch_size=1024,
      steps=500,
      l2=1e-4,
      # Non-empty: the "lbfgs" probe picks its L2 strength from these by
      # top-1 on `validation_fraction` of the training split (held out, then
      # refitted on all of it), as SimCLR's transfer protocol does.
      l2_grid=(),
      validation_fraction=0.1,
      raw_pixel_baseline=False,
      # (many, few) for long-tailed training sets: also report the top-1 of
      # the many-shot (> many training images), medium-shot and few-shot
      # (< few) classes (contrastive/evaluation/long_tail.py); ImageNet-LT
      # and CIFAR-LT use (100, 20). () turns it off.
      long_tail_thresholds=(),
      # Weighted kNN on the same frozen features (InstDisc / solo-learn
      # protocol): one result per k; () turns it off.
      knn_k=(20, 200),
      knn_temperature=0.07,
      # "lbfgs": the minimal probe above (full-batch L-BFGS on standardised,
      # cached features). The papers' protocols train a linear classifier
      # on the frozen encoder (BN in inference mode) by SGD: "simclr"
      # (Nesterov, batch 4096, lr 0.1 x B/256, wd 1e-6, 90 epochs, crop +
      # flip), "supcon" (the TF scripts' stage-2 RMSProp), "moco" (lr 30),
      # "supcontrast" (the PyTorch SupCon CIFAR recipe: batch 512, lr 5);
      # values and sources in contrastive/evaluation/linear_protocols.py.
      # Unset keys below take the protocol's own value.
      protocol="lbfgs",
      epochs=config_dict.placeholder(float),
      learning_rate=config_dict.placeholder(float),
      train_batch_size=config_dict.placeholder(int),
      # Augmented inputs pass through the encoder every step; without
      # augmentation, features are extracted once and cached.
      augment=config_dict.placeholder(bool))

  # Evaluation while pretraining, written to metrics.jsonl and TensorBoard:
  # a linear classifier on stop-gradient features trained alongside the
  # encoder (SimCLR v2, solo-learn), reported on the batch each log step;
  # every `every_steps` (0: never) it and a kNN classifier (train split
  # features, `linear_eval.knn_temperature`) are scored on the test split
  # of `linear_eval` (dataset, splits).
  config.online_eval = dict(
      probe=True,
      probe_learning_rate=0.1,
      every_steps=0,
      knn_k=20,
      # Fewer training examples make the periodic kNN cheaper.
      knn_train_split=config_dict.placeholder(str),  # Default: linear_eval's.
  )

  # The "supervised" trainer's own keys (it reads input, model, optim too).
  config.supervised = dict(
      # A pretraining workdir (or gs:// path) whose latest checkpoint
      # initialises the encoder; unset trains from scratch.
      init_from=config_dict.placeholder(str),
      label_smoothing=0.0)
  return config
