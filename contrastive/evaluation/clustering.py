"""Clustering accuracy: cluster ids scored against class ids by Hungarian match.

Unsupervised and open-world methods predict cluster ids whose numbering is
arbitrary. Their accuracy is the best one-to-one mapping of cluster ids to
class ids, found by the Hungarian algorithm on the contingency matrix (Kuhn
1955; `scipy.optimize.linear_sum_assignment`), as in DEC, ORCA and OpenCon.

  clustering.hungarian_accuracy(predictions, labels)           # float
  clustering.open_world_accuracy(predictions, labels, seen_classes=range(50))
  # {"all": ..., "seen": ..., "novel": ...}

Ids may be any integers (not necessarily 0..k-1) and the number of clusters
need not equal the number of classes: clusters left without a class (or
classes without a cluster) score nothing, so extra clusters count as wrong.
Everything here runs on the host in numpy.
"""

from collections.abc import Iterable

import numpy as np
from scipy import optimize

PROTOCOLS = ("orca", "shared")


def _check(predictions, labels) -> tuple[np.ndarray, np.ndarray]:
  predictions = np.asarray(predictions)
  labels = np.asarray(labels)
  if predictions.ndim != 1 or predictions.shape != labels.shape:
    raise ValueError(
        "predictions and labels must be 1-D and of the same length, got "
        f"shapes {predictions.shape} and {labels.shape}.")
  for name, ids in (("predictions", predictions), ("labels", labels)):
    if not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"{name} must be integer ids, got dtype {ids.dtype}; "
                       "take the argmax of scores first.")
  return predictions, labels


def _mapping(predictions: np.ndarray,
             labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The accuracy-maximising one-to-one map of cluster ids to class ids.

  Returns:
    (mapped, matched): mapped[i] is the class that predictions[i]'s cluster
    maps to, valid where matched[i]; unmatched clusters map to nothing.
  """
  clusters, cluster_index = np.unique(predictions, return_inverse=True)
  classes, class_index = np.unique(labels, return_inverse=True)
  contingency = np.zeros((len(clusters), len(classes)), np.int64)
  np.add.at(contingency, (cluster_index, class_index), 1)
  # Rectangular matrices are fine: min(#clusters, #classes) pairs are made.
  rows, cols = optimize.linear_sum_assignment(contingency, maximize=True)
  target = np.full(len(clusters), -1, np.int64)
  target[rows] = cols
  mapped_index = target[cluster_index]
  matched = mapped_index >= 0
  mapped = np.where(matched, classes[np.maximum(mapped_index, 0)], labels)
  return mapped, matched


def _fraction(correct: np.ndarray) -> float:
  return float(np.mean(correct)) if correct.size else float("nan")


def hungarian_accuracy(predictions, labels) -> float:
  """Clustering accuracy under the best one-to-one cluster -> class mapping.

  Args:
    predictions: int[n] cluster ids.
    labels: int[n] class ids.

  Returns:
    The fraction of rows whose cluster maps to their class, in [0, 1]; nan
    for n = 0. Equals ORCA's and OpenCon's `cluster_acc`.
  """
  predictions, labels = _check(predictions, labels)
  if not predictions.size:
    return float("nan")
  mapped, matched = _mapping(predictions, labels)
  return _fraction(matched & (mapped == labels))


def open_world_accuracy(predictions, labels, seen_classes: Iterable[int],
                        protocol: str = "orca") -> dict[str, float]:
  """All / seen / novel accuracy of open-world semi-supervised learning.

  Args:
    predictions: int[n] predicted ids; for "orca", ids of seen classes must
      be the class ids themselves (the labelled heads), novel ones arbitrary.
    labels: int[n] class ids.
    seen_classes: the class ids that had labelled training data; every other
      class is novel.
    protocol: how the three numbers are computed.
      "orca": the evaluation code of ORCA (Cao et al., ICLR 2022) that
        OpenCon (Sun & Li, TMLR 2023) reuses verbatim: "all" is
        `hungarian_accuracy` on every row; "seen" is plain accuracy
        (predictions == labels, no mapping) on rows of seen classes; "novel"
        is `hungarian_accuracy` on rows of novel classes alone, with its own
        mapping.
      "shared": ONE Hungarian mapping computed on all rows, and the accuracy
        of that mapping on all rows, on seen-class rows and on novel-class
        rows (so a novel cluster cannot be re-matched on the novel subset
        alone, and the three numbers are consistent: "all" is their
        row-weighted mean).

  Returns:
    {"all", "seen", "novel"} fractions in [0, 1]; nan where the subset is
    empty.
  """
  predictions, labels = _check(predictions, labels)
  if protocol not in PROTOCOLS:
    raise ValueError(f"Unknown open-world protocol {protocol!r}; use one of "
                     f"{PROTOCOLS}.")
  seen = np.isin(labels, np.asarray(list(seen_classes), labels.dtype))
  if not predictions.size:
    nan = float("nan")
    return {"all": nan, "seen": nan, "novel": nan}
  if protocol == "orca":
    return {"all": hungarian_accuracy(predictions, labels),
            "seen": _fraction(predictions[seen] == labels[seen]),
            "novel": hungarian_accuracy(predictions[~seen], labels[~seen])}
  mapped, matched = _mapping(predictions, labels)
  correct = matched & (mapped == labels)
  return {"all": _fraction(correct), "seen": _fraction(correct[seen]),
          "novel": _fraction(correct[~seen])}
