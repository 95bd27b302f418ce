"""Tests for the `biased_fashion_mnist` builder and its `bias_label` batches.

Fake IDX files (random pixels, so each image identifies its example) stand in
for Fashion-MNIST: 1000 train images (about 100 per class, so rho = 0.9 leaves
about 10 bias-conflicting images per class) and 2000 test images (enough to
tell uniform colours from label-tied ones).
"""

import decimal

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

import fake_fashion_mnist
from contrastive.data import biased_fashion_mnist as bfm
from contrastive.data import fashion_mnist
from contrastive.data import input_pipeline

_NUM_TRAIN, _NUM_TEST = 1000, 2000
_RHOS = ("0.99", "0.995", "0.997", "0.999", "0.9")
# Prepared in the test data_dir: the quick config and one of the paper's.
_PREPARED_RHOS = ("0.9", "0.99")


def _name(rho: str) -> str:
  return f"biased_fashion_mnist/rho{rho}"


def _expected_aligned(rho: str, n: int) -> int:
  # Decimal, not float: 0.995 * 1000 must give 995, not 994.
  return int((decimal.Decimal(rho) * n).to_integral_value(decimal.ROUND_FLOOR))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  folder = tmp_path_factory.mktemp("fashion_mnist_src")
  return str(folder), fake_fashion_mnist.write(folder, _NUM_TRAIN, _NUM_TEST)


@pytest.fixture(scope="module")
def data_dir(source, tmp_path_factory):
  """A TFDS data_dir with both builders prepared once for the module."""
  folder = str(tmp_path_factory.mktemp("tfds"))
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv(fashion_mnist.ENV_VAR, source[0])
    for rho in _PREPARED_RHOS:
      input_pipeline.dataset_info(_name(rho), folder)
    input_pipeline.dataset_info("fashion_mnist_idx", folder)
  return folder


def _by_image(images: np.ndarray) -> dict[bytes, int]:
  """Maps each image's bytes to its index, to identify examples."""
  lookup = {image.tobytes(): i for i, image in enumerate(images)}
  assert len(lookup) == len(images), "Test images must be distinct."
  return lookup


def _read_split(data_dir: str, rho: str, split: str,
                source_images: np.ndarray) -> dict[str, np.ndarray]:
  """The whole split as numpy arrays, in the source files' order.

  TFDS stores examples in an order of its own; each is matched to its source
  image through its grayscale (the minimum over channels, as every colour
  has a zero channel).
  """
  builder = tfds.builder(_name(rho), data_dir=data_dir)
  size = builder.info.splits[split].num_examples
  dataset = builder.as_dataset(split=split, batch_size=size)
  examples = tfds.as_numpy(dataset.get_single_element())
  lookup = _by_image(source_images)
  order = [lookup[image.min(axis=-1).tobytes()] for image in examples["image"]]
  assert sorted(order) == list(range(len(source_images)))
  return {key: value[np.argsort(order)] for key, value in examples.items()}


def _input_config(data_dir: str, dataset: str,
                  **overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(dict(
      dataset=dataset, data_dir=data_dir, train_split="train", batch_size=16,
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


def _to_uint8(images: np.ndarray) -> np.ndarray:
  return np.round(images * 255).astype(np.uint8)


# Builder.


def test_configs_and_features(data_dir):
  names = {config.name for config in bfm.BiasedFashionMnist.BUILDER_CONFIGS}
  assert names == {f"rho{rho}" for rho in _RHOS}
  info = input_pipeline.dataset_info(_name("0.99"), data_dir)
  assert info.features["image"].shape == (28, 28, 3)
  assert info.features["label"].names == list(fashion_mnist.CLASS_NAMES)
  assert info.features["bias_label"].names == list(bfm.COLOUR_NAMES)
  assert info.features["bias_label"].dtype == np.int64
  assert info.splits["train"].num_examples == _NUM_TRAIN
  assert info.splits["test"].num_examples == _NUM_TEST


def test_colours_are_distinct_and_keep_a_zero_channel():
  assert bfm.COLOURS.shape == (10, 3)
  assert len({tuple(c) for c in bfm.COLOURS}) == 10
  assert (bfm.COLOURS.min(axis=1) == 0).all()


@pytest.mark.parametrize("rho", _PREPARED_RHOS)
def test_train_has_the_requested_bias(source, data_dir, rho):
  images, labels = source[1]["train"]
  split = _read_split(data_dir, rho, "train", images)
  np.testing.assert_array_equal(split["label"], labels)
  total_aligned = 0
  for label in range(10):
    colours = split["bias_label"][split["label"] == label]
    expected = _expected_aligned(rho, len(colours))
    assert (colours == label).sum() == expected, f"class {label}"
    others = np.bincount(colours[colours != label], minlength=10)
    others = np.delete(others, label)
    assert others.sum() == len(colours) - expected
    assert others.max() - others.min() <= 1, f"class {label}: {others}"
    total_aligned += expected
  fraction = np.mean(split["bias_label"] == split["label"])
  assert fraction == total_aligned / _NUM_TRAIN
  assert float(rho) - 0.02 <= fraction <= float(rho)


@pytest.mark.parametrize("rho", _RHOS)
def test_biased_colours_floor_exactly_for_every_config(rho):
  # Class sizes chosen so float rho * n would round wrongly for some rho.
  sizes = [1000, 1001, 999, 2000, 6000, 7, 1, 0, 333, 4500]
  labels = np.repeat(np.arange(10), sizes)
  colours = bfm.biased_colours(labels, rho, seed=3)
  np.testing.assert_array_equal(colours,
                                bfm.biased_colours(labels, rho, seed=3))
  for label, size in enumerate(sizes):
    class_colours = colours[labels == label]
    assert (class_colours == label).sum() == _expected_aligned(rho, size)
    others = np.delete(np.bincount(class_colours, minlength=10), label)
    assert others.max() - others.min() <= 1


def test_larger_rho_extends_the_aligned_subset():
  labels = np.repeat(np.arange(10), 1000)
  low = bfm.biased_colours(labels, "0.99", seed=0) == labels
  high = bfm.biased_colours(labels, "0.999", seed=0) == labels
  assert (high | ~low).all()  # Every image aligned at 0.99 is at 0.999.


def test_test_colours_are_not_tied_to_labels(source, data_dir):
  images, _ = source[1]["test"]
  split = _read_split(data_dir, "0.99", "test", images)
  matches = np.sum(split["bias_label"] == split["label"])
  # Binomial(2000, 0.1): mean 200, sd 13.4; 5 sd is a loose bound.
  assert abs(matches - 200) <= 67, matches
  counts = np.bincount(split["bias_label"], minlength=10)
  assert (np.abs(counts - 200) <= 67).all(), counts
  # The unbiased split does not depend on rho.
  other = _read_split(data_dir, "0.9", "test", images)
  np.testing.assert_array_equal(split["bias_label"], other["bias_label"])
  np.testing.assert_array_equal(split["image"], other["image"])


def test_colorize_keeps_texture_and_colours_the_background():
  ramp = np.arange(256, dtype=np.uint8)
  images = np.tile(ramp[None, None, :], (10, 1, 1))  # [10, 1, 256]
  coloured = bfm.colorize(images, np.arange(10))
  assert coloured.shape == (10, 1, 256, 3) and coloured.dtype == np.uint8
  for k, colour in enumerate(bfm.COLOURS):
    np.testing.assert_array_equal(coloured[k, 0, 0], colour)  # p = 0.
    np.testing.assert_array_equal(coloured[k, 0, 255], [255, 255, 255])
    np.testing.assert_array_equal(coloured[k, 0].min(axis=-1), ramp)
    expected = np.round(ramp[:, None] + (1 - ramp[:, None] / 255) * colour)
    np.testing.assert_array_equal(coloured[k, 0], expected)
    # Monotone in p: brighter garment pixels stay brighter.
    assert (np.diff(coloured[k, 0].astype(int), axis=0) >= 0).all()


@pytest.mark.parametrize("split_name", ["train", "test"])
def test_builder_colours_each_source_image(source, data_dir, split_name):
  images, labels = source[1][split_name]
  split = _read_split(data_dir, "0.9", split_name, images)
  np.testing.assert_array_equal(split["image"].min(axis=-1), images)
  np.testing.assert_array_equal(split["label"], labels)
  background = images == 0
  colours = bfm.COLOURS[split["bias_label"]][:, None, None, :]
  colours = np.broadcast_to(colours, split["image"].shape)
  np.testing.assert_array_equal(split["image"][background],
                                colours[background])


def test_missing_source_files_say_how_to_get_them(tmp_path, monkeypatch):
  empty = tmp_path / "empty"
  empty.mkdir()
  monkeypatch.setenv(fashion_mnist.ENV_VAR, str(empty))
  with pytest.raises(FileNotFoundError, match="FASHION_MNIST_DIR"):
    input_pipeline.dataset_info(_name("0.9"), str(tmp_path / "tfds"))


# Pipelines.


def test_pretrain_batches_carry_bias_labels(source, data_dir):
  images, _ = source[1]["train"]
  lookup = _by_image(images)
  split = _read_split(data_dir, "0.9", "train", images)
  config = _identity_augment(_input_config(data_dir, _name("0.9"), views=1))
  dataset = input_pipeline.pretrain_dataset(config, seed=0, process_index=1,
                                            process_count=2)
  assert set(dataset.element_spec) == {"image", "label", "bias_label"}
  for batch in dataset.take(3).as_numpy_iterator():
    assert batch["image"].shape == (8, 1, 28, 28, 3)
    assert batch["bias_label"].shape == (8,)
    assert batch["bias_label"].dtype == np.int32
    views = _to_uint8(batch["image"][:, 0])
    for view, label, bias in zip(views, batch["label"], batch["bias_label"]):
      index = lookup[view.min(axis=-1).tobytes()]
      assert label == split["label"][index]
      assert bias == split["bias_label"][index]
      np.testing.assert_array_equal(view, split["image"][index])


def test_pretrain_augments_colour_images(data_dir):
  # SimCLR's full recipe (jitter, grayscale, blur, solarize) on 28x28x3.
  config = _input_config(data_dir, _name("0.9"), views=2)
  batch = next(input_pipeline.pretrain_dataset(
      config, seed=1, process_index=0, process_count=1).as_numpy_iterator())
  assert batch["image"].shape == (16, 2, 28, 28, 3)
  assert batch["image"].min() >= 0.0 and batch["image"].max() <= 1.0
  assert not np.array_equal(batch["image"][:, 0], batch["image"][:, 1])
  assert ((batch["bias_label"] >= 0) & (batch["bias_label"] < 10)).all()


def test_eval_batches_carry_bias_labels_with_padding(source, data_dir):
  images, _ = source[1]["test"]
  split = _read_split(data_dir, "0.9", "test", images)
  lookup = _by_image(split["image"])
  # test[:21] over 2 processes (11 + 10) in batches of 4: 3 batches each,
  # padded at the end.
  seen, num_padded = [], 0
  for process_index in range(2):
    dataset = input_pipeline.eval_dataset(
        _name("0.9"), "test[:21]", global_batch_size=8, image_size=28,
        data_dir=data_dir, process_index=process_index, process_count=2)
    assert set(dataset.element_spec) == {"image", "label", "bias_label",
                                         "mask"}
    for batch in dataset.as_numpy_iterator():
      assert batch["bias_label"].shape == (4,)
      assert batch["bias_label"].dtype == np.int32
      mask = batch["mask"]
      assert not batch["bias_label"][~mask].any()
      num_padded += np.sum(~mask)
      for image, label, bias in zip(_to_uint8(batch["image"][mask]),
                                    batch["label"][mask],
                                    batch["bias_label"][mask]):
        index = lookup[image.tobytes()]
        assert label == split["label"][index]
        assert bias == split["bias_label"][index]
        seen.append(index)
  assert len(seen) == len(set(seen)) == 21
  assert num_padded == 3


def test_datasets_without_bias_labels_get_no_new_key(data_dir):
  config = _input_config(data_dir, "fashion_mnist_idx")
  pretrain = input_pipeline.pretrain_dataset(config, seed=0, process_index=0,
                                             process_count=1)
  assert set(pretrain.element_spec) == {"image", "label"}
  evaluation = input_pipeline.eval_dataset(
      "fashion_mnist_idx", "test", global_batch_size=8, image_size=28,
      data_dir=data_dir, process_index=0, process_count=1)
  assert set(evaluation.element_spec) == {"image", "label", "mask"}
