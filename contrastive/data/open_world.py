"""Open-world (partially labelled) datasets: TFDS builder `open_world`.

The open-world semi-supervised protocol of ORCA (Cao, Brbic and Leskovec,
"Open-World Semi-Supervised Learning", ICLR 2022) and OpenCon (Sun and Li,
"OpenCon: Open-world Contrastive Learning", TMLR 2023): classes
0, ..., S - 1 are *seen* (known), classes S, ..., C - 1 *novel*. In the
`train` split a seeded fraction of each seen class's images is labelled;
every other training image, the rest of the seen classes and all images of
the novel classes, is unlabelled. `test` is the source's full test split, all
classes, with their true labels; it is evaluated by Hungarian-matched
clustering accuracy on all, seen and novel classes (not here).

Features: `image` (the source's), `label` (ClassLabel: the TRUE class of
every image, labelled or not, kept for evaluation only) and `open_label`
(int64 scalar: the class of a labelled training image, -1 for an unlabelled
one and for every test image, whose labels are for evaluation only).

What a trainer must not do: give `label` to a loss. It holds the true class
of the unlabelled images too, so a loss reading it is supervised on the
novel classes and on the unlabelled part of the seen ones, which the
protocol forbids. Losses read `open_label` (-1: no label); `label` is for
evaluation (clustering accuracy, kNN / linear probes) and diagnostics only.

Builder configs (`input.dataset = "open_world/<config>"`):

* `fashion_mnist_seen5_labeled50`: from Fashion-MNIST's local IDX files, as
  `fashion_mnist_idx` reads them (`$FASHION_MNIST_DIR`, else Debian's
  `dataset-fashion-mnist` folder; no network). 5 seen classes (T-shirt/top
  ... Coat), 3000 of their 6000 images each labelled: 15000 labelled and
  45000 unlabelled train images; test has 10000.
* `cifar10_seen5_labeled50`, `cifar100_seen50_labeled50`: ORCA's and
  OpenCon's CIFAR settings (the first half of the classes seen, half of
  their images labelled), from the TFDS `cifar10` / `cifar100` datasets,
  which must be prepared first in the same data_dir (`python -m
  contrastive.data.prepare cifar10 --data_dir=DIR` needs the network once);
  then `python -m contrastive.data.prepare open_world/cifar10_seen5_labeled50
  --data_dir=DIR` (or any first use) derives the
  open-world one without network, as `cifar_lt` does (see `long_tail`).
  CIFAR-10: 2500 labelled images per seen class (12500 in all, 37500
  unlabelled); CIFAR-100: 250 per seen class (12500, 37500). CIFAR-100's
  `label` is the fine label.

The prepared dataset's metadata (`info.metadata`) holds "seen_classes" (the
list 0, ..., S - 1), "labeled_fraction" and "seed".

Determinism: which images are labelled is a function of the source's
training labels in file order, the seen classes, the fraction and `SEED`:
seen class c labels the first floor(fraction * n_c) of a permutation of its
n_c images drawn by its own NumPy PCG64 generator seeded with (SEED, c), so
one class's size does not move another's draws, and the labelled set of a
smaller fraction is contained in that of a larger one (25% within 50%:
prefixes of the same permutation). NumPy does not promise the same streams
across its versions, but a prepared dataset stays as written. The labelled
images are not ORCA's (its code draws them with NumPy's global legacy
generator). CIFAR's file order is its TFDS `id` ("train_00000", ...), i.e.
the order of the original batch files, not TFDS's storage order.
"""

from collections.abc import Sequence
import fractions

import numpy as np
import tensorflow_datasets as tfds

from contrastive.data import fashion_mnist
from contrastive.data import long_tail
from contrastive.data import prepare

# Seeds the labelled subsets of every config (2022: ORCA's year).
SEED = 2022

# The `open_label` of an unlabelled image (and of every test image).
UNLABELED = -1

# Sources: their number of classes and image shape.
SOURCES = {
    "fashion_mnist": (len(fashion_mnist.CLASS_NAMES),
                      (fashion_mnist.IMAGE_SIDE, fashion_mnist.IMAGE_SIDE, 1)),
    "cifar10": (10, (32, 32, 3)),
    "cifar100": (100, (32, 32, 3)),
}
# Train images per class of each source, for the descriptions.
_SOURCE_PER_CLASS = {"fashion_mnist": 6000, "cifar10": 5000, "cifar100": 500}

_CITATION = """\
@inproceedings{cao2022openworld,
  title     = {Open-World Semi-Supervised Learning},
  author    = {Cao, Kaidi and Brbic, Maria and Leskovec, Jure},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2022},
}
@article{sun2023opencon,
  title   = {{OpenCon}: Open-world Contrastive Learning},
  author  = {Sun, Yiyou and Li, Yixuan},
  journal = {Transactions on Machine Learning Research},
  year    = {2023},
}
"""


_HOMEPAGES = {
    "fashion_mnist": "https://github.com/zalandoresearch/fashion-mnist",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar.html",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar.html",
}


def _labeled_count(size: int, labeled_fraction: float) -> int:
  """floor(labeled_fraction * size), exactly for decimal fractions (0.29)."""
  fraction = fractions.Fraction(labeled_fraction).limit_denominator(10**6)
  return size * fraction.numerator // fraction.denominator


def labeled_indices(labels: np.ndarray, seen_classes: Sequence[int],
                    labeled_fraction: float, seed: int, *,
                    num_classes: int | None = None) -> np.ndarray:
  """Indices of the labelled images of an open-world training split.

  Args:
    labels: int [n] true class labels in [0, num_classes).
    seen_classes: the seen classes; every other class is novel (no image of
      it is labelled).
    labeled_fraction: in (0, 1]: the fraction of each seen class labelled.
    seed: seeds the per-class choice (with the class index).
    num_classes: C; defaults to `labels.max() + 1`.

  Returns:
    int64 [sum floor(fraction * n_c) over seen c], sorted (the source's
    order kept): for each seen class c with n_c images, the first
    floor(labeled_fraction * n_c) of a permutation of its indices drawn by
    `np.random.default_rng([seed, c])`.

  Raises:
    ValueError: if an argument is out of range, a label is out of range, or a
      seen class has no image.
  """
  labels, num_classes = long_tail.checked_labels(labels, num_classes)
  if not 0 < labeled_fraction <= 1:  # Also rejects NaN.
    raise ValueError(f"labeled_fraction must be in (0, 1], got "
                     f"{labeled_fraction}.")
  seen = [int(c) for c in seen_classes]
  if len(set(seen)) != len(seen) or any(not 0 <= c < num_classes
                                        for c in seen):
    raise ValueError(f"Seen classes must be distinct classes in "
                     f"[0, {num_classes}); got {seen}.")
  sizes = np.bincount(labels.astype(np.int64), minlength=num_classes)
  labeled = [np.zeros(0, np.int64)]
  for label in seen:
    if sizes[label] == 0:
      raise ValueError(f"Seen class {label} has no example.")
    # A generator per class: one class's size does not move another's draws.
    rng = np.random.default_rng([seed, label])
    members = np.flatnonzero(labels == label)
    count = _labeled_count(len(members), labeled_fraction)
    # A prefix of one permutation: a smaller fraction labels a subset of
    # what a larger one labels.
    labeled.append(members[rng.permutation(len(members))[:count]])
  return np.sort(np.concatenate(labeled)).astype(np.int64)


def open_labels(labels: np.ndarray, seen_classes: Sequence[int],
                labeled_fraction: float, seed: int, *,
                num_classes: int | None = None) -> np.ndarray:
  """The `open_label` of each training image: its class if labelled, else -1.

  Args: as `labeled_indices`.

  Returns:
    int64 [n]: `labels[i]` for the `labeled_indices`, `UNLABELED` elsewhere.
  """
  labels = np.asarray(labels)
  result = np.full(len(labels), UNLABELED, np.int64)
  indices = labeled_indices(labels, seen_classes, labeled_fraction, seed,
                            num_classes=num_classes)
  result[indices] = labels[indices]
  return result


class OpenWorldConfig(tfds.core.BuilderConfig):
  """A source, its number of seen classes and the labelled percentage."""

  def __init__(self, *, source: str, seen: int, labeled_percent: int,
               **kwargs):
    """Makes the config `<source>_seen<seen>_labeled<labeled_percent>`.

    Args:
      source: `fashion_mnist`, `cifar10` or `cifar100`.
      seen: S: classes 0, ..., S - 1 are seen, the others novel.
      labeled_percent: the percentage of each seen class labelled.
      **kwargs: passed to `tfds.core.BuilderConfig`.
    """
    num_classes = SOURCES[source][0]
    if not 0 < seen < num_classes:
      raise ValueError(f"seen must be in [1, {num_classes}) for {source}, "
                       f"got {seen}.")
    super().__init__(
        name=f"{source}_seen{seen}_labeled{labeled_percent}",
        description=(
            f"Train: classes 0-{seen - 1} seen, {labeled_percent}% of their "
            f"images labelled (open_label), the rest and classes "
            f"{seen}-{num_classes - 1} (novel) unlabelled (open_label -1); "
            "test: the full split, open_label -1 (ORCA / OpenCon)."),
        **kwargs)
    self.source = source
    self.seen = seen
    self.labeled_percent = labeled_percent

  @property
  def labeled_fraction(self) -> float:
    return self.labeled_percent / 100

  @property
  def seen_classes(self) -> list[int]:
    return list(range(self.seen))


def _open_world_metadata(
    config: OpenWorldConfig) -> tfds.core.MetadataDict:
  # Saved with the prepared dataset (metadata.json): the evaluation's
  # seen / novel split of the classes.
  return tfds.core.MetadataDict(seen_classes=config.seen_classes,
                                labeled_fraction=config.labeled_fraction,
                                seed=SEED)


def _examples(images: np.ndarray, labels: np.ndarray,
              open_label: np.ndarray | None = None):
  """Yields every example, keyed by source index; `open_label` -1 if None.

  Keys are source indices, so an image has the same key in every config.
  """
  for index in range(len(labels)):
    yield index, {
        "image": images[index],
        "label": int(labels[index]),
        "open_label": (UNLABELED if open_label is None
                       else int(open_label[index])),
    }


class OpenWorld(tfds.core.GeneratorBasedBuilder):
  """Open-world semi-supervised Fashion-MNIST, CIFAR-10 and CIFAR-100."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      OpenWorldConfig(source="fashion_mnist", seen=5, labeled_percent=50),
      OpenWorldConfig(source="cifar10", seen=5, labeled_percent=50),
      OpenWorldConfig(source="cifar100", seen=50, labeled_percent=50),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    num_classes, shape = SOURCES[config.source]
    per_class = _SOURCE_PER_CLASS[config.source]
    labeled = _labeled_count(per_class, config.labeled_fraction)
    if config.source == "fashion_mnist":
      label = tfds.features.ClassLabel(names=fashion_mnist.CLASS_NAMES)
      # pylint: disable-next=protected-access
      citation = _CITATION + fashion_mnist._CITATION
    else:
      # Names are the source's, set when preparing (as TFDS's cifar builders
      # do): they come with the source's files.
      label = tfds.features.ClassLabel(num_classes=num_classes)
      citation = _CITATION + long_tail.CIFAR_CITATION
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            f"{config.source} for open-world semi-supervised learning (ORCA, "
            f"OpenCon): classes 0-{config.seen - 1} seen, "
            f"{config.seen}-{num_classes - 1} novel. Train: {labeled} of the "
            f"{per_class} images of each seen class labelled "
            f"({labeled * config.seen} in all), every other image "
            "unlabelled (open_label -1); test: the full split, open_label -1. "
            "`label` is the true class, for evaluation only: losses read "
            "`open_label`."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=shape),
            "label": label,
            # Not a ClassLabel: -1 marks an unlabelled image.
            "open_label": tfds.features.Scalar(dtype=np.int64),
        }),
        homepage=_HOMEPAGES[config.source],
        citation=citation,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    num_classes = SOURCES[config.source][0]
    if config.source == "fashion_mnist":
      splits = self._fashion_mnist_splits()
    else:
      splits = self._cifar_splits()
    images, labels = splits["train"]
    open_label = open_labels(labels, config.seen_classes,
                             config.labeled_fraction, SEED,
                             num_classes=num_classes)
    self.info.metadata.update(_open_world_metadata(config))
    return {
        "train": self._generate_examples(images, labels, open_label),
        "test": self._generate_examples(*splits["test"]),
    }

  def _fashion_mnist_splits(self):
    folder = fashion_mnist.checked_source_dir()
    splits = {}
    for split in ("train", "test"):
      images, labels = fashion_mnist.read_split(folder, split)
      splits[split] = images[..., None], labels
    return splits

  def _cifar_splits(self):
    source = self.builder_config.source
    try:
      splits, names = long_tail.load_tfds_source(source, self.data_dir_root)
    except prepare.DatasetNotPreparedError as e:
      # Its message names cifar_lt, the other dataset derived this way.
      raise prepare.DatasetNotPreparedError(
          f"{e} (open_world/{self.builder_config.name} derives from "
          f"'{source}' the same way: prepare it again after that.)") from e
    num_classes = SOURCES[source][0]
    if len(names) != num_classes:
      raise ValueError(f"TFDS '{source}' has {len(names)} classes; "
                       f"open_world expects {num_classes}.")
    self.info.features["label"].names = names
    return splits

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray,
                         open_label: np.ndarray | None = None):
    return _examples(images, labels, open_label)
