"""tf.data pipelines over TFDS: augmented pretraining views, and eval.

Each JAX process reads only its own slice of a split (`tfds.even_splits`), so
a pod never reads an example twice per epoch.

Pretraining batches are a pure function of (seed, step): a run restarted at
step k sees exactly the batches an uninterrupted run saw from step k on. Each
process numbers the examples it consumes (position p = step * b + i for a
local batch of b); every view's augmentation is keyed by (seed, process, p,
view) through stateless ops. Which example sits at position p depends on the
dataset:

* Decoded datasets that fit in memory (Fashion-MNIST, CIFAR): the shard is
  held in memory and epoch e visits it in a stateless permutation keyed by
  (seed, process, e) (`tf.random.experimental.index_shuffle`), so starting at
  step k costs nothing.
* Others (JPEG ImageNet): the stream of examples is the same deterministic
  sequence on every run (seeded file order and shuffle buffer) and a resumed
  run skips the first k * b encoded records before decoding. The order is the
  same as long as the TFDS files and tf.data version are; the cost of
  resuming is reading (not decoding) the skipped records.
"""

import math

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from contrastive.data import augment
from contrastive.data import device_augment
# Imported to register our builders with TFDS: `fashion_mnist_idx`,
# `biased_fashion_mnist`, `fashion_mnist_lt` and `cifar_lt`.
from contrastive.data import biased_fashion_mnist
from contrastive.data import fashion_mnist
from contrastive.data import long_tail
from contrastive.data import open_world
from contrastive.data import prepare

# Builders whose source files are local: preparing them is cheap and needs no
# network, so it happens on first use instead of being a manual step.
# (`cifar_lt` derives from a prepared TFDS cifar10 / cifar100 and says how
# to prepare that if it is missing.)
_LOCAL_BUILDERS = (fashion_mnist.FashionMnistIdx,
                   biased_fashion_mnist.BiasedFashionMnist,
                   long_tail.FashionMnistLt, long_tail.CifarLt,
                   open_world.OpenWorld)

# Integer features carried into batches (as int32) when a dataset has them:
# the class, the bias attribute that debiasing losses (FairKL) need, and the
# open-world label (-1: unlabelled) that open-world losses read.
_LABEL_KEYS = ("label", "bias_label", "open_label")
# The example's position in its split, carried into batches on request
# (`input.example_index`, `eval_dataset(with_index=True)`): what methods that
# keep a state per training image (IFND's pseudo-labels, InterCLR's memory
# bank) index it by. Streamed datasets take it from the records' TFDS ids.
INDEX_KEY = "index"
# The feature holding an image's saliency mask (uint8 [H, W, 1], 255 =
# salient), read only for ReLICv2's saliency masking
# (`input.augment.saliency_prob`).
SALIENCY_KEY = "saliency"

# Decoded images up to this many bytes per process are held in memory and
# read by index (Fashion-MNIST: 47 MB, CIFAR-10: 150 MB): any step's batch is
# then at hand without replaying earlier ones. Encoded datasets (ImageNet)
# are streamed instead: too large.
_CACHE_LIMIT_BYTES = 2 * 2**30


def _prepared_builder(dataset: str,
                      data_dir: str | None) -> tfds.core.DatasetBuilder:
  """Returns the builder of `dataset`, prepared, or says how to prepare it."""
  data_dir = prepare.expand_path(data_dir)
  builder = tfds.builder(dataset, data_dir=data_dir)
  if isinstance(builder, _LOCAL_BUILDERS):
    try:
      # The data is local: never look for a copy on GCS (no network needed).
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except OSError:
      # Processes sharing a data_dir race to prepare it; the losers' final
      # rename fails, but the winner's copy is there to use.
      builder = tfds.builder(dataset, data_dir=data_dir)
      if not builder.is_prepared():
        raise
  elif not builder.is_prepared():
    root = builder.data_dir_root
    searched = (f"data_dir={root}" if data_dir else
                f"the default data_dir {root} (input.data_dir is unset; set "
                "it or $TFDS_DATA_DIR to where the data is)")
    manual = builder.MANUAL_DOWNLOAD_INSTRUCTIONS
    manual_dir = f"{root}/downloads/manual" if manual else None
    message = (f"TFDS dataset '{dataset}' is not prepared in {searched}: "
               f"{builder.data_dir} does not exist. Prepare it once with "
               f"`{prepare.command(dataset, root, manual_dir)}`.")
    if manual:
      message += (f" It needs a manual download first: put the source files "
                  f"in {manual_dir} (or pass --manual_dir=<their folder>). "
                  f"{' '.join(manual.split())}")
    raise prepare.DatasetNotPreparedError(message)
  return builder


def _check_split(info: tfds.core.DatasetInfo, split: str) -> int:
  """Returns the number of examples in `split`, with a clear error if bad."""
  try:
    return info.splits[split].num_examples
  except (KeyError, ValueError, AssertionError) as e:
    raise ValueError(
        f"Invalid split '{split}' for TFDS dataset '{info.name}' ({e}). "
        f"Available splits: {sorted(info.splits.keys())}; TFDS slicing such "
        "as 'train[:10%]' or 'train[:5000]' applies to these.") from e


def _process_shard(process_index: int | None,
                   process_count: int | None) -> tuple[int, int]:
  """Fills in this JAX process's index and the process count."""
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in "
                     f"[0, {process_count}).")
  return process_index, process_count


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(f"Global batch size {global_batch_size} is not divisible "
                     f"by the number of processes {process_count}.")
  return global_batch_size // process_count


def _is_jpeg(info: tfds.core.DatasetInfo) -> bool:
  """Whether images are JPEG, to be decoded fused with their crop."""
  return info.features["image"].encoding_format == "jpeg"


def _fits_in_memory(image_shape: tuple[int | None, ...],
                    count: int) -> bool:
  """Whether `count` decoded uint8 images of `image_shape` fit the cache."""
  if None in image_shape:
    return False
  return count * math.prod(image_shape) <= _CACHE_LIMIT_BYTES


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.autotune.enabled = True
  # Each map call is a small image: parallelism across calls, not inside ops.
  options.threading.max_intra_op_parallelism = 1
  return options


def _label_keys(info: tfds.core.DatasetInfo) -> tuple[str, ...]:
  """The `_LABEL_KEYS` among the dataset's features, in that order."""
  return tuple(key for key in _LABEL_KEYS if key in info.features)


def _file_index(tfds_id: tf.Tensor, shard_starts: tf.Tensor) -> tf.Tensor:
  """A record's position in its split from its TFDS id
  (`<name>-<split>.<format>-<shard>-of-<count>__<position in shard>`)."""
  file_name, position = tf.unstack(
      tf.strings.split(tfds_id, "__", maxsplit=1), num=2)
  shard = tf.strings.regex_replace(file_name, r"^.*-(\d+)-of-\d+$", r"\1")
  return (tf.gather(shard_starts, tf.strings.to_number(shard, tf.int64))
          + tf.strings.to_number(position, tf.int64))


def _read(builder: tfds.core.DatasetBuilder, split, *, shuffle_files: bool,
          seed: int | None = None, with_saliency: bool = False,
          with_index: bool = False) -> tf.data.Dataset:
  """Reads (image, {label key: label}) pairs; JPEG images stay encoded.

  The dict holds the dataset's `_LABEL_KEYS`: "label", plus "bias_label" for
  datasets that have it; with `with_saliency` the `SALIENCY_KEY` mask; with
  `with_index` the record's `INDEX_KEY` position in its (whole) split,
  from its TFDS id, whatever order the files are read in.
  """
  decoders = ({"image": tfds.decode.SkipDecoding()}
              if _is_jpeg(builder.info) else None)
  read_config = tfds.ReadConfig(shuffle_seed=seed, options=_options(),
                                try_autocache=False, add_tfds_id=with_index)
  dataset = builder.as_dataset(split=split, shuffle_files=shuffle_files,
                               decoders=decoders, read_config=read_config)
  # Other features (e.g. ImageNet's file names) would only cost memory.
  keys = _label_keys(builder.info) + ((SALIENCY_KEY,) if with_saliency
                                      else ())
  shard_starts = None
  if with_index:
    # TFDS ids name the files of the whole split (even for a process's
    # share of it, a `tfds.even_splits` entry).
    whole = getattr(split, "split", split)
    lengths = builder.info.splits[whole].shard_lengths
    shard_starts = tf.constant(np.cumsum([0] + list(lengths[:-1])), tf.int64)

  def select(example):
    labels = {key: example[key] for key in keys}
    if with_index:
      labels[INDEX_KEY] = _file_index(example["tfds_id"], shard_starts)
    return example["image"], labels

  return dataset.map(select, num_parallel_calls=tf.data.AUTOTUNE)


def dataset_info(dataset: str,
                 data_dir: str | None) -> tfds.core.DatasetInfo:
  """Returns the TFDS info of `dataset`, preparing local datasets first.

  Args:
    dataset: TFDS name, e.g. "fashion_mnist_idx", "cifar10", "imagenet2012".
    data_dir: TFDS data dir; None for TFDS's default.

  Returns:
    The dataset's `tfds.core.DatasetInfo`.

  Raises:
    FileNotFoundError: if the dataset is not prepared (or, for
      `fashion_mnist_idx` and `biased_fashion_mnist`, its source files are
      missing); the message says how to get it.
  """
  return _prepared_builder(dataset, data_dir).info


def num_examples(dataset: str, split: str, data_dir: str | None) -> int:
  """Returns the number of examples in `split` (TFDS slicing allowed).

  Args:
    dataset: TFDS name.
    split: split, e.g. "train", "train[:10%]", "train+test".
    data_dir: TFDS data dir; None for TFDS's default.

  Returns:
    The number of examples.

  Raises:
    ValueError: if the split is not valid; the message lists the splits.
  """
  return _check_split(dataset_info(dataset, data_dir), split)


def class_frequencies(dataset: str, split: str,
                      data_dir: str | None) -> np.ndarray:
  """The fraction of `split`'s examples in each class, float64 [classes].

  The class prior of long-tailed training sets (PaCo's log prior), from
  `class_counts`.
  """
  counts = class_counts(dataset, split, data_dir)
  return counts / counts.sum()


def class_counts(dataset: str, split: str,
                 data_dir: str | None) -> np.ndarray:
  """The number of `split`'s examples in each class, int64 [classes].

  One pass over the split's records without decoding images (labels only).
  """
  builder = _prepared_builder(dataset, data_dir)
  _check_split(builder.info, split)
  num_classes = builder.info.features["label"].num_classes
  records = builder.as_dataset(
      split=split, decoders={"image": tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(try_autocache=False))
  labels = records.map(lambda example: example["label"],
                       num_parallel_calls=tf.data.AUTOTUNE)
  counts = np.zeros(num_classes, np.int64)
  for chunk in labels.batch(65_536).as_numpy_iterator():
    counts += np.bincount(chunk, minlength=num_classes)
  return counts


def _view_kwargs(augment_config: ml_collections.ConfigDict) -> dict:
  """`augment.simclr_views` options; only crop and flip if `on_device`."""
  overrides = device_augment.view_overrides(augment_config)  # Checks them.
  if device_augment.enabled(augment_config):
    post_crop = dict(color_jitter_prob=0.0, grayscale_prob=0.0,
                     blur_prob=0.0, solarize_prob=0.0)
  else:
    post_crop = dict(color_jitter_prob=augment_config.color_jitter_prob,
                     grayscale_prob=augment_config.grayscale_prob,
                     blur_prob=augment_config.blur_prob,
                     solarize_prob=augment_config.solarize_prob,
                     view_overrides=overrides,
                     **{key: augment_config[key]
                        for key in augment.RANDAUGMENT_OPTIONS
                        if key in augment_config})
  saliency = dict(saliency_prob=augment_config.get("saliency_prob", 0.0),
                  saliency_fill=augment_config.get("saliency_fill", 0.0))
  for name, value in saliency.items():
    if not 0.0 <= value <= 1.0:
      raise ValueError(f"input.augment.{name} must be in [0, 1], got "
                       f"{value}.")
  return dict(**post_crop, **saliency,
      area_range=(augment_config.crop_area_min, augment_config.crop_area_max),
      aspect_range=(augment_config.crop_aspect_min,
                    augment_config.crop_aspect_max),
      flip=augment_config.flip,
      color_strength=augment_config.color_strength)


def _cached_shard(builder: tfds.core.DatasetBuilder, shard,
                  with_saliency: bool = False
                  ) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
  """This process's whole shard as (images, {key: labels}), in file order."""
  dataset = _read(builder, shard, shuffle_files=False,
                  with_saliency=with_saliency)
  size = builder.info.splits[shard].num_examples
  return dataset.batch(size).get_single_element()


def _indexed_examples(images: tf.Tensor, labels: dict[str, tf.Tensor], *,
                      local_batch_size: int, start_step: int,
                      seed: tf.Tensor) -> tf.data.Dataset:
  """(position, (image, labels)) from `start_step` on, epochs permuted by seed.

  An epoch is the largest whole number of local batches in the shard; the
  few examples left over differ from epoch to epoch.
  """
  shard_size = int(images.shape[0])
  epoch_length = shard_size // local_batch_size * local_batch_size

  def lookup(position):
    epoch, offset = position // epoch_length, position % epoch_length
    permutation_seed = tf.random.experimental.stateless_fold_in(seed, epoch)
    index = tf.random.experimental.index_shuffle(
        offset, permutation_seed, max_index=shard_size - 1)
    return position, (tf.gather(images, index),
                      {key: tf.gather(value, index)
                       for key, value in labels.items()})

  positions = tf.data.Dataset.range(start_step * local_batch_size, 2**62)
  return positions.map(lookup, num_parallel_calls=tf.data.AUTOTUNE)


def _streamed_examples(builder: tfds.core.DatasetBuilder, shard, *,
                       shuffle_buffer: int, local_batch_size: int,
                       start_step: int, seed: int,
                       with_saliency: bool = False,
                       with_index: bool = False) -> tf.data.Dataset:
  """(position, (image, labels)) replaying one seeded stream, skipping ahead.

  For datasets too large to hold in memory: the same seed gives the same
  sequence of records on every run, and the records before `start_step` are
  read but not decoded or augmented.
  """
  dataset = _read(builder, shard, shuffle_files=True, seed=seed,
                  with_saliency=with_saliency, with_index=with_index)
  dataset = dataset.shuffle(shuffle_buffer, seed=seed,
                            reshuffle_each_iteration=True)
  dataset = dataset.repeat().enumerate()
  return dataset.skip(start_step * local_batch_size)


def pretrain_dataset(input_config: ml_collections.ConfigDict, *, seed: int,
                     start_step: int = 0,
                     process_index: int | None = None,
                     process_count: int | None = None) -> tf.data.Dataset:
  """Infinite batches of augmented views of this process's shard of the split.

  Args:
    input_config: `config.input`: dataset, data_dir, train_split, batch_size
      (global, in images), views, image_size, shuffle_buffer and augment
      (see `configs/common.py`).
    seed: seeds the example order and augmentation.
    start_step: the first batch yielded is the one of this (0-based) step;
      batches are a pure function of (seed, step), see the module docstring.
    process_index: this process; default `jax.process_index()`.
    process_count: number of processes; default `jax.process_count()`.

  Returns:
    A dataset of {"image": float32 [b, views, S, S, C] in [0, 1],
    "label": int32 [b]}, plus "bias_label": int32 [b] for datasets that have
    it (e.g. `biased_fashion_mnist`), and "view_key" with
    `augment.on_device` (see `augmented_batches`); b = batch_size //
    process_count. The
    split is cut into process_count equal shards (dropping at most
    process_count - 1 examples) and each process reads only its own.
  """
  process_index, process_count = _process_shard(process_index, process_count)
  local_batch_size = _local_batch_size(input_config.batch_size, process_count)
  num_views = input_config.views
  if num_views < 1:
    raise ValueError(f"input.views must be >= 1, got {num_views}.")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}.")
  builder = _prepared_builder(input_config.dataset, input_config.data_dir)
  info = builder.info
  _check_split(info, input_config.train_split)
  shard = tfds.even_splits(input_config.train_split, n=process_count,
                           drop_remainder=True)[process_index]
  shard_size = info.splits[shard].num_examples
  if shard_size < local_batch_size:
    raise ValueError(
        f"Process {process_index}'s shard of '{input_config.train_split}' has "
        f"{shard_size} examples, fewer than its batch of {local_batch_size}; "
        "batches would repeat images, which the loss takes as negatives.")

  encoded = _is_jpeg(info)
  image_shape = info.features["image"].shape
  with_saliency = input_config.augment.get("saliency_prob", 0.0) > 0
  with_index = input_config.get("example_index", False)
  if with_saliency and SALIENCY_KEY not in info.features:
    raise ValueError(
        f"input.augment.saliency_prob > 0 (ReLICv2's saliency masking) needs "
        f"a '{SALIENCY_KEY}' feature in the dataset: a uint8 [H, W, 1] mask "
        f"per image, 255 where salient, of the image's size. "
        f"'{input_config.dataset}' has only {sorted(info.features)}; build a "
        "TFDS dataset that adds the masks, or set saliency_prob=0.")
  # Mixing in the process index keeps processes from sharing crops or orders.
  stream_seed = tf.constant([seed, process_index], tf.int64)
  if not encoded and _fits_in_memory(image_shape, shard_size):
    images, labels = _cached_shard(builder, shard, with_saliency)
    if with_index:
      # Equal shards (drop_remainder) lie in order: shard p starts at
      # p * shard_size of the split.
      labels = {**labels, INDEX_KEY: tf.range(shard_size, dtype=tf.int64)
                + process_index * shard_size}
    dataset = _indexed_examples(images, labels,
                                local_batch_size=local_batch_size,
                                start_step=start_step, seed=stream_seed)
  else:
    if with_index and input_config.train_split not in info.splits.keys():
      raise ValueError(
          f"input.example_index on a streamed dataset numbers the records "
          f"of a whole split; '{input_config.train_split}' is a slice of "
          f"one. Train on one of {sorted(info.splits.keys())}.")
    dataset = _streamed_examples(builder, shard,
                                 shuffle_buffer=input_config.shuffle_buffer,
                                 local_batch_size=local_batch_size,
                                 start_step=start_step, seed=seed,
                                 with_saliency=with_saliency,
                                 with_index=with_index)

  small_views = input_config.get("small_views", 0)
  if small_views < 0:
    raise ValueError(f"input.small_views must be >= 0, got {small_views}.")
  return augmented_batches(
      dataset, seed=stream_seed, local_batch_size=local_batch_size,
      num_views=num_views, image_size=input_config.image_size,
      encoded=encoded, channels=image_shape[-1],
      augment_config=input_config.augment, small_views=small_views,
      small_image_size=input_config.get("small_image_size", 96),
      small_crop_area=tuple(input_config.get("small_crop_area",
                                             (0.05, 0.14))))


def augmented_batches(examples: tf.data.Dataset, *, seed: tf.Tensor,
                      local_batch_size: int, num_views: int, image_size: int,
                      encoded: bool, channels: int,
                      augment_config: ml_collections.ConfigDict,
                      small_views: int = 0, small_image_size: int = 96,
                      small_crop_area: tuple[float, float] = (0.05, 0.14)
                      ) -> tf.data.Dataset:
  """Views and batches of (position, (image, {key: label})) examples.

  The augmentation half of `pretrain_dataset`, public so that
  `benchmarks/input_pipeline.py` measures exactly this code.

  Args:
    examples: (position, (image, labels)): position an int64 scalar, image
      a uint8 [H, W, C] (or, with `encoded`, a JPEG string), labels a dict
      of integer scalars and, for saliency masking, the `SALIENCY_KEY` mask
      (uint8 [H, W, 1]; only the large views are masked).
    seed: [2] int64 stream seed; the views of the example at position p are
      keyed by fold_in(seed, p), split into one seed per view.
    local_batch_size: examples per batch.
    num_views: views per example.
    image_size: output side S.
    encoded: whether images are JPEG strings, each decoded once for all its
      views, only in the union of their crop windows.
    channels: image channels C.
    augment_config: `config.input.augment` (see `configs/common.py`).
    small_views: multi-crop's extra views per example (0: none), keyed by
      seeds split after the `num_views` ones.
    small_image_size: their side.
    small_crop_area: their crops' range of the image's area.

  Returns:
    Batches {"image": float32 [b, views, S, S, C] in [0, 1], key: int32 [b]
    for each label key}. With `augment_config.on_device`, the views are
    only cropped and flipped, and "view_key": uint32 [b, views, 2] keys the
    rest, done by the train step (`contrastive/data/device_augment.py`).
    With `small_views`, also "image_small": float32 [b, small_views,
    small_image_size, small_image_size, C] (and "view_key_small").
  """
  view_kwargs = _view_kwargs(augment_config)
  on_device = device_augment.enabled(augment_config)
  if len(device_augment.view_overrides(augment_config)) > num_views:
    raise ValueError(
        f"input.augment.per_view has {len(augment_config.per_view)} entries "
        f"for {num_views} views; give at most one per view.")

  def make_views(position, example):
    image, labels = example
    labels = dict(labels)
    saliency = labels.pop(SALIENCY_KEY, None)
    example_seed = tf.random.experimental.stateless_fold_in(seed, position)
    all_seeds = tf.random.experimental.stateless_split(
        example_seed, num=num_views + small_views)
    view_seeds = all_seeds[:num_views]
    views = augment.simclr_views(image, view_seeds, size=image_size,
                                 encoded=encoded, channels=channels,
                                 saliency=saliency, **view_kwargs)
    batch = {"image": views,
             **{key: tf.cast(value, tf.int32)
                for key, value in labels.items()}}
    if on_device:
      batch[device_augment.VIEW_KEY] = augment.deferred_op_keys(view_seeds)
    if small_views:
      small_seeds = all_seeds[num_views:]
      batch[device_augment.SMALL_IMAGE] = augment.simclr_views(
          image, small_seeds, size=small_image_size, encoded=encoded,
          channels=channels, **{**view_kwargs, "area_range": small_crop_area,
                                "view_overrides": ()})
      if on_device:
        batch[device_augment.SMALL_VIEW_KEY] = augment.deferred_op_keys(
            small_seeds)
    return batch

  dataset = examples.map(make_views, num_parallel_calls=tf.data.AUTOTUNE)
  dataset = dataset.batch(local_batch_size, drop_remainder=True,
                          num_parallel_calls=tf.data.AUTOTUNE)
  return dataset.prefetch(tf.data.AUTOTUNE).with_options(_options())


def eval_dataset(dataset: str, split: str, *, global_batch_size: int,
                 image_size: int, data_dir: str | None,
                 process_index: int | None = None,
                 process_count: int | None = None,
                 with_index: bool = False) -> tf.data.Dataset:
  """One pass over this process's shard of `split`, padded to full batches.

  Args:
    dataset: TFDS name.
    split: split to read, TFDS slicing allowed.
    global_batch_size: images per step over all processes.
    image_size: output side S.
    data_dir: TFDS data dir; None for TFDS's default.
    process_index: this process; default `jax.process_index()`.
    process_count: number of processes; default `jax.process_count()`.
    with_index: also yield `INDEX_KEY`, each example's position in `split`.

  Returns:
    A finite dataset of {"image": float32 [b, S, S, C] in [0, 1],
    "label": int32 [b], "mask": bool [b]}, plus "bias_label": int32 [b] for
    datasets that have it; b = global_batch_size // process_count. Every
    example of the split appears exactly once with mask
    True across processes; padding (zeros, mask False) fills the last batches
    so that every batch has the same shape and every process yields the same
    number of batches (a multi-host eval step would otherwise hang).
  """
  process_index, process_count = _process_shard(process_index, process_count)
  local_batch_size = _local_batch_size(global_batch_size, process_count)
  builder = _prepared_builder(dataset, data_dir)
  info = builder.info
  _check_split(info, split)
  shards = tfds.even_splits(split, n=process_count, drop_remainder=False)
  shard_sizes = [info.splits[shard].num_examples for shard in shards]
  num_batches = -(-max(shard_sizes) // local_batch_size)
  shard_size = shard_sizes[process_index]

  encoded = _is_jpeg(info)
  image_shape = info.features["image"].shape
  channels = image_shape[-1]
  # Variable-size images are photos (ImageNet-like): centre-crop them as
  # SimCLR's eval does. Fixed-size ones (CIFAR, Fashion-MNIST) are whole.
  crop_fraction = (augment.EVAL_CROP_FRACTION if None in image_shape[:2]
                   else None)

  def preprocess(position, example):
    image, labels = example
    if with_index:
      labels = {**labels, INDEX_KEY: position + shard_start}
    image = augment.eval_view(image, size=image_size,
                              crop_fraction=crop_fraction, encoded=encoded,
                              channels=channels)
    return {"image": tf.ensure_shape(image, [image_size, image_size,
                                             channels]),
            **{key: tf.cast(value, tf.int32) for key, value in labels.items()},
            "mask": tf.constant(True)}

  padding = tf.data.Dataset.from_tensors({
      "image": tf.zeros([image_size, image_size, channels], tf.float32),
      **{key: tf.constant(0, tf.int32) for key in _label_keys(info)
         + ((INDEX_KEY,) if with_index else ())},
      "mask": tf.constant(False),
  }).repeat(num_batches * local_batch_size - shard_size)
  # The shards (sizes differing by at most one) lie in order in the split.
  shard_start = sum(shard_sizes[:process_index])
  examples = padding
  if shard_size:  # TFDS cannot read an empty shard (more processes than data).
    examples = _read(builder, shards[process_index],
                     shuffle_files=False).enumerate()
    examples = examples.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    examples = examples.concatenate(padding)
  batches = examples.batch(local_batch_size, drop_remainder=True)
  return batches.prefetch(tf.data.AUTOTUNE).with_options(_options())
