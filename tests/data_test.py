"""Tests for contrastive/data: the IDX builder, augmentations, pipelines.

Tiny IDX files (40 train, 12 test images of random pixels, so every image is
distinct and identifies its example) stand in for Fashion-MNIST; one slow
test reads the real files when the Debian package is installed.
"""

import gzip
import os
import struct

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import fake_fashion_mnist
from contrastive.data import augment
from contrastive.data import fashion_mnist
from contrastive.data import input_pipeline

_NAME = "fashion_mnist_idx"
_NUM_TRAIN, _NUM_TEST = 40, 12


def _by_image(images: np.ndarray) -> dict[bytes, int]:
  """Maps each image's bytes to its index, to identify examples."""
  lookup = {image.tobytes(): i for i, image in enumerate(images)}
  assert len(lookup) == len(images), "Test images must be distinct."
  return lookup


def _to_uint8(images: np.ndarray) -> np.ndarray:
  return np.round(images * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  folder = tmp_path_factory.mktemp("fashion_mnist_src")
  return str(folder), fake_fashion_mnist.write(folder, _NUM_TRAIN, _NUM_TEST)


@pytest.fixture(scope="module")
def data_dir(source, tmp_path_factory):
  """A TFDS data_dir with the tiny dataset prepared once for the module."""
  folder = str(tmp_path_factory.mktemp("tfds"))
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv(fashion_mnist.ENV_VAR, source[0])
    input_pipeline.dataset_info(_NAME, folder)
  return folder


def _input_config(data_dir, **overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(dict(
      dataset=_NAME, data_dir=data_dir, train_split="train", batch_size=8,
      views=2, image_size=28, shuffle_buffer=64,
      augment=dict(crop_area_min=0.08, crop_area_max=1.0,
                   crop_aspect_min=3 / 4, crop_aspect_max=4 / 3, flip=True,
                   color_jitter_prob=0.8, color_strength=1.0,
                   grayscale_prob=0.2, blur_prob=0.5, solarize_prob=0.2)))
  config.update(overrides)
  return config


def _identity_augment(config: ml_collections.ConfigDict):
  """Makes every view the whole, unchanged image, so it identifies it."""
  config.augment.update(crop_area_min=1.0, crop_aspect_min=1.0,
                        crop_aspect_max=1.0, flip=False, color_jitter_prob=0.0,
                        grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)
  return config


def _take(dataset: tf.data.Dataset, count: int) -> list[dict[str, np.ndarray]]:
  return list(dataset.take(count).as_numpy_iterator())


# Builder.


def test_builder_reads_the_written_images_and_labels(source, data_dir):
  builder = tfds.builder(_NAME, data_dir=data_dir)
  info = builder.info
  assert info.version == "1.0.0"
  assert info.features["image"].shape == (28, 28, 1)
  assert info.features["label"].names == list(fashion_mnist.CLASS_NAMES)
  assert info.supervised_keys == ("image", "label")
  for split, (images, labels) in source[1].items():
    assert info.splits[split].num_examples == len(images)
    lookup = _by_image(images)
    seen = []
    for example in builder.as_dataset(split=split).as_numpy_iterator():
      assert example["image"].shape == (28, 28, 1)
      index = lookup[example["image"][..., 0].tobytes()]
      assert example["label"] == labels[index]
      seen.append(index)
    assert sorted(seen) == list(range(len(images)))


def test_missing_files_say_how_to_get_them(tmp_path, monkeypatch):
  empty = tmp_path / "empty"
  empty.mkdir()
  monkeypatch.setenv(fashion_mnist.ENV_VAR, str(empty))
  with pytest.raises(FileNotFoundError) as error:
    input_pipeline.dataset_info(_NAME, str(tmp_path / "tfds"))
  message = str(error.value)
  assert "apt-get install dataset-fashion-mnist" in message
  assert "make data" in message
  assert "FASHION_MNIST_DIR" in message
  assert str(empty) in message
  assert "train-images-idx3-ubyte.gz" in message


@pytest.mark.parametrize("content, match", [
    (b"", "too short"),
    (struct.pack(">3I", 0x0803, 2, 28), "too short"),
    (struct.pack(">4I", 0x0D03, 1, 28, 28) + bytes(784), "magic number"),
    (struct.pack(">4I", 0x0803, 2, 28, 28) + bytes(784), "truncated"),
])
def test_malformed_idx_fails_clearly(tmp_path, content, match):
  path = tmp_path / "bad-idx3-ubyte.gz"
  with gzip.open(path, "wb") as f:
    f.write(content)
  with pytest.raises(ValueError, match=match):
    fashion_mnist.read_idx_ubyte(path, rank=3)


def test_non_gzip_file_fails_clearly(tmp_path):
  path = tmp_path / "plain-idx1-ubyte.gz"
  path.write_bytes(struct.pack(">2I", 0x0801, 0))
  with pytest.raises(ValueError, match="gzip"):
    fashion_mnist.read_idx_ubyte(path, rank=1)


def test_mismatched_label_count_fails(tmp_path):
  fake_fashion_mnist.write(tmp_path, _NUM_TRAIN, _NUM_TEST)
  fake_fashion_mnist.write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(5, np.uint8))
  with pytest.raises(ValueError, match="12 images but .* 5 labels"):
    fashion_mnist.read_split(tmp_path, "test")


# Dataset info and splits.


def test_num_examples_and_slicing(data_dir):
  assert input_pipeline.num_examples(_NAME, "train", data_dir) == _NUM_TRAIN
  assert input_pipeline.num_examples(_NAME, "train[:10%]", data_dir) == 4
  assert input_pipeline.num_examples(_NAME, "train+test", data_dir) == 52


def test_wrong_split_lists_available_splits(data_dir):
  with pytest.raises(ValueError, match=r"Available splits: \['test', 'train'"):
    input_pipeline.num_examples(_NAME, "validation", data_dir)


def test_unprepared_dataset_says_how_to_get_it(tmp_path):
  with pytest.raises(FileNotFoundError) as error:
    input_pipeline.dataset_info("imagenet2012", str(tmp_path))
  message = str(error.value)
  assert str(tmp_path) in message
  assert "python -m contrastive.data.prepare imagenet2012" in message
  assert "downloads/manual" in message


# Pretraining pipeline.


def test_pretrain_shapes_dtypes_and_range(data_dir):
  config = _input_config(data_dir, image_size=20, views=3)
  dataset = input_pipeline.pretrain_dataset(config, seed=0, process_index=0,
                                            process_count=2)
  spec = dataset.element_spec
  assert spec["image"].shape == (4, 3, 20, 20, 1)
  assert spec["label"].shape == (4,)
  batch = _take(dataset, 1)[0]
  assert batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32
  assert batch["image"].min() >= 0.0 and batch["image"].max() <= 1.0
  assert np.all((batch["label"] >= 0) & (batch["label"] < 10))
  views = batch["image"]
  for i in range(len(views)):
    assert not np.array_equal(views[i, 0], views[i, 1])
    assert not np.array_equal(views[i, 1], views[i, 2])


def test_pretrain_is_reproducible_by_seed(data_dir):
  config = _input_config(data_dir)

  def first_batches(seed):
    dataset = input_pipeline.pretrain_dataset(config, seed=seed,
                                              process_index=0, process_count=1)
    return _take(dataset, 6)  # More than an epoch: covers the reshuffle.

  first, again, other = first_batches(3), first_batches(3), first_batches(4)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.array_equal(first[0]["image"], other[0]["image"])


@pytest.mark.parametrize("process_count", [2, 4])
def test_pretrain_process_shards_partition_the_split(source, data_dir,
                                                     process_count):
  images, labels = source[1]["train"]
  lookup = _by_image(images)
  config = _identity_augment(_input_config(data_dir, views=1))
  shards = []
  for process_index in range(process_count):
    dataset = input_pipeline.pretrain_dataset(
        config, seed=0, process_index=process_index,
        process_count=process_count)
    # Shuffling happens before repeating, so the first shard-size examples
    # are exactly one epoch of the shard.
    epoch = _take(dataset, _NUM_TRAIN // config.batch_size)
    seen = []
    for batch in epoch:
      assert batch["image"].shape[0] == config.batch_size // process_count
      for image, label in zip(_to_uint8(batch["image"][:, 0, ..., 0]),
                              batch["label"]):
        index = lookup[image.tobytes()]
        assert label == labels[index]
        seen.append(index)
    assert len(seen) == len(set(seen)) == _NUM_TRAIN // process_count
    shards.append(set(seen))
  assert set.union(*shards) == set(range(_NUM_TRAIN))


@pytest.mark.parametrize("in_memory", [True, False])
def test_pretrain_starts_at_any_step_with_the_same_batches(
    data_dir, monkeypatch, in_memory):
  # Both the in-memory sampler and the streamed fallback must resume exactly.
  if not in_memory:
    monkeypatch.setattr(input_pipeline, "_fits_in_memory", lambda *_: False)
  config = _input_config(data_dir)

  def batches(start_step, count):
    return _take(input_pipeline.pretrain_dataset(
        config, seed=5, start_step=start_step, process_index=1,
        process_count=2), count)

  # 20 examples per shard, batch 4: step 7 is in the second epoch.
  full = batches(0, 9)
  for start_step in (1, 7):
    for a, b in zip(full[start_step:], batches(start_step, 2)):
      np.testing.assert_array_equal(a["image"], b["image"])
      np.testing.assert_array_equal(a["label"], b["label"])


def test_pretrain_epochs_are_different_permutations(source, data_dir):
  lookup = _by_image(source[1]["train"][0])
  config = _identity_augment(_input_config(data_dir, views=1))
  batches = _take(input_pipeline.pretrain_dataset(
      config, seed=0, process_index=0, process_count=1), 10)
  order = [lookup[image.tobytes()] for batch in batches
           for image in _to_uint8(batch["image"][:, 0, ..., 0])]
  first, second = order[:_NUM_TRAIN], order[_NUM_TRAIN:]
  assert sorted(first) == sorted(second) == list(range(_NUM_TRAIN))
  assert first != second


def test_pretrain_rejects_indivisible_batch(data_dir):
  with pytest.raises(ValueError, match="not divisible"):
    input_pipeline.pretrain_dataset(_input_config(data_dir, batch_size=10),
                                    seed=0, process_index=0, process_count=4)


# Eval pipeline.


@pytest.mark.parametrize("split, process_count, global_batch_size", [
    ("test", 1, 8),  # 12 examples: one full batch, one padded.
    ("test", 2, 8),
    ("test", 4, 4),  # Exactly 3 batches of 1 per process, no padding.
    ("test[:7]", 2, 4),  # Uneven shards (4, 3): padding evens them out.
    ("test[:3]", 4, 8),  # One process has no examples, only padding.
])
def test_eval_covers_each_example_once(source, data_dir, split, process_count,
                                       global_batch_size):
  images, labels = source[1]["test"]
  lookup = _by_image(images)
  expected = input_pipeline.num_examples(_NAME, split, data_dir)
  local_batch_size = global_batch_size // process_count
  seen, batch_counts = [], set()
  for process_index in range(process_count):
    dataset = input_pipeline.eval_dataset(
        _NAME, split, global_batch_size=global_batch_size, image_size=28,
        data_dir=data_dir, process_index=process_index,
        process_count=process_count)
    batches = list(dataset.as_numpy_iterator())
    batch_counts.add(len(batches))
    for batch in batches:
      assert batch["image"].shape == (local_batch_size, 28, 28, 1)
      assert batch["image"].dtype == np.float32
      assert batch["label"].dtype == np.int32
      assert batch["mask"].dtype == bool
      mask = batch["mask"]
      assert not batch["image"][~mask].any()
      for image, label in zip(_to_uint8(batch["image"][mask][..., 0]),
                              batch["label"][mask]):
        index = lookup[image.tobytes()]
        assert label == labels[index]
        seen.append(index)
  assert len(batch_counts) == 1  # Every process runs the same eval steps.
  assert len(seen) == len(set(seen)) == expected
  assert batch_counts.pop() == -(-expected // global_batch_size)


def test_eval_resizes_small_images(data_dir):
  dataset = input_pipeline.eval_dataset(
      _NAME, "test", global_batch_size=4, image_size=32, data_dir=data_dir,
      process_index=0, process_count=1)
  batch = _take(dataset, 1)[0]
  assert batch["image"].shape == (4, 32, 32, 1)
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0


# Augmentations.


def _image(channels: int, side: int = 32, seed: int = 0) -> tf.Tensor:
  rng = np.random.default_rng(seed)
  return tf.constant(rng.uniform(size=(side, side, channels)), tf.float32)


def _jpeg(side: int = 48) -> tf.Tensor:
  rng = np.random.default_rng(1)
  pixels = rng.integers(0, 256, (side, side + 16, 3), dtype=np.uint8)
  return tf.io.encode_jpeg(pixels)


_AUGMENT_CASES = {
    "crop": (lambda x, s: augment.random_resized_crop(x, s, size=24), 3),
    "jpeg_crop": (lambda x, s: augment.decode_and_random_resized_crop(
        x, s, size=24), "jpeg"),
    "flip": (augment.random_flip, 3),
    "jitter_rgb": (lambda x, s: augment.color_jitter(x, s, strength=1.0), 3),
    "jitter_gray": (lambda x, s: augment.color_jitter(x, s, strength=1.0), 1),
    "random_jitter": (lambda x, s: augment.random_color_jitter(
        x, s, strength=0.5, prob=0.8), 3),
    "grayscale": (lambda x, s: augment.random_grayscale(x, s, prob=0.5), 3),
    "blur": (lambda x, s: augment.random_blur(x, s, prob=0.5), 3),
    "solarize": (lambda x, s: augment.random_solarize(x, s, prob=0.5), 3),
    "view_rgb": (lambda x, s: augment.simclr_view(
        x, s, size=24, solarize_prob=0.2), 3),
    "view_gray": (lambda x, s: augment.simclr_view(x, s, size=24), 1),
    "view_jpeg": (lambda x, s: augment.simclr_view(
        x, s, size=24, encoded=True), "jpeg"),
    "views_jpeg": (lambda x, s: augment.simclr_views(
        x, tf.random.experimental.stateless_split(s, 2), size=24,
        encoded=True), "jpeg"),
}


@pytest.mark.parametrize("name", sorted(_AUGMENT_CASES))
def test_augment_eager_equals_tf_data(name):
  op, kind = _AUGMENT_CASES[name]
  image = _jpeg() if kind == "jpeg" else _image(kind)
  seeds = tf.constant([[0, 1], [7, 3], [123, 456], [5, 5]], tf.int64)
  eager = np.stack([op(image, seed).numpy() for seed in seeds])
  dataset = tf.data.Dataset.from_tensor_slices(seeds).map(
      lambda seed: op(image, seed), num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True)
  graph = np.stack(list(dataset.as_numpy_iterator()))
  np.testing.assert_array_equal(eager, graph)
  assert eager.dtype == np.float32
  assert eager.min() >= 0.0 and eager.max() <= 1.0
  # Same seed, same output; and the seeds do not all give the same output.
  np.testing.assert_array_equal(op(image, seeds[1]).numpy(), eager[1])
  assert any(not np.array_equal(eager[0], e) for e in eager[1:])


def test_grayscale_paths():
  gray = _image(1)
  np.testing.assert_array_equal(augment.to_grayscale(gray), gray)
  np.testing.assert_array_equal(
      augment.random_grayscale(gray, tf.constant([0, 0]), prob=1.0), gray)
  rgb = augment.to_grayscale(_image(3)).numpy()
  assert rgb.shape == (32, 32, 3)
  np.testing.assert_array_equal(rgb[..., 0], rgb[..., 1])
  np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
  view = augment.simclr_view(gray, tf.constant([1, 2]), size=16,
                             color_jitter_prob=1.0, grayscale_prob=1.0,
                             blur_prob=1.0)
  assert view.shape == (16, 16, 1)


def test_blur_keeps_the_mean_and_smooths():
  image = _image(3, side=64)
  blurred = augment.gaussian_blur(image, tf.constant(2.0), radius=3).numpy()
  assert blurred.shape == (64, 64, 3)
  assert abs(blurred.mean() - image.numpy().mean()) < 0.01
  assert blurred.std() < 0.5 * image.numpy().std()
  constant = tf.fill([28, 28, 1], 0.3)
  np.testing.assert_allclose(
      augment.gaussian_blur(constant, tf.constant(1.0), radius=1), constant,
      atol=1e-6)


def test_solarize_inverts_bright_pixels():
  image = tf.constant([[[0.2], [0.5], [0.9]]])
  np.testing.assert_allclose(augment.solarize(image)[..., 0],
                             [[0.2, 0.5, 0.1]], atol=1e-6)


def test_eval_view_center_crops_large_images():
  jpeg = _jpeg(side=64)  # 64 x 80.
  view = augment.eval_view(jpeg, size=32, crop_fraction=0.875, encoded=True)
  assert view.shape == (32, 32, 3)
  decoded = tf.io.decode_jpeg(jpeg)
  expected = augment.eval_view(decoded, size=32, crop_fraction=0.875)
  # The fused decode-and-crop equals cropping the decoded image, but for the
  # last column: libjpeg upsamples chroma differently at the window's edge.
  np.testing.assert_allclose(view[:, :-1], expected[:, :-1], atol=1e-6)
  assert np.abs(view - expected).mean() < 0.01
  small = tf.constant(np.arange(28 * 28).reshape(28, 28, 1) % 256, tf.uint8)
  np.testing.assert_array_equal(augment.eval_view(small, size=28),
                                small.numpy() / np.float32(255))


# Real data.


@pytest.mark.slow
def test_real_fashion_mnist(tmp_path, installed_fashion_mnist):
  data_dir = str(tmp_path)
  info = input_pipeline.dataset_info(_NAME, data_dir)
  assert info.splits["train"].num_examples == 60_000
  assert info.splits["test"].num_examples == 10_000
  assert input_pipeline.num_examples(_NAME, "test[:10%]", data_dir) == 1_000
  batch = _take(input_pipeline.eval_dataset(
      _NAME, "test", global_batch_size=256, image_size=28, data_dir=data_dir,
      process_index=0, process_count=1), 1)[0]
  assert batch["mask"].all()
  assert set(batch["label"]) == set(range(10))


def test_multi_crop_adds_small_views_and_keeps_the_large_ones(data_dir):
  plain = _input_config(data_dir)
  multi = _input_config(data_dir, small_views=3, small_image_size=12,
                        small_crop_area=(0.1, 0.3))
  first = _take(input_pipeline.pretrain_dataset(plain, seed=5), 1)[0]
  both = _take(input_pipeline.pretrain_dataset(multi, seed=5), 1)[0]
  assert both["image_small"].shape == (8, 3, 12, 12, 1)
  assert both["image_small"].dtype == np.float32
  assert 0.0 <= both["image_small"].min() <= both["image_small"].max() <= 1.0
  # The small views' seeds are split after the large ones': adding them
  # changes nothing else in the batch.
  np.testing.assert_array_equal(both["image"], first["image"])
  np.testing.assert_array_equal(both["label"], first["label"])
  assert "image_small" not in first
  # Each small view is its own crop.
  assert not np.allclose(both["image_small"][:, 0], both["image_small"][:, 1])
  with pytest.raises(ValueError, match="small_views must be >= 0"):
    input_pipeline.pretrain_dataset(
        _input_config(data_dir, small_views=-1), seed=5)


def _split_order(data_dir, split):
  """Image bytes -> position in the split as TFDS stores it (TFDS shuffles
  examples when it writes them, so not the IDX files' order)."""
  builder = tfds.builder(_NAME, data_dir=data_dir)
  images = [example["image"][..., 0] for example in tfds.as_numpy(
      builder.as_dataset(split=split, shuffle_files=False))]
  return _by_image(np.stack(images))


def test_example_index_is_the_position_in_the_split(data_dir, monkeypatch):
  lookup = _split_order(data_dir, "train")
  config = _identity_augment(_input_config(data_dir, views=1,
                                           example_index=True))
  for process_index in range(2):
    batch = _take(input_pipeline.pretrain_dataset(
        config, seed=0, process_index=process_index, process_count=2), 1)[0]
    assert batch["index"].dtype == np.int32
    np.testing.assert_array_equal(
        batch["index"], [lookup[image.tobytes()] for image in
                         _to_uint8(batch["image"][:, 0, ..., 0])])
    # Each process's indices are its own half of the split.
    assert set(batch["index"]) <= set(range(20 * process_index,
                                            20 * process_index + 20))
  test_lookup = _split_order(data_dir, "test[:7]")
  seen = []
  for process_index in range(2):  # Uneven shards of 4 and 3.
    for batch in input_pipeline.eval_dataset(
        _NAME, "test[:7]", global_batch_size=4, image_size=28,
        data_dir=data_dir, process_index=process_index, process_count=2,
        with_index=True).as_numpy_iterator():
      mask = batch["mask"]
      np.testing.assert_array_equal(
          batch["index"][mask], [test_lookup[image.tobytes()] for image in
                                 _to_uint8(batch["image"][mask][..., 0])])
      seen.extend(batch["index"][mask])
  assert sorted(seen) == list(range(7))
  # Streamed (as ImageNet): the index comes from the records' TFDS ids.
  monkeypatch.setattr(input_pipeline, "_fits_in_memory", lambda *_: False)
  for process_index in range(2):
    for batch in _take(input_pipeline.pretrain_dataset(
        config, seed=0, process_index=process_index, process_count=2), 3):
      np.testing.assert_array_equal(
          batch["index"], [lookup[image.tobytes()] for image in
                           _to_uint8(batch["image"][:, 0, ..., 0])])
  config.train_split = "train[:20]"
  with pytest.raises(ValueError, match="whole split"):
    input_pipeline.pretrain_dataset(config, seed=0)


def test_file_index_reads_the_shard_and_position_of_a_tfds_id():
  starts = tf.constant([0, 1251, 2502, 3753], tf.int64)
  ids = tf.constant(["imagenet2012-train.tfrecord-00002-of-01024__15",
                     "imagenet2012-train.tfrecord-00000-of-01024__0",
                     "x-y-z-train.array_record-00003-of-00004__1250"])
  index = tf.map_fn(lambda i: input_pipeline._file_index(i, starts), ids,  # pylint: disable=protected-access
                    fn_output_signature=tf.int64)
  np.testing.assert_array_equal(index, [2517, 0, 5003])
