"""Weighted k-nearest-neighbour classification of frozen features.

The protocol of Wu et al. (InstDisc, CVPR 2018, arXiv 1805.01978) that
solo-learn and others report as "kNN top-1": features are L2-normalised,
each test sample's k most cosine-similar training samples vote for their
class with weight exp(similarity / temperature), and the class with the
largest total wins. Defaults k = 200 (also reported: 20), temperature 0.07.

  result = knn.classify(train_x, train_y, test_x, test_y, num_classes=10)
  result["top1"], result["top5"]

Test samples are scored in chunks so memory is O(chunk * num_train), not
O(num_test * num_train).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _normalise(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def class_scores(train_x: jax.Array, train_y: jax.Array, test_x: jax.Array,
                 *, k: int, num_classes: int,
                 temperature: float) -> jax.Array:
  """float32[test, num_classes] summed vote weights of the k neighbours."""
  similarity = jnp.matmul(_normalise(test_x), _normalise(train_x).T,
                          precision=jax.lax.Precision.HIGHEST)
  top_similarity, top_index = jax.lax.top_k(similarity, k)
  weights = jnp.exp(top_similarity / temperature)
  votes = jax.nn.one_hot(train_y[top_index], num_classes) * weights[..., None]
  return votes.sum(axis=1)


def classify(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
             test_y: np.ndarray, *, num_classes: int, k: int = 200,
             temperature: float = 0.07,
             chunk_size: int = 1024) -> dict[str, float]:
  """kNN top-1 / top-5 accuracy of `test_x` against the `train_x` bank.

  Args:
    train_x: float[num_train, dim] features of the labelled bank.
    train_y: int[num_train] labels.
    test_x: float[num_test, dim] features to classify.
    test_y: int[num_test] labels.
    num_classes: number of classes.
    k: neighbours that vote (at most num_train).
    temperature: vote weight exp(similarity / temperature).
    chunk_size: test samples scored at once.

  Returns:
    {"top1", "top5", "k", "temperature", "num_test"}.
  """
  if not 1 <= k <= len(train_x):
    raise ValueError(f"k must be in [1, {len(train_x)}] (the bank size), "
                     f"got {k}.")
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  train_x = jnp.asarray(train_x, jnp.float32)
  train_y = jnp.asarray(train_y, jnp.int32)
  correct1 = correct5 = 0
  for start in range(0, len(test_x), chunk_size):
    scores = np.asarray(class_scores(
        train_x, train_y, jnp.asarray(test_x[start:start + chunk_size],
                                      jnp.float32),
        k=k, num_classes=num_classes, temperature=temperature))
    labels = np.asarray(test_y[start:start + chunk_size])
    # Stable sort, so ties go to the lower class id, like argmax.
    ranked = np.argsort(-scores, axis=1, kind="stable")
    correct1 += int((ranked[:, 0] == labels).sum())
    correct5 += int((ranked[:, :5] == labels[:, None]).any(axis=1).sum())
  num_test = len(test_x)
  return {"top1": correct1 / num_test, "top5": correct5 / num_test, "k": k,
          "temperature": temperature, "num_test": num_test}
