"""k-means against a float64 numpy Lloyd; Hungarian accuracy by brute force."""

import itertools

import jax
import numpy as np
import pytest

from contrastive import kmeans
from contrastive import sharding
from contrastive.evaluation import clustering

METRICS = ("cosine", "euclidean")


def _np_prepare(x, metric):
  x = np.asarray(x, np.float64)
  if metric == "cosine":
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
  return x


def _np_assign(x, centroids, metric):
  """The whole [n, k] matrix, computed directly (not expanded)."""
  if metric == "cosine":
    distances = 1.0 - x @ centroids.T
  else:
    distances = ((x[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)
  return distances.argmin(1), distances.min(1)


def _np_update(x, labels, centroids, metric):
  new = centroids.copy()
  for j in range(len(centroids)):
    members = x[labels == j]
    if len(members):
      new[j] = members.mean(0)
      if metric == "cosine":
        new[j] /= np.linalg.norm(new[j])
  return new


def _blobs(rng, centres, per_blob, noise):
  blob = np.repeat(np.arange(len(centres)), per_blob)
  x = centres[blob] + noise * rng.normal(size=(len(blob), centres.shape[1]))
  order = rng.permutation(len(blob))
  return x[order].astype(np.float32), blob[order]


@pytest.mark.parametrize("metric", METRICS)
def test_lloyd_matches_numpy(metric):
  rng = np.random.default_rng(0)
  n, k = 203, 7
  x = rng.normal(size=(n, 8)).astype(np.float32)
  start = x[rng.choice(n, k, replace=False)] + 0.1 * rng.normal(size=(k, 8))
  start = start.astype(np.float32)
  expected = _np_prepare(start, metric)
  centroids = previous = start
  inertia = np.inf
  for _ in range(4):
    labels, distances = _np_assign(_np_prepare(x, metric), expected, metric)
    # The public pieces, one Lloyd step each (203 rows: padded chunks).
    got_labels, got_distances = kmeans.assign(x, centroids, metric,
                                              chunk_size=50)
    np.testing.assert_array_equal(got_labels, labels)
    np.testing.assert_allclose(got_distances, distances, atol=1e-5)
    expected = _np_update(_np_prepare(x, metric), labels, expected, metric)
    centroids, counts = kmeans.update(x, got_labels, k, metric,
                                      previous=centroids)
    np.testing.assert_allclose(centroids, expected, atol=1e-5)
    np.testing.assert_array_equal(counts, np.bincount(labels, minlength=k))
    # The same step through `kmeans` itself.
    result = kmeans.kmeans(x, k, None, iterations=1, metric=metric,
                           previous=previous,
                           chunk_size=50)
    np.testing.assert_allclose(result.centroids, expected, atol=1e-5)
    next_labels, next_distances = _np_assign(_np_prepare(x, metric),
                                             expected, metric)
    np.testing.assert_array_equal(result.labels, next_labels)
    np.testing.assert_array_equal(result.counts,
                                  np.bincount(next_labels, minlength=k))
    np.testing.assert_allclose(result.inertia, next_distances.sum(),
                               rtol=1e-5)
    assert result.inertia <= inertia + 1e-4  # Lloyd never increases it.
    inertia = result.inertia
    previous = result.centroids
  direct = kmeans.kmeans(x, k, None, iterations=4, metric=metric,
                        previous=start, chunk_size=50)
  np.testing.assert_allclose(direct.centroids, expected, atol=1e-5)
  zero = kmeans.kmeans(x, k, None, iterations=0, metric=metric,
                       previous=start)
  np.testing.assert_allclose(zero.centroids, _np_prepare(start, metric),
                             atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 7, 53, 1000])
@pytest.mark.parametrize("metric", METRICS)
def test_chunked_assign_equals_full_argmin(metric, chunk_size):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(53, 6)).astype(np.float32)
  centroids = rng.normal(size=(9, 6)).astype(np.float32)
  labels, distances = _np_assign(_np_prepare(x, metric),
                                 _np_prepare(centroids, metric), metric)
  got_labels, got_distances = kmeans.assign(x, centroids, metric,
                                            chunk_size=chunk_size)
  assert got_labels.dtype == np.int32 and got_labels.shape == (53,)
  np.testing.assert_array_equal(got_labels, labels)
  np.testing.assert_allclose(got_distances, distances, atol=1e-5)


@pytest.mark.parametrize("metric", METRICS)
def test_kmeans_plus_plus_picks_distinct_rows(metric):
  rng = np.random.default_rng(2)
  distinct = rng.normal(size=(10, 5)).astype(np.float32)
  x = np.tile(distinct, (3, 1))[rng.permutation(30)]
  prepared = _np_prepare(distinct, metric)
  # k = number of distinct points: D^2 sampling gives a duplicate of a chosen
  # point zero weight, so every distinct point is chosen once.
  seeds = np.asarray(kmeans.init_centroids(x, 10, jax.random.key(0),
                                           metric=metric))
  match = np.abs(seeds[:, None] - prepared[None]).max(-1) < 1e-6
  assert (match.sum(1) == 1).all() and (match.sum(0) == 1).all()
  # k beyond the distinct points: the rest are still distinct rows of x.
  seeds = np.asarray(kmeans.init_centroids(x, 12, jax.random.key(0),
                                           metric=metric))
  match = np.abs(seeds[:, None] - prepared[None]).max(-1) < 1e-6
  assert (match.sum(1) == 1).all() and (match.sum(0) >= 1).all()
  # Deterministic given the key.
  again = kmeans.init_centroids(x, 12, jax.random.key(0), metric=metric)
  np.testing.assert_array_equal(seeds, again)


def test_random_init_picks_distinct_rows():
  x = np.random.default_rng(3).normal(size=(40, 4)).astype(np.float32)
  seeds = np.asarray(kmeans.init_centroids(x, 40, jax.random.key(1),
                                           method="random",
                                           metric="euclidean"))
  assert sorted(map(tuple, seeds)) == sorted(map(tuple, x))  # Each row once.


@pytest.mark.parametrize("metric", METRICS)
def test_kmeans_plus_plus_finds_separated_blobs(metric):
  rng = np.random.default_rng(4)
  centres = 100.0 * np.eye(5, 16)
  if metric == "cosine":
    centres = np.eye(5, 16)  # Directions; the noise is what cosine sees.
  x, blob = _blobs(rng, centres, per_blob=60, noise=0.05)
  result = kmeans.kmeans(x, 5, jax.random.key(0), iterations=5,
                         metric=metric, chunk_size=64)
  assert clustering.hungarian_accuracy(np.asarray(result.labels), blob) == 1.0
  np.testing.assert_array_equal(np.sort(result.counts), [60] * 5)


@pytest.mark.parametrize("metric", METRICS)
def test_empty_cluster_keeps_previous_centroid(metric):
  rng = np.random.default_rng(5)
  # Points around two directions; the third centroid is nearest to none.
  x, _ = _blobs(rng, np.array([[10.0, 0, 0], [0, 10.0, 0]]), per_blob=20,
                noise=0.5)
  start = np.array([[9, 1, 0], [1, 9, 0], [-7, -7, 0.5]], np.float32)
  result = kmeans.kmeans(x, 3, None, iterations=3, metric=metric,
                         previous=start)
  assert list(np.asarray(result.counts)) == [20, 20, 0]
  np.testing.assert_allclose(result.centroids[2],
                             _np_prepare(start, metric)[2], atol=1e-6)
  # `update` without `previous`: an empty cluster gets zeros.
  centroids, counts = kmeans.update(x, np.zeros(40, np.int32), 3, metric)
  assert list(np.asarray(counts)) == [40, 0, 0]
  np.testing.assert_array_equal(centroids[1:], 0.0)


@pytest.mark.parametrize("metric", METRICS)
def test_sharded_matches_single_device(metric):
  rng = np.random.default_rng(6)
  x, _ = _blobs(rng, 3.0 * rng.normal(size=(6, 8)), per_blob=40, noise=1.0)
  key = jax.random.key(7)
  run = lambda x: kmeans.kmeans(x, 6, key, iterations=6, metric=metric,
                                chunk_size=64)
  single = run(x)
  mesh = sharding.make_mesh()
  assert mesh.shape["data"] == 8
  with jax.set_mesh(mesh):
    sharded_x = jax.device_put(x, sharding.batch_sharding(mesh))
    sharded = run(sharded_x)
  np.testing.assert_allclose(sharded.centroids, single.centroids, atol=1e-5)
  np.testing.assert_array_equal(sharded.labels, single.labels)
  np.testing.assert_array_equal(sharded.counts, single.counts)
  np.testing.assert_allclose(sharded.inertia, single.inertia, rtol=1e-5)


def test_jits_with_static_k():
  x = np.random.default_rng(8).normal(size=(32, 4)).astype(np.float32)

  @jax.jit
  def pseudo_labels(x, key):
    return kmeans.kmeans(x, 4, key, iterations=3, metric="euclidean").labels

  labels = pseudo_labels(x, jax.random.key(0))
  expected = kmeans.kmeans(x, 4, jax.random.key(0), iterations=3,
                           metric="euclidean").labels
  np.testing.assert_array_equal(labels, expected)


def test_bad_options():
  x = np.ones((5, 3), np.float32)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="Unknown k-means metric"):
    kmeans.kmeans(x, 2, key, metric="l1")
  with pytest.raises(ValueError, match=r"k must be in \[1, 5\]"):
    kmeans.kmeans(x, 6, key)
  with pytest.raises(ValueError, match="Unknown k-means init"):
    kmeans.kmeans(x, 2, key, init="forgy")
  with pytest.raises(ValueError, match="needs a PRNG key"):
    kmeans.kmeans(x, 2, None)
  with pytest.raises(ValueError, match=r"previous must be float\[2, 3\]"):
    kmeans.kmeans(x, 2, None, previous=np.ones((3, 3), np.float32))
  with pytest.raises(ValueError, match="centroids have dimension 4"):
    kmeans.assign(x, np.ones((2, 4), np.float32))


def _brute_force_accuracy(predictions, labels):
  clusters, classes = np.unique(predictions), np.unique(labels)
  size = max(len(clusters), len(classes))
  best = 0
  # Pad both sides to `size` ids; a padded partner matches nothing.
  for perm in itertools.permutations(range(size)):
    mapping = {c: classes[p] for c, p in zip(clusters, perm)
               if p < len(classes)}
    best = max(best, sum(mapping.get(p) == l
                         for p, l in zip(predictions, labels)))
  return best / len(labels)


@pytest.mark.parametrize("num_clusters,num_classes",
                         [(4, 4), (5, 5), (3, 5), (6, 4)])
def test_hungarian_accuracy_matches_brute_force(num_clusters, num_classes):
  rng = np.random.default_rng(num_clusters * 10 + num_classes)
  for _ in range(3):
    labels = rng.integers(0, num_classes, size=40)
    # Correlated with the labels, so that the best mapping is not trivial.
    predictions = np.where(rng.random(40) < 0.5,
                           (labels * 3 + 1) % num_clusters,
                           rng.integers(0, num_clusters, size=40))
    predictions = predictions * 7 + 2  # Arbitrary, non-contiguous ids.
    assert clustering.hungarian_accuracy(predictions, labels) == (
        pytest.approx(_brute_force_accuracy(predictions, labels)))


def test_permuted_labels_score_one():
  rng = np.random.default_rng(9)
  labels = rng.integers(0, 6, size=50)
  predictions = rng.permutation(6)[labels] + 100
  assert clustering.hungarian_accuracy(predictions, labels) == 1.0
  # Class 0 split over clusters 3 and 4: one half is unmatched, so wrong.
  assert clustering.hungarian_accuracy([3, 3, 4, 4, 5, 5],
                                       [0, 0, 0, 0, 1, 1]) == 4 / 6


def test_open_world_accuracy_constructed_case():
  # Seen classes 0 and 1; novel classes 2 and 3.
  labels = np.repeat([0, 1, 2, 3], 4)
  predictions = np.array([0, 0, 0, 1,    # class 0: 3 right
                          1, 1, 1, 1,    # class 1: 4 right
                          7, 7, 7, 8,    # class 2: cluster 7
                          1, 1, 1, 8])   # class 3: mostly seen cluster 1
  # All rows: 0->0 (3), 1->1 (4), 7->2 (3), 8->3 (1) = 11 of 16.
  shared = clustering.open_world_accuracy(predictions, labels, [0, 1],
                                          protocol="shared")
  assert shared == pytest.approx({"all": 11 / 16, "seen": 7 / 8,
                                  "novel": 4 / 8})
  # ORCA / OpenCon: seen is plain accuracy; novel is re-matched on its own
  # rows, where cluster 1 may map to class 3: 7->2 (3), 1->3 (3) = 6 of 8.
  orca = clustering.open_world_accuracy(predictions, labels, [0, 1])
  assert orca == pytest.approx({"all": 11 / 16, "seen": 7 / 8,
                                "novel": 6 / 8})
  novel = labels >= 2
  assert orca["novel"] == clustering.hungarian_accuracy(predictions[novel],
                                                        labels[novel])
  with pytest.raises(ValueError, match="Unknown open-world protocol"):
    clustering.open_world_accuracy(predictions, labels, [0], protocol="x")
  with pytest.raises(ValueError, match="must be integer ids"):
    clustering.hungarian_accuracy(predictions * 1.0, labels)
