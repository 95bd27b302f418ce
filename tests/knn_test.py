"""kNN evaluation against a brute-force float64 numpy vote."""

import numpy as np
import pytest

from contrastive.evaluation import knn


def _brute_force(train_x, train_y, test_x, num_classes, k, temperature):
  """InstDisc's weighted vote, one test sample at a time."""
  train = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
  predictions = []
  for query in test_x:
    query = query / np.linalg.norm(query)
    similarity = [float(np.dot(query, row)) for row in train]
    neighbours = sorted(range(len(train)), key=lambda j: -similarity[j])[:k]
    scores = np.zeros(num_classes)
    for j in neighbours:
      scores[train_y[j]] += np.exp(similarity[j] / temperature)
    predictions.append(np.argsort(-scores, kind="stable"))
  return np.array(predictions)


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (7, 0.07), (20, 0.5)])
def test_matches_brute_force(k, temperature):
  rng = np.random.default_rng(k)
  num_classes = 6
  train_x = rng.normal(size=(120, 8))
  train_y = rng.integers(0, num_classes, size=120)
  test_x = rng.normal(size=(37, 8))
  test_y = rng.integers(0, num_classes, size=37)
  ranked = _brute_force(train_x, train_y, test_x, num_classes, k,
                        temperature)
  expected_top1 = np.mean(ranked[:, 0] == test_y)
  expected_top5 = np.mean((ranked[:, :5] == test_y[:, None]).any(axis=1))
  # A chunk size that does not divide the test set.
  result = knn.classify(train_x, train_y, test_x, test_y,
                        num_classes=num_classes, k=k,
                        temperature=temperature, chunk_size=10)
  assert result["top1"] == pytest.approx(expected_top1)
  assert result["top5"] == pytest.approx(expected_top5)
  assert result["num_test"] == 37


def test_separated_clusters_are_classified_perfectly():
  rng = np.random.default_rng(0)
  centres = np.eye(4, 16) * 10
  train_y = rng.integers(0, 4, size=200)
  test_y = rng.integers(0, 4, size=50)
  train_x = centres[train_y] + rng.normal(size=(200, 16))
  test_x = centres[test_y] + rng.normal(size=(50, 16))
  result = knn.classify(train_x, train_y, test_x, test_y, num_classes=4,
                        k=20)
  assert result["top1"] == 1.0


def test_bad_options():
  x, y = np.ones((3, 2)), np.zeros(3, int)
  with pytest.raises(ValueError, match=r"k must be in \[1, 3\]"):
    knn.classify(x, y, x, y, num_classes=2, k=5)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    knn.classify(x, y, x, y, num_classes=2, k=1, temperature=0.0)
