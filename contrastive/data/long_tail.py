"""Long-tailed datasets: TFDS builders `fashion_mnist_lt` and `cifar_lt`.

The exponential profile of Cao et al. ("Learning Imbalanced Datasets with
Label-Distribution-Aware Margin Loss", NeurIPS 2019), which ResCom and PaCo
use for CIFAR-10/100-LT: with C classes, the largest of `max_count` images
and imbalance factor IF (largest / smallest class),

    n_c = int(max_count * IF ** (-c / (C - 1))),  c = 0, ..., C - 1,

so class 0 is the head (max_count images) and class C - 1 the tail
(max_count / IF). `train` keeps a seeded random subset of n_c images of each
class c of the balanced source's training split; `test` is the source's full,
balanced test split.

Builders and configs (`input.dataset = "<builder>/<config>"`):

* `fashion_mnist_lt/if10`, `/if50`, `/if100`: from Fashion-MNIST's local IDX
  files, as `fashion_mnist_idx` reads them (`$FASHION_MNIST_DIR`, else
  Debian's `dataset-fashion-mnist` folder; no network). 6000 images per class
  in the source, so train has `FASHION_MNIST_LT_COUNTS[config]` images per
  class: 24516, 16796 and 14886 in all; test has 10000.
* `cifar_lt/cifar10_if10`, ..., `cifar_lt/cifar100_if100`: from the TFDS
  `cifar10` / `cifar100` datasets, which must be prepared first in the same
  data_dir (`python -m contrastive.data.prepare cifar10 --data_dir=DIR` needs
  the network once); then `python -m contrastive.data.prepare
  cifar_lt/cifar10_if100 --data_dir=DIR` (or any first use) derives the
  long-tailed one without network. CIFAR-10-LT keeps 5000 -> 500 / 100 / 50
  images per class (20431, 13996, 12406 in all), CIFAR-100-LT 500 -> 50 / 10
  / 5 (19573, 12608, 10847): the published sizes. CIFAR-100's `label` is the
  fine label.

The per-class counts of a prepared train split are in its metadata
(`info.metadata["train_counts"]`, with "imbalance" and "seed"), which is what
`contrastive.evaluation.long_tail.shot_accuracies` needs as `train_counts`.

Determinism: the subset is a function of the source's training labels in
file order, the imbalance factor and `SEED`: class c keeps the first n_c of a
permutation drawn by its own NumPy PCG64 generator seeded with (SEED, c), so
one class's size does not move another's draws, and the subset of a larger IF
is contained in that of a smaller one (prefixes of the same permutation).
NumPy does not promise the same streams across its versions, but a prepared
dataset stays as written. The counts are Cao et al.'s; the images are not
theirs (their code shuffles each class with NumPy's global legacy generator).
CIFAR's file order is its TFDS `id` ("train_00000", ...), i.e. the order of
the original batch files, not TFDS's storage order.
"""

from collections.abc import Mapping

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from contrastive.data import fashion_mnist
from contrastive.data import prepare

# Seeds the per-class subsets of every config (2019: Cao et al.'s year).
SEED = 2019

IMBALANCES = (10, 50, 100)

# Train images per class of fashion_mnist_lt (6000 per class in the source);
# equal to long_tail_counts(6000, 10, imbalance), written out to document.
FASHION_MNIST_LT_COUNTS = {
    "if10": (6000, 4645, 3596, 2784, 2156, 1669, 1292, 1000, 774, 600),
    "if50": (6000, 3884, 2515, 1628, 1054, 682, 442, 286, 185, 120),
    "if100": (6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60),
}

# TFDS source of each cifar_lt config family: its number of classes.
CIFAR_SOURCES = {"cifar10": 10, "cifar100": 100}
CIFAR_IMAGE_SHAPE = (32, 32, 3)

_CITATION = """\
@inproceedings{cao2019learning,
  title     = {Learning Imbalanced Datasets with Label-Distribution-Aware
               Margin Loss},
  author    = {Cao, Kaidi and Wei, Colin and Gaidon, Adrien and Arechiga,
               Nikos and Ma, Tengyu},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2019},
}
"""

CIFAR_CITATION = """\
@techreport{krizhevsky2009learning,
  title       = {Learning Multiple Layers of Features from Tiny Images},
  author      = {Krizhevsky, Alex},
  institution = {University of Toronto},
  year        = {2009},
}
"""


def checked_labels(labels, num_classes: int | None
                   ) -> tuple[np.ndarray, int]:
  """(labels as an array, num_classes, by default max + 1), or a
  ValueError if a label is outside [0, num_classes)."""
  labels = np.asarray(labels)
  if num_classes is None:
    num_classes = int(labels.max()) + 1 if labels.size else 0
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"Labels must be in [0, {num_classes}); got "
                     f"[{labels.min()}, {labels.max()}].")
  return labels, num_classes


def long_tail_counts(max_count: int, num_classes: int,
                     imbalance: float) -> np.ndarray:
  """Images per class of Cao et al.'s exponential long-tailed profile.

  Args:
    max_count: images of the head class (class 0).
    num_classes: C, at least 2.
    imbalance: the imbalance factor IF >= 1 (head / tail).

  Returns:
    int64 [C]: `int(max_count * imbalance ** (-c / (C - 1)))`, non-increasing,
    from `max_count` down to `int(max_count / imbalance)`.

  Raises:
    ValueError: if an argument is out of range, or the tail class would get
      no image.
  """
  if num_classes < 2:
    raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
  if max_count < 1:
    raise ValueError(f"max_count must be at least 1, got {max_count}.")
  if not imbalance >= 1:  # Also rejects NaN.
    raise ValueError(f"imbalance (largest / smallest class) must be >= 1, "
                     f"got {imbalance}.")
  # Cao et al.'s own expression, float for float, so that int() truncates
  # to their published counts.
  counts = np.array([
      int(max_count * imbalance**(-c / (num_classes - 1.0)))
      for c in range(num_classes)
  ], np.int64)
  if counts[-1] < 1:
    raise ValueError(
        f"Imbalance {imbalance} leaves the tail class of {max_count} / "
        f"{imbalance} < 1 image; use a smaller factor or more images.")
  return counts


def long_tail_indices(labels: np.ndarray, imbalance: float, seed: int, *,
                      num_classes: int | None = None) -> np.ndarray:
  """Indices of a long-tailed subset of a (roughly) balanced split.

  Args:
    labels: int [n] class labels in [0, num_classes).
    imbalance: the imbalance factor (class 0 keeps the most images, the last
      class `1 / imbalance` of that).
    seed: seeds the per-class choice (with the class index).
    num_classes: C; defaults to `labels.max() + 1`.

  Returns:
    int64 [sum n_c], sorted (the source's order kept): for each class c, n_c
    of its indices, where n = `long_tail_counts(m, C, imbalance)` and m is
    the smallest class's size (so every class has its n_c).

  Raises:
    ValueError: if a class has no example or a label is out of range.
  """
  labels, num_classes = checked_labels(labels, num_classes)
  sizes = np.bincount(labels.astype(np.int64), minlength=num_classes)
  if num_classes and sizes.min() == 0:
    raise ValueError(f"Class {int(np.argmin(sizes))} has no example; a "
                     "long-tailed subset needs every class.")
  counts = long_tail_counts(int(sizes.min()) if num_classes else 0,
                            num_classes, imbalance)
  kept = []
  for label, count in enumerate(counts):
    # A generator per class: one class's size does not move another's draws.
    rng = np.random.default_rng([seed, label])
    members = np.flatnonzero(labels == label)
    # A prefix of one permutation: a larger imbalance keeps a subset of what
    # a smaller one keeps.
    kept.append(members[rng.permutation(len(members))[:count]])
  return np.sort(np.concatenate(kept)).astype(np.int64)


def _counts_text(counts) -> str:
  return ", ".join(str(int(n)) for n in counts)


class LongTailConfig(tfds.core.BuilderConfig):
  """An imbalance factor, and for `cifar_lt` the source dataset."""

  def __init__(self, *, imbalance: int, source: str | None = None, **kwargs):
    """Makes the config `if<imbalance>` or `<source>_if<imbalance>`.

    Args:
      imbalance: the imbalance factor (head / tail class size).
      source: the TFDS source (`cifar_lt` only).
      **kwargs: passed to `tfds.core.BuilderConfig`.
    """
    name = f"if{imbalance}" if source is None else f"{source}_if{imbalance}"
    super().__init__(
        name=name,
        description=(f"Train: exponential long tail, imbalance {imbalance} "
                     "(Cao et al., 2019); test: the full balanced split."),
        **kwargs)
    self.imbalance = imbalance
    self.source = source


def _long_tail_metadata(counts: np.ndarray,
                        imbalance: int) -> tfds.core.MetadataDict:
  # Saved with the prepared dataset (metadata.json): the shot groups of the
  # evaluation need the train counts without rereading the split.
  return tfds.core.MetadataDict(train_counts=[int(n) for n in counts],
                                imbalance=imbalance, seed=SEED)


def _examples(images: np.ndarray, labels: np.ndarray,
              indices: np.ndarray | None = None):
  """Yields the examples `indices` (default: all), keyed by source index.

  Keys are source indices, so an image has the same key in every config.
  """
  if indices is None:
    indices = np.arange(len(labels))
  for index in indices:
    yield int(index), {"image": images[index], "label": int(labels[index])}


class FashionMnistLt(tfds.core.GeneratorBasedBuilder):
  """Long-tailed Fashion-MNIST (28x28x1), from local IDX files."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [LongTailConfig(imbalance=i) for i in IMBALANCES]

  def _info(self) -> tfds.core.DatasetInfo:
    side = fashion_mnist.IMAGE_SIDE
    imbalance = self.builder_config.imbalance
    counts = FASHION_MNIST_LT_COUNTS[self.builder_config.name]
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Fashion-MNIST with a long-tailed train split (Cao et al.'s "
            f"exponential profile, imbalance {imbalance}): per class "
            f"{_counts_text(counts)} images ({sum(counts)} in all) from the "
            "6000 per class of the original files; test: the full balanced "
            "10000."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(side, side, 1)),
            "label": tfds.features.ClassLabel(
                names=fashion_mnist.CLASS_NAMES),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
        # pylint: disable-next=protected-access
        citation=_CITATION + fashion_mnist._CITATION,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    folder = fashion_mnist.checked_source_dir()
    images, labels = fashion_mnist.read_split(folder, "train")
    imbalance = self.builder_config.imbalance
    num_classes = len(fashion_mnist.CLASS_NAMES)
    indices = long_tail_indices(labels, imbalance, SEED,
                                num_classes=num_classes)
    # The counts actually kept (FASHION_MNIST_LT_COUNTS for the real files),
    # known before the metadata is written.
    self.info.metadata.update(_long_tail_metadata(
        np.bincount(labels[indices], minlength=num_classes), imbalance))
    test_images, test_labels = fashion_mnist.read_split(folder, "test")
    return {
        "train": self._generate_examples(images[..., None], labels, indices),
        "test": self._generate_examples(test_images[..., None], test_labels),
    }

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray,
                         indices: np.ndarray | None = None):
    return _examples(images, labels, indices)


def load_tfds_source(
    name: str, data_dir: epath.PathLike
) -> tuple[Mapping[str, tuple[np.ndarray, np.ndarray]], list[str]]:
  """Reads a prepared TFDS image dataset whole, in its original file order.

  The one place `cifar_lt` touches its source; tests replace the source, not
  this function.

  Args:
    name: the TFDS name (`cifar10`, `cifar100`).
    data_dir: the TFDS data_dir it is prepared in.

  Returns:
    ({"train": (images, labels), "test": ...}, label names): uint8 images
    [n, H, W, C] and int64 labels [n], sorted by the source's `id` feature
    when it has one (CIFAR's "train_00000", ...: the original files' order).

  Raises:
    FileNotFoundError: if the source is not prepared in `data_dir`, with the
      command that prepares it.
  """
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    raise prepare.DatasetNotPreparedError(
        f"TFDS dataset '{name}', the source of cifar_lt, is not prepared in "
        f"data_dir={data_dir}: {builder.data_dir} does not exist. Prepare it "
        f"first (this needs the network once) with "
        f"`{prepare.command(name, data_dir)}`, then prepare cifar_lt again.")
  splits = {}
  for split in ("train", "test"):
    examples = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1,
                                                shuffle_files=False))
    order = (np.argsort(examples["id"], kind="stable") if "id" in examples
             else np.arange(len(examples["label"])))
    splits[split] = (examples["image"][order],
                     examples["label"][order].astype(np.int64))
  return splits, list(builder.info.features["label"].names)


class CifarLt(tfds.core.GeneratorBasedBuilder):
  """CIFAR-10-LT and CIFAR-100-LT (32x32x3), from prepared TFDS CIFAR."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      LongTailConfig(imbalance=i, source=source)
      for source in CIFAR_SOURCES for i in IMBALANCES
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    source = self.builder_config.source
    imbalance = self.builder_config.imbalance
    num_classes = CIFAR_SOURCES[source]
    counts = long_tail_counts(50000 // num_classes, num_classes, imbalance)
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            f"{source} with a long-tailed train split (Cao et al.'s "
            f"exponential profile, imbalance {imbalance}): {counts[0]} down "
            f"to {counts[-1]} images per class ({counts.sum()} in all) from "
            f"the {counts[0]} per class of TFDS '{source}'; test: its full "
            "balanced split. Per-class counts: info.metadata['train_counts']."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=CIFAR_IMAGE_SHAPE),
            # Names are the source's, set when preparing (as TFDS's cifar
            # builders do): they come with the source's files.
            "label": tfds.features.ClassLabel(num_classes=num_classes),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/kaidic/LDAM-DRW",
        citation=_CITATION + CIFAR_CITATION,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The source is read from this builder's own data_dir.
    source = self.builder_config.source
    splits, names = load_tfds_source(source, self.data_dir_root)
    num_classes = CIFAR_SOURCES[source]
    if len(names) != num_classes:
      raise ValueError(f"TFDS '{source}' has {len(names)} classes; cifar_lt "
                       f"expects {num_classes}.")
    self.info.features["label"].names = names
    images, labels = splits["train"]
    indices = long_tail_indices(labels, self.builder_config.imbalance, SEED,
                                num_classes=num_classes)
    self.info.metadata.update(_long_tail_metadata(
        np.bincount(labels[indices], minlength=num_classes),
        self.builder_config.imbalance))
    return {
        "train": self._generate_examples(images, labels, indices),
        "test": self._generate_examples(*splits["test"]),
    }

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray,
                         indices: np.ndarray | None = None):
    return _examples(images, labels, indices)
