"""Many/medium/few-shot accuracy of long-tailed classification.

The split of Liu et al. ("Large-Scale Long-Tailed Recognition in an Open
World", CVPR 2019, OLTR; ImageNet-LT), used by PaCo, ResCom and most of the
long-tailed literature: each class goes to a group by its number of TRAINING
images n, and a group's top-1 is the accuracy over the (balanced) test
examples of its classes:

* many-shot: n > many_threshold (100),
* medium-shot: few_threshold <= n <= many_threshold (20..100, inclusive),
* few-shot: n < few_threshold (20).

With the standard thresholds (100, 20) the builders of
`contrastive/data/long_tail.py` give (many / medium / few classes):

* CIFAR-100-LT: if100 35 / 35 / 30 (the published split), if50 41 / 41 / 18,
  if10 69 / 31 / 0.
* CIFAR-10-LT: if100 8 / 2 / 0, if50 9 / 1 / 0, if10 10 / 0 / 0: CIFAR-10-LT
  papers report overall top-1 instead.
* Fashion-MNIST-LT (6000 images in its head class, every class >= 60): if100
  8 / 2 / 0, if50 and if10 10 / 0 / 0, so the standard split says little.
  Use `FASHION_MNIST_LT_THRESHOLDS` (many > 1000, few < 200: ten times the
  standard ones, for a head ten times CIFAR-100's 500): if100
  [6000..1292 | 774, 464, 278 | 166, 100, 60] gives 4 / 3 / 3, if50
  [6000..1054 | 682, 442, 286 | 185, 120] 5 / 3 / 2, and if10
  [6000..1292 | 1000, 774, 600 | -] 7 / 3 / 0.

A prepared long-tailed dataset carries its per-class train counts in
`info.metadata["train_counts"]`.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np

GROUPS = ("many", "medium", "few")

# Thresholds for Fashion-MNIST-LT (see the module docstring), as keywords of
# `shot_groups` and `shot_accuracies`.
FASHION_MNIST_LT_THRESHOLDS = {"many_threshold": 1000, "few_threshold": 200}


def shot_groups(train_counts: Sequence[int] | np.ndarray,
                many_threshold: int = 100,
                few_threshold: int = 20) -> np.ndarray:
  """Assigns each class to a shot group by its number of training images.

  Args:
    train_counts: int [C], training images per class.
    many_threshold: classes with more images than this are "many".
    few_threshold: classes with fewer images than this are "few"; the others
      (both thresholds inclusive) are "medium".

  Returns:
    A str array [C] of "many", "medium" or "few".

  Raises:
    ValueError: if few_threshold > many_threshold, or train_counts is not a
      vector of non-negative counts.
  """
  if few_threshold > many_threshold:
    raise ValueError(f"few_threshold ({few_threshold}) must not exceed "
                     f"many_threshold ({many_threshold}).")
  counts = np.asarray(train_counts)
  if counts.ndim != 1 or (counts.size and counts.min() < 0):
    raise ValueError("train_counts must be a vector of non-negative counts, "
                     f"got {counts!r}.")
  groups = np.full(counts.shape, "medium", dtype="<U6")
  groups[counts > many_threshold] = "many"
  groups[counts < few_threshold] = "few"
  return groups


def _mean_or_none(values: np.ndarray) -> float | None:
  return float(np.mean(values)) if values.size else None


def shot_accuracies(predictions: np.ndarray, labels: np.ndarray,
                    train_counts: Sequence[int] | np.ndarray, *,
                    many_threshold: int = 100,
                    few_threshold: int = 20) -> dict[str, Any]:
  """Top-1 accuracy overall, per class and per shot group.

  Args:
    predictions: int [n] predicted classes, or scores [n, C] (argmax taken).
    labels: int [n] true classes in [0, C).
    train_counts: int [C], training images per class (C is its length).
    many_threshold: see `shot_groups`.
    few_threshold: see `shot_groups`.

  Returns:
    A JSON-ready dict:
      "top1": accuracy over all n examples;
      "many_top1", "medium_top1", "few_top1": accuracy over the examples
        whose class is in the group (example-weighted, which equals the mean
        of its classes' accuracies on a balanced test split); None when the
        group has no test example (e.g. no few-shot class in CIFAR-10-LT):
        the keys are always there, never NaN;
      "per_class_top1": list [C], None for a class without test example;
      "mean_class_top1": mean of the non-None per-class accuracies;
      "group_sizes": {"many": .., "medium": .., "few": ..}, classes per group;
      "many_threshold", "few_threshold": the thresholds used.

  Raises:
    ValueError: on mismatched shapes or labels out of range.
  """
  predictions = np.asarray(predictions)
  labels = np.asarray(labels)
  counts = np.asarray(train_counts)
  groups = shot_groups(counts, many_threshold, few_threshold)
  num_classes = len(counts)
  if predictions.ndim == 2:
    predictions = np.argmax(predictions, axis=-1)
  if predictions.shape != labels.shape or labels.ndim != 1:
    raise ValueError(f"predictions {predictions.shape} and labels "
                     f"{labels.shape} must both be [n] (or scores [n, C]).")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"Labels must be in [0, {num_classes}) "
                     f"(len(train_counts)); got [{labels.min()}, "
                     f"{labels.max()}].")
  correct = predictions == labels
  per_class = [_mean_or_none(correct[labels == c]) for c in range(num_classes)]
  result = {"top1": _mean_or_none(correct)}
  for group in GROUPS:
    in_group = np.isin(labels, np.flatnonzero(groups == group))
    result[f"{group}_top1"] = _mean_or_none(correct[in_group])
  present = [a for a in per_class if a is not None]
  result.update(
      per_class_top1=per_class,
      mean_class_top1=float(np.mean(present)) if present else None,
      group_sizes={group: int(np.sum(groups == group)) for group in GROUPS},
      many_threshold=many_threshold,
      few_threshold=few_threshold,
  )
  return result
