"""The linear probe fits separable features and scores top-k correctly."""

import numpy as np
import pytest

from contrastive.evaluation import linear


def test_probe_separates_linearly_separable_features():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(5, 16)) * 3.0
  y = rng.integers(0, 5, size=600)
  # Large offset and scale on one feature: the probe standardises internally
  # and must still give logits in the original feature space.
  x = centers[y] + rng.normal(size=(600, 16))
  x[:, 0] = x[:, 0] * 1000.0 + 5000.0
  params = linear.fit_logistic_regression(x[:500], y[:500], 5, steps=100,
                                          l2=1e-4)
  scores = linear.topk_accuracy(params, x[500:], y[500:], ks=(1, 2, 5))
  assert scores["top1"] >= 0.97
  assert scores["top1"] <= scores["top2"] <= scores["top5"] == 1.0


def test_topk_accuracy_against_brute_force():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(50, 4)).astype(np.float32)
  y = rng.integers(0, 6, size=50)
  params = {"w": rng.normal(size=(4, 6)).astype(np.float32),
            "b": rng.normal(size=6).astype(np.float32)}
  logits = x @ params["w"] + params["b"]
  for k in (1, 3):
    expected = np.mean([y[i] in np.argsort(-logits[i])[:k]
                        for i in range(50)])
    got = linear.topk_accuracy(params, x, y, ks=(k,))[f"top{k}"]
    assert abs(got - expected) < 1e-6


def test_l2_is_chosen_on_held_out_training_examples():
  # 120 examples, 1 informative and 200 noise dimensions: without a strong
  # regulariser the probe memorises the noise and misses held-out examples.
  rng = np.random.default_rng(2)
  y = rng.integers(0, 2, size=120)
  x = rng.normal(size=(120, 201))
  x[:, 0] += 2.0 * y
  l2, scores = linear.select_l2(x, y, 2, steps=200, candidates=(1e-6, 1.0),
                                validation_fraction=0.25)
  assert set(scores) == {repr(1e-6), repr(1.0)}
  assert scores[repr(1.0)] > scores[repr(1e-6)]
  assert l2 == 1.0
  # Well-separated, low-dimensional classes: every candidate is perfect on
  # the held-out part, and the tie goes to the stronger regulariser.
  x_easy = np.stack([10.0 * y, rng.normal(size=120)], axis=1)
  l2, scores = linear.select_l2(x_easy, y, 2, steps=100,
                                candidates=(1e-4, 1e-2),
                                validation_fraction=0.25)
  assert set(scores.values()) == {1.0} and l2 == 1e-2


def test_l2_selection_rejects_a_bad_validation_fraction():
  x, y = np.zeros((10, 2)), np.zeros(10, int)
  with pytest.raises(ValueError, match="validation_fraction"):
    linear.select_l2(x, y, 2, steps=1, candidates=(1e-4,),
                     validation_fraction=1.0)
