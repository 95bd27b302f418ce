"""The linear probe fits separable features and scores top-k correctly."""

import numpy as np

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
