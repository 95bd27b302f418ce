"""Tests for the long-tailed builders and the many/medium/few-shot accuracy.

Fake sources stand in for the real ones, with 20 train images per class (in
shuffled order), so `if10` keeps 20 -> 2 images per class:

* Fashion-MNIST: IDX files written here (random pixels, so each image
  identifies its example).
* CIFAR-10/100: a fake builder named `cifar10` (`cifar100`), a subclass of
  TFDS's own with its own examples instead of the download, prepared in the
  test data_dir. `cifar_lt` then reads it with the real
  `tfds.builder("cifar10", data_dir=...)`, so everything of `cifar_lt` is
  exercised (finding and reading the prepared source, restoring its label
  names, id order, the subset, metadata) except TFDS's download and parsing
  of the real CIFAR files.
"""

import numpy as np
import pytest
import tensorflow_datasets as tfds

import fake_sources
from contrastive.data import fashion_mnist
from contrastive.data import input_pipeline
from contrastive.data import long_tail
from contrastive.evaluation import long_tail as lt_eval

_PER_CLASS = 20  # Train images per class of the fake sources.
_NUM_TEST = 30
_IF10_COUNTS = [20, 15, 11, 9, 7, 5, 4, 3, 2, 2]  # int(20 * 10**(-c / 9)).


# Profile and subset.


@pytest.mark.parametrize("max_count, num_classes, imbalance", [
    (5000, 10, 100), (5000, 10, 10), (500, 100, 100), (6000, 10, 50),
    (7, 3, 1), (20, 10, 10)])
def test_counts_follow_the_formula(max_count, num_classes, imbalance):
  counts = long_tail.long_tail_counts(max_count, num_classes, imbalance)
  expected = [int(max_count * imbalance**(-c / (num_classes - 1)))
              for c in range(num_classes)]
  np.testing.assert_array_equal(counts, expected)
  assert counts[0] == max_count
  assert counts[-1] == max_count // imbalance
  assert (np.diff(counts) <= 0).all()


def test_counts_are_the_published_ones():
  cifar10 = long_tail.long_tail_counts(5000, 10, 100)
  assert cifar10.tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83,
                              50]
  # Published CIFAR-10-LT / CIFAR-100-LT train sizes (Cao et al.; PaCo).
  totals = {(10, 5000): (20431, 13996, 12406),
            (100, 500): (19573, 12608, 10847)}
  for (num_classes, max_count), sizes in totals.items():
    for imbalance, size in zip(long_tail.IMBALANCES, sizes):
      counts = long_tail.long_tail_counts(max_count, num_classes, imbalance)
      assert counts.sum() == size
  for name, counts in long_tail.FASHION_MNIST_LT_COUNTS.items():
    imbalance = int(name.removeprefix("if"))
    np.testing.assert_array_equal(
        long_tail.long_tail_counts(6000, 10, imbalance), counts)


@pytest.mark.parametrize("args, match", [
    ((100, 10, 0.5), "imbalance"), ((100, 10, float("nan")), "imbalance"),
    ((100, 1, 10), "num_classes"), ((0, 10, 10), "max_count"),
    ((50, 10, 100), "tail class")])
def test_counts_reject_bad_arguments(args, match):
  with pytest.raises(ValueError, match=match):
    long_tail.long_tail_counts(*args)


def test_indices_are_a_seeded_subset_with_the_profile():
  rng = np.random.default_rng(0)
  sizes = [300, 250, 200, 220, 400, 260, 210, 230, 240, 205]
  labels = rng.permutation(np.repeat(np.arange(10), sizes))
  indices = long_tail.long_tail_indices(labels, 10, seed=1)
  assert (np.diff(indices) > 0).all()  # Sorted, no repeats.
  np.testing.assert_array_equal(np.bincount(labels[indices]),
                                long_tail.long_tail_counts(200, 10, 10))
  np.testing.assert_array_equal(
      indices, long_tail.long_tail_indices(labels, 10, seed=1))
  other = long_tail.long_tail_indices(labels, 10, seed=2)
  assert not np.array_equal(indices, other)
  # A larger imbalance keeps a subset of what a smaller one keeps.
  assert np.isin(long_tail.long_tail_indices(labels, 100, seed=1),
                 indices).all()
  # Classes draw independently: more images of class 0 (appended) leave the
  # others' choice as it was.
  more = np.concatenate([labels, np.zeros(50, labels.dtype)])
  kept = long_tail.long_tail_indices(more, 10, seed=1)
  np.testing.assert_array_equal(kept[more[kept] != 0],
                                indices[labels[indices] != 0])


def test_indices_need_every_class():
  with pytest.raises(ValueError, match="Class 2 has no example"):
    long_tail.long_tail_indices(np.array([0, 1, 3, 0, 1, 3]), 2, seed=0)


# fashion_mnist_lt.


@pytest.fixture(scope="module")
def fashion_source(tmp_path_factory):
  folder = tmp_path_factory.mktemp("fashion_mnist_src")
  return str(folder), fake_sources.write_fashion_mnist(folder, _PER_CLASS, 3)


@pytest.fixture(scope="module")
def fashion_data_dir(fashion_source, tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("tfds"))
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv(fashion_mnist.ENV_VAR, fashion_source[0])
    # Through the pipeline: fashion_mnist_lt is prepared on first use.
    input_pipeline.dataset_info("fashion_mnist_lt/if10", folder)
  return folder


def test_fashion_mnist_lt_train_has_the_profile(fashion_source,
                                                fashion_data_dir):
  builder = tfds.builder("fashion_mnist_lt/if10", data_dir=fashion_data_dir)
  info = builder.info
  assert info.features["image"].shape == (28, 28, 1)
  assert info.features["label"].names == list(fashion_mnist.CLASS_NAMES)
  assert info.metadata["train_counts"] == _IF10_COUNTS
  assert info.metadata["imbalance"] == 10
  assert "6000, 4645, 3596" in info.description
  train = fake_sources.read(builder, "train")
  images, labels = fashion_source[1]["train"]
  np.testing.assert_array_equal(np.bincount(train["label"]), _IF10_COUNTS)
  indices = fake_sources.source_indices(train["image"][..., 0], images)
  np.testing.assert_array_equal(train["label"], labels[indices])
  np.testing.assert_array_equal(
      np.sort(indices),
      long_tail.long_tail_indices(labels, 10, long_tail.SEED))


def test_fashion_mnist_lt_test_is_the_full_split(fashion_source,
                                                 fashion_data_dir):
  builder = tfds.builder("fashion_mnist_lt/if10", data_dir=fashion_data_dir)
  test = fake_sources.read(builder, "test")
  images, labels = fashion_source[1]["test"]
  indices = fake_sources.source_indices(test["image"][..., 0], images)
  assert sorted(indices) == list(range(len(images)))
  np.testing.assert_array_equal(test["label"], labels[indices])


def test_fashion_mnist_lt_errors(fashion_source, tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="if7"):
    tfds.builder("fashion_mnist_lt/if7", data_dir=str(tmp_path))
  # 20 images per class cannot give a tail of 20 / 100.
  monkeypatch.setenv(fashion_mnist.ENV_VAR, fashion_source[0])
  with pytest.raises(ValueError, match="tail class"):
    input_pipeline.dataset_info("fashion_mnist_lt/if100", str(tmp_path))
  monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match="FASHION_MNIST_DIR"):
    input_pipeline.dataset_info("fashion_mnist_lt/if10", str(tmp_path))


def test_fashion_mnist_lt_feeds_the_pretraining_pipeline(fashion_data_dir):
  config = fake_sources.pretrain_config("fashion_mnist_lt/if10",
                                        fashion_data_dir, batch_size=8)
  batch = next(input_pipeline.pretrain_dataset(
      config, seed=0, process_index=0, process_count=1).as_numpy_iterator())
  assert batch["image"].shape == (8, 2, 28, 28, 1)
  assert ((batch["label"] >= 0) & (batch["label"] < 10)).all()


# cifar_lt.


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
  """A data_dir with fake cifar10 / cifar100 and their `if10` LT sets."""
  folder = str(tmp_path_factory.mktemp("tfds_cifar"))
  rng = np.random.default_rng(1)
  sources = {}
  for base, num_classes in ((tfds.image_classification.Cifar10, 10),
                            (tfds.image_classification.Cifar100, 100)):
    data = {"train": fake_sources.fake_split(rng, num_classes, _PER_CLASS, (32, 32, 3)),
            "test": fake_sources.fake_split(rng, num_classes, 1, (32, 32, 3))}
    names = [f"fake_{base.name}_{c}" for c in range(num_classes)]
    fake_sources.fake_cifar_source(base, data, names)(data_dir=folder).download_and_prepare(
        download_config=fake_sources.NO_GCS)
    tfds.builder(f"cifar_lt/{base.name}_if10",
                 data_dir=folder).download_and_prepare(download_config=fake_sources.NO_GCS)
    sources[base.name] = data, names
  return folder, sources


@pytest.mark.parametrize("source, num_classes", [("cifar10", 10),
                                                 ("cifar100", 100)])
def test_cifar_lt_has_the_profile_and_full_test(cifar, source, num_classes):
  folder, sources = cifar
  data, names = sources[source]
  builder = tfds.builder(f"cifar_lt/{source}_if10", data_dir=folder)
  info = builder.info
  assert info.features["image"].shape == (32, 32, 3)
  assert info.features["label"].names == names
  counts = long_tail.long_tail_counts(_PER_CLASS, num_classes, 10)
  assert info.metadata["train_counts"] == counts.tolist()
  train = fake_sources.read(builder, "train")
  np.testing.assert_array_equal(np.bincount(train["label"]), counts)
  images, labels = data["train"]
  indices = fake_sources.source_indices(train["image"], images)
  np.testing.assert_array_equal(train["label"], labels[indices])
  # The subset of the source in its file (id) order.
  np.testing.assert_array_equal(
      np.sort(indices),
      long_tail.long_tail_indices(labels, 10, long_tail.SEED))
  test = fake_sources.read(builder, "test")
  indices = fake_sources.source_indices(test["image"], data["test"][0])
  assert sorted(indices) == list(range(num_classes))
  np.testing.assert_array_equal(test["label"], data["test"][1][indices])


def test_cifar_lt_without_source_names_the_build_command(tmp_path):
  builder = tfds.builder("cifar_lt/cifar100_if50", data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError) as error:
    builder.download_and_prepare(download_config=fake_sources.NO_GCS)
  assert f"`python -m contrastive.data.prepare cifar100 --data_dir={tmp_path}`" in str(error.value)


def test_cifar_lt_configs():
  names = {config.name for config in long_tail.CifarLt.BUILDER_CONFIGS}
  assert names == {f"{source}_if{i}" for source in ("cifar10", "cifar100")
                   for i in (10, 50, 100)}


# Shot accuracies.


def test_shot_group_boundaries():
  groups = lt_eval.shot_groups([101, 100, 50, 20, 19, 0, 5000])
  assert groups.tolist() == ["many", "medium", "medium", "medium", "few",
                             "few", "many"]
  groups = lt_eval.shot_groups(long_tail.FASHION_MNIST_LT_COUNTS["if100"],
                               **lt_eval.FASHION_MNIST_LT_THRESHOLDS)
  assert groups.tolist() == ["many"] * 4 + ["medium"] * 3 + ["few"] * 3
  with pytest.raises(ValueError, match="few_threshold"):
    lt_eval.shot_groups([5], many_threshold=10, few_threshold=11)


def test_shot_accuracies_match_a_loop():
  rng = np.random.default_rng(0)
  train_counts = np.array([500, 101, 100, 60, 20, 19, 5, 300])
  labels = rng.integers(0, 8, 400)
  predictions = np.where(rng.random(400) < 0.6, labels,
                         rng.integers(0, 8, 400))
  result = lt_eval.shot_accuracies(predictions, labels, train_counts)
  groups = {"many": [0, 1, 7], "medium": [2, 3, 4], "few": [5, 6]}
  for group, classes in groups.items():
    hits = [p == y for p, y in zip(predictions, labels) if y in classes]
    assert result[f"{group}_top1"] == pytest.approx(sum(hits) / len(hits))
  assert result["group_sizes"] == {"many": 3, "medium": 3, "few": 2}
  per_class = [np.mean([p == y for p, y in zip(predictions, labels) if y == c])
               for c in range(8)]
  np.testing.assert_allclose(result["per_class_top1"], per_class)
  assert result["mean_class_top1"] == pytest.approx(np.mean(per_class))
  assert result["top1"] == pytest.approx(np.mean(predictions == labels))
  # Scores give the same as their argmax.
  scores = np.eye(8)[predictions] + 0.1 * rng.random((400, 8))
  assert lt_eval.shot_accuracies(scores, labels, train_counts) == result


def test_empty_groups_are_none():
  result = lt_eval.shot_accuracies(np.array([0, 1, 1]), np.array([0, 1, 2]),
                                   [5000, 2997, 139])
  assert result["few_top1"] is None and result["medium_top1"] is None
  assert result["many_top1"] == pytest.approx(2 / 3)
  assert result["group_sizes"] == {"many": 3, "medium": 0, "few": 0}
  # A class without test example is None, and left out of the class mean.
  result = lt_eval.shot_accuracies(np.array([0, 0]), np.array([0, 0]),
                                   [200, 50, 10])
  assert result["per_class_top1"] == [1.0, None, None]
  assert result["mean_class_top1"] == 1.0
  assert result["medium_top1"] is None and result["few_top1"] is None
  with pytest.raises(ValueError, match="Labels must be in"):
    lt_eval.shot_accuracies(np.array([0]), np.array([3]), [200, 50, 10])


def test_pipeline_prepares_cifar_lt_on_first_use_or_says_what_is_missing(
    tmp_path):
  with pytest.raises(FileNotFoundError,
                     match="contrastive.data.prepare cifar10 --data_dir="):
    input_pipeline.dataset_info("cifar_lt/cifar10_if100", str(tmp_path))
