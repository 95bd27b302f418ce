"""Tests for the open-world (partially labelled) builder `open_world`.

Fake sources stand in for the real ones, with 12 train images per class (in
shuffled order), so `*_labeled50` labels 6 images of each seen class:

* Fashion-MNIST: IDX files written here (random pixels, so each image
  identifies its example).
* CIFAR-10/100: a fake builder named `cifar10` (`cifar100`), a subclass of
  TFDS's own with its own examples instead of the download, prepared in the
  test data_dir, as in `long_tail_test`; `open_world` then reads it with the
  real `tfds.builder("cifar10", data_dir=...)`.
"""

import numpy as np
import pytest
import tensorflow_datasets as tfds

import fake_sources
from contrastive.data import fashion_mnist
from contrastive.data import input_pipeline
from contrastive.data import open_world

_PER_CLASS = 12  # Train images per class of the fake sources.
_TEST_PER_CLASS = 3
_FASHION = "open_world/fashion_mnist_seen5_labeled50"


def _check_train(train, source_images, source_labels, seen: int,
                 num_classes: int):
  """The protocol: floor(n_c / 2) labelled per seen class, none novel."""
  labeled = train["open_label"] != open_world.UNLABELED
  counts = np.bincount(train["label"][labeled], minlength=num_classes)
  expected = [_PER_CLASS // 2] * seen + [0] * (num_classes - seen)
  np.testing.assert_array_equal(counts, expected)
  np.testing.assert_array_equal(train["open_label"][labeled],
                                train["label"][labeled])
  assert (train["open_label"][~labeled] == open_world.UNLABELED).all()
  # Every source image once, with its true label, and the labelled ones
  # those `labeled_indices` picks from the source in its file order.
  indices = fake_sources.source_indices(train["image"], source_images)
  assert sorted(indices) == list(range(len(source_labels)))
  np.testing.assert_array_equal(train["label"], source_labels[indices])
  np.testing.assert_array_equal(
      np.sort(indices[labeled]),
      open_world.labeled_indices(source_labels, range(seen), 0.5,
                                 open_world.SEED))


def _check_test(test, source_images, source_labels):
  assert (test["open_label"] == open_world.UNLABELED).all()
  indices = fake_sources.source_indices(test["image"], source_images)
  assert sorted(indices) == list(range(len(source_labels)))
  np.testing.assert_array_equal(test["label"], source_labels[indices])


# The labelled subset.


def test_labeled_indices_are_a_seeded_nested_subset_of_seen_classes():
  rng = np.random.default_rng(0)
  sizes = [30, 25, 20, 22, 40, 26, 21, 23]
  labels = rng.permutation(np.repeat(np.arange(8), sizes))
  indices = open_world.labeled_indices(labels, range(4), 0.5, seed=1)
  assert (np.diff(indices) > 0).all()  # Sorted, no repeats.
  np.testing.assert_array_equal(
      np.bincount(labels[indices], minlength=8), [15, 12, 10, 11, 0, 0, 0, 0])
  np.testing.assert_array_equal(
      indices, open_world.labeled_indices(labels, range(4), 0.5, seed=1))
  assert not np.array_equal(
      indices, open_world.labeled_indices(labels, range(4), 0.5, seed=2))
  # 25% within 50%: prefixes of the same permutation.
  quarter = open_world.labeled_indices(labels, range(4), 0.25, seed=1)
  np.testing.assert_array_equal(np.bincount(labels[quarter], minlength=4),
                                [7, 6, 5, 5])
  assert np.isin(quarter, indices).all()
  # Classes draw independently: more images of class 0 leave the others'.
  more = np.concatenate([labels, np.zeros(10, labels.dtype)])
  kept = open_world.labeled_indices(more, range(4), 0.5, seed=1)
  np.testing.assert_array_equal(kept[more[kept] != 0],
                                indices[labels[indices] != 0])
  # Exact floor for decimal fractions (0.29 * 100 is 28.999... in floats).
  assert len(open_world.labeled_indices(np.zeros(100, int), [0], 0.29, 0,
                                        num_classes=2)) == 29
  opened = open_world.open_labels(labels, range(4), 0.5, seed=1)
  assert opened.dtype == np.int64
  np.testing.assert_array_equal(np.flatnonzero(opened >= 0), indices)
  np.testing.assert_array_equal(opened[indices], labels[indices])


@pytest.mark.parametrize("args, match", [
    (([0, 1, 2], [0], 0.0, 0), "labeled_fraction"),
    (([0, 1, 2], [0], 1.5, 0), "labeled_fraction"),
    (([0, 1, 2], [3], 0.5, 0), "Seen classes"),
    (([0, 1, 2], [0, 0], 0.5, 0), "Seen classes"),
    (([0, 2, 2], [1], 0.5, 0), "Seen class 1 has no example"),
    (([0, -1], [0], 0.5, 0), "Labels must be in")])
def test_labeled_indices_reject_bad_arguments(args, match):
  with pytest.raises(ValueError, match=match):
    open_world.labeled_indices(np.array(args[0]), *args[1:])


def test_configs():
  names = {config.name for config in open_world.OpenWorld.BUILDER_CONFIGS}
  assert names == {"fashion_mnist_seen5_labeled50", "cifar10_seen5_labeled50",
                   "cifar100_seen50_labeled50"}


# Fashion-MNIST.


@pytest.fixture(scope="module")
def fashion_source(tmp_path_factory):
  folder = tmp_path_factory.mktemp("fashion_mnist_src")
  return str(folder), fake_sources.write_fashion_mnist(folder, _PER_CLASS,
                                                       _TEST_PER_CLASS)


@pytest.fixture(scope="module")
def fashion_data_dir(fashion_source, tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("tfds"))
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv(fashion_mnist.ENV_VAR, fashion_source[0])
    # Through the pipeline: open_world is prepared on first use.
    input_pipeline.dataset_info(_FASHION, folder)
  return folder


def test_fashion_mnist_train_follows_the_protocol(fashion_source,
                                                  fashion_data_dir):
  builder = tfds.builder(_FASHION, data_dir=fashion_data_dir)
  info = builder.info
  assert info.features["image"].shape == (28, 28, 1)
  assert info.features["label"].names == list(fashion_mnist.CLASS_NAMES)
  assert info.features["open_label"].dtype == np.int64
  assert dict(info.metadata) == {"seen_classes": [0, 1, 2, 3, 4],
                                 "labeled_fraction": 0.5,
                                 "seed": open_world.SEED}
  assert "3000 of the 6000" in info.description
  train = fake_sources.read(builder, "train")
  images, labels = fashion_source[1]["train"]
  train["image"] = train["image"][..., 0]
  _check_train(train, images, labels, seen=5, num_classes=10)


def test_fashion_mnist_test_is_the_full_split_unlabelled(fashion_source,
                                                         fashion_data_dir):
  builder = tfds.builder(_FASHION, data_dir=fashion_data_dir)
  test = fake_sources.read(builder, "test")
  test["image"] = test["image"][..., 0]
  _check_test(test, *fashion_source[1]["test"])


def test_fashion_mnist_without_files_says_where_to_get_them(tmp_path,
                                                            monkeypatch):
  monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match="FASHION_MNIST_DIR"):
    input_pipeline.dataset_info(_FASHION, str(tmp_path))


def test_pretraining_batches_carry_open_label(fashion_data_dir):
  config = fake_sources.pretrain_config(_FASHION, fashion_data_dir,
                                        batch_size=60)
  batch = next(input_pipeline.pretrain_dataset(
      config, seed=0, process_index=0, process_count=1).as_numpy_iterator())
  assert batch["image"].shape == (60, 2, 28, 28, 1)
  assert batch["label"].dtype == np.int32
  assert batch["open_label"].dtype == np.int32
  assert batch["open_label"].shape == (60,)
  labeled = batch["open_label"] != -1
  np.testing.assert_array_equal(batch["open_label"][labeled],
                                batch["label"][labeled])
  assert (batch["label"][labeled] < 5).all()
  # 60 of the 120 images are labelled: a batch of half of them has both.
  assert 0 < labeled.sum() < 60


# CIFAR.


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
  """A data_dir with fake cifar10 / cifar100 and their open-world sets."""
  folder = str(tmp_path_factory.mktemp("tfds_cifar"))
  rng = np.random.default_rng(1)
  sources = {}
  for base, num_classes, seen in (
      (tfds.image_classification.Cifar10, 10, 5),
      (tfds.image_classification.Cifar100, 100, 50)):
    data = {"train": fake_sources.fake_split(rng, num_classes, _PER_CLASS, (32, 32, 3)),
            "test": fake_sources.fake_split(rng, num_classes, 1, (32, 32, 3))}
    names = [f"fake_{base.name}_{c}" for c in range(num_classes)]
    fake_sources.fake_cifar_source(base, data, names)(data_dir=folder).download_and_prepare(
        download_config=fake_sources.NO_GCS)
    # Through the pipeline: prepared on first use from the prepared source.
    input_pipeline.dataset_info(
        f"open_world/{base.name}_seen{seen}_labeled50", folder)
    sources[base.name] = data, names
  return folder, sources


@pytest.mark.parametrize("source, num_classes, seen", [("cifar10", 10, 5),
                                                       ("cifar100", 100, 50)])
def test_cifar_follows_the_protocol(cifar, source, num_classes, seen):
  folder, sources = cifar
  data, names = sources[source]
  builder = tfds.builder(f"open_world/{source}_seen{seen}_labeled50",
                         data_dir=folder)
  info = builder.info
  assert info.features["image"].shape == (32, 32, 3)
  assert info.features["label"].names == names
  assert info.metadata["seen_classes"] == list(range(seen))
  assert info.metadata["labeled_fraction"] == 0.5
  _check_train(fake_sources.read(builder, "train"), *data["train"], seen=seen,
               num_classes=num_classes)
  _check_test(fake_sources.read(builder, "test"), *data["test"])


def test_cifar_without_source_names_the_build_command(tmp_path):
  with pytest.raises(FileNotFoundError) as error:
    input_pipeline.dataset_info("open_world/cifar100_seen50_labeled50",
                                str(tmp_path))
  assert f"`python -m contrastive.data.prepare cifar100 --data_dir={tmp_path}`" in str(error.value)
  assert "open_world/cifar100_seen50_labeled50" in str(error.value)
