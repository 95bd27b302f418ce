"""Spherical (cosine) and Euclidean k-means in JAX, for clustering embeddings.

Methods that turn embeddings into pseudo-labels cluster them: InterCLR runs
online k-means over its memory bank every epoch, warm-started from last
epoch's centroids; IFND clusters the dataset's embeddings at several
granularities (several k). Lloyd's algorithm with k-means++ seeding (Arthur &
Vassilvitskii 2007) covers both.

  result = kmeans.kmeans(embeddings, 1000, jax.random.key(0), iterations=20)
  result.labels     # int32[n] pseudo-labels
  # Next epoch, warm start from the previous centroids (no seeding):
  result = kmeans.kmeans(embeddings, 1000, None, previous=result.centroids)

Metrics. "cosine" is spherical k-means: rows and centroids are L2-normalised,
the distance is 1 - cos and a centroid is the normalised sum of its members.
"euclidean" uses the squared Euclidean distance and the plain mean. On unit
vectors ||a - b||^2 = 2 (1 - cos), so both are D^2 k-means and the inertia
(sum of distances) is what Lloyd's iterations decrease.

Everything here is a pure function of arrays and jit-able with k static.
`x` may be a global array sharded over its rows across the mesh (axis
`data`, `sharding.batch_sharding`): under `jax.jit` every sum over rows is
global (XLA inserts the all-reduces), so the result on 8 devices is the one
on 1 device up to float summation order.

Memory. Distances are computed for `chunk_size` rows at a time, so `assign`
never holds the [n, k] matrix: its working set is about 2 * 4 * chunk_size *
k bytes (the chunk's [chunk_size, k] dot products and distances; 330 MB for
4096 rows against 10k centroids), plus the int32 labels and float32
distances of all n rows. When n is not a multiple of the number of chunks,
x is zero-padded once (a copy of 4 * n * d bytes).
"""

import functools

import flax
import jax
import jax.numpy as jnp

METRICS = ("cosine", "euclidean")
INITS = ("kmeans++", "random")
_HIGHEST = jax.lax.Precision.HIGHEST


@flax.struct.dataclass
class KMeansResult:
  """The outcome of `kmeans`.

  Attributes:
    centroids: float32[k, d]; unit-norm for the cosine metric.
    labels: int32[n], each row's nearest centroid (of these centroids).
    counts: int32[k], rows per cluster; 0 for an empty cluster.
    inertia: float32 scalar, the sum over rows of the distance to their
      centroid (1 - cos, or the squared Euclidean distance).
  """
  centroids: jax.Array
  labels: jax.Array
  counts: jax.Array
  inertia: jax.Array


def _check_metric(metric: str) -> None:
  if metric not in METRICS:
    raise ValueError(f"Unknown k-means metric {metric!r}; use one of "
                     f"{METRICS}.")


def _check_points(x: jax.Array, name: str = "x") -> None:
  if x.ndim != 2:
    raise ValueError(f"{name} must be float[n, d], got shape {x.shape}.")


def _check_k(k: int, n: int) -> None:
  if not 1 <= k <= n:
    raise ValueError(f"k must be in [1, {n}] (the number of rows), got {k}.")


def _check_chunk_size(chunk_size: int) -> None:
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")


def _prepare(x: jax.Array, metric: str) -> jax.Array:
  """float32, and L2-normalised for the cosine metric."""
  x = jnp.asarray(x, jnp.float32)
  if metric == "cosine":
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  return x


def _distances(rows: jax.Array, centroids: jax.Array, metric: str,
               centroid_sq: jax.Array | None = None) -> jax.Array:
  """float32[r, k] distances of prepared rows to prepared centroids.

  The Euclidean distance is expanded as |x|^2 - 2 x.c + |c|^2 so that it is
  one matmul; it can then come out slightly negative, hence the clamp.
  """
  dots = jnp.matmul(rows, centroids.T, precision=_HIGHEST)
  if metric == "cosine":
    return jnp.maximum(1.0 - dots, 0.0)
  if centroid_sq is None:
    centroid_sq = jnp.sum(centroids * centroids, axis=-1)
  row_sq = jnp.sum(rows * rows, axis=-1, keepdims=True)
  return jnp.maximum(row_sq - 2.0 * dots + centroid_sq, 0.0)


def _to_chunks(x: jax.Array, chunk_size: int) -> jax.Array:
  """[n, ...] -> [num_chunks, rows, ...] with rows <= chunk_size.

  Chunk c holds rows c, c + num_chunks, c + 2 num_chunks, ... (a strided, not
  a contiguous, split): with x sharded in contiguous row blocks over the
  devices, every chunk then has rows on every device, so the scan over chunks
  keeps all devices busy on their own rows instead of visiting one device's
  block at a time.
  """
  n = x.shape[0]
  num_chunks = -(-n // chunk_size)
  rows = -(-n // num_chunks)  # Balanced chunks: padding < num_chunks rows.
  pad = num_chunks * rows - n
  if pad:
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
  return jnp.swapaxes(x.reshape(rows, num_chunks, *x.shape[1:]), 0, 1)


def _from_chunks(y: jax.Array, n: int) -> jax.Array:
  """Inverse of `_to_chunks`, dropping the padding."""
  y = jnp.swapaxes(y, 0, 1)
  return y.reshape(-1, *y.shape[2:])[:n]


def _nearest(x: jax.Array, centroids: jax.Array, metric: str,
             chunk_size: int) -> tuple[jax.Array, jax.Array]:
  """`assign` on prepared (float32, normalised for cosine) inputs."""
  centroid_sq = jnp.sum(centroids * centroids, axis=-1)

  def one_chunk(rows):
    distances = _distances(rows, centroids, metric, centroid_sq)
    return (jnp.argmin(distances, axis=-1).astype(jnp.int32),
            jnp.min(distances, axis=-1))

  labels, distances = jax.lax.map(one_chunk, _to_chunks(x, chunk_size))
  n = x.shape[0]
  return _from_chunks(labels, n), _from_chunks(distances, n)


def _means(x: jax.Array, labels: jax.Array, k: int, metric: str,
           previous: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """`update` on prepared inputs."""
  sums = jax.ops.segment_sum(x, labels, num_segments=k)
  counts = jax.ops.segment_sum(jnp.ones(labels.shape, jnp.int32), labels,
                               num_segments=k)
  if metric == "cosine":
    # The spherical k-means centroid: the direction of the members' sum.
    centroids = _prepare(sums, metric)
  else:
    centroids = sums / jnp.maximum(counts, 1)[:, None].astype(jnp.float32)
  if previous is None:
    previous = jnp.zeros_like(centroids)
  return jnp.where((counts > 0)[:, None], centroids, previous), counts


def _kmeans_plus_plus(x: jax.Array, k: int, key: jax.Array,
                      metric: str) -> jax.Array:
  """D^2 seeding on prepared x: k distinct rows of x, float32[k, d]."""
  n = x.shape[0]
  keys = jax.random.split(key, k)
  index = jnp.arange(n)

  def row(i):
    # A masked sum rather than x[i]: with x sharded over its rows this is a
    # local reduction plus an all-reduce of one row, where a dynamic gather
    # may make XLA all-gather x.
    return jnp.sum(jnp.where((index == i)[:, None], x, 0.0), axis=0)

  def distances_to(centroid):
    return _distances(x, centroid[None], metric)[:, 0]

  first = jax.random.randint(keys[0], (), 0, n)
  centroid = row(first)
  centroids = jnp.zeros((k, x.shape[1]), jnp.float32).at[0].set(centroid)
  carry = (centroids, distances_to(centroid), index == first)

  def body(i, carry):
    centroids, nearest, taken = carry
    # Chosen rows are masked out so that the k seeds are distinct rows even
    # when rounding leaves a chosen row a tiny positive distance; if every
    # remaining row sits on a centroid (fewer than k distinct points), fall
    # back to a uniform pick among the rows not yet taken.
    weights = jnp.where(taken, 0.0, nearest)
    logits = jnp.where(jnp.sum(weights) > 0, jnp.log(weights),
                       jnp.where(taken, -jnp.inf, 0.0))
    i_row = jax.random.categorical(keys[i], logits)
    centroid = row(i_row)
    return (centroids.at[i].set(centroid),
            jnp.minimum(nearest, distances_to(centroid)),
            taken | (index == i_row))

  return jax.lax.fori_loop(1, k, body, carry)[0]


def _seed(x: jax.Array, k: int, key: jax.Array, method: str,
          metric: str) -> jax.Array:
  if method not in INITS:
    raise ValueError(f"Unknown k-means init {method!r}; use one of {INITS}.")
  if key is None:
    raise ValueError(f"Seeding with {method!r} needs a PRNG key; pass one, "
                     "or pass `previous` centroids to skip the seeding.")
  if method == "random":
    return x[jax.random.choice(key, x.shape[0], (k,), replace=False)]
  return _kmeans_plus_plus(x, k, key, metric)


@functools.partial(jax.jit, static_argnames=("k", "method", "metric"))
def init_centroids(x: jax.Array, k: int, key: jax.Array,
                   method: str = "kmeans++",
                   metric: str = "cosine") -> jax.Array:
  """Picks k distinct rows of x as initial centroids.

  Args:
    x: float[n, d] points.
    k: number of centroids (static), 1 <= k <= n.
    key: PRNG key; the result is a deterministic function of it.
    method: "kmeans++" (D^2 sampling: each next seed is a row drawn with
      probability proportional to its distance to the nearest seed so far,
      the plain single-trial variant of Arthur & Vassilvitskii) or "random"
      (k distinct rows, uniformly).
    metric: "cosine" or "euclidean", the distance k-means++ samples by.

  Returns:
    float32[k, d] rows of x (L2-normalised for the cosine metric).

  k-means++ makes k passes over x (O(k n d) work, sequential in k): for n in
  the millions and k in the thousands, seed on a random subsample of x and
  pass the result to `kmeans` as `previous` (FAISS likewise trains on at most
  256 rows per centroid).
  """
  _check_metric(metric)
  _check_points(x)
  _check_k(k, x.shape[0])
  return _seed(_prepare(x, metric), k, key, method, metric)


@functools.partial(jax.jit, static_argnames=("metric", "chunk_size"))
def assign(x: jax.Array, centroids: jax.Array, metric: str = "cosine",
           chunk_size: int = 4096) -> tuple[jax.Array, jax.Array]:
  """The nearest centroid of every row.

  Args:
    x: float[n, d] points; may be sharded over its rows.
    centroids: float[k, d].
    metric: "cosine" (x and centroids are L2-normalised first; distance
      1 - cos) or "euclidean" (squared Euclidean distance).
    chunk_size: rows whose [rows, k] distances are computed at once; the
      working memory is about 8 * chunk_size * k bytes (see the module
      docstring).

  Returns:
    (labels int32[n], distances float32[n]): the nearest centroid (the lowest
    index among ties) and the distance to it.
  """
  _check_metric(metric)
  _check_points(x)
  _check_points(centroids, "centroids")
  _check_chunk_size(chunk_size)
  if centroids.shape[1] != x.shape[1]:
    raise ValueError(f"centroids have dimension {centroids.shape[1]} but x "
                     f"has {x.shape[1]}.")
  return _nearest(_prepare(x, metric), _prepare(centroids, metric), metric,
                  chunk_size)


@functools.partial(jax.jit, static_argnames=("k", "metric"))
def update(x: jax.Array, labels: jax.Array, k: int, metric: str = "cosine",
           previous: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The centroid of every cluster, given the rows' labels.

  Empty clusters keep their `previous` centroid. Alternatives are to re-seed
  them (sklearn: the rows farthest from their centroid; InterCLR's hook,
  from ODC: re-seeds clusters below a minimum size) or to split big clusters
  (FAISS). Keeping is chosen because (1) it is the one rule that needs nothing
  but (x, labels, previous), so the update stays a plain sum that shards
  exactly; (2) a warm-started online k-means (InterCLR) should not move a
  centroid that simply had no members this round, and a kept centroid can
  win rows back as the others move; (3) the method-specific policies need
  their own thresholds and randomness anyway, and can be applied on top from
  the returned `counts`.

  Args:
    x: float[n, d] points; may be sharded over its rows.
    labels: int[n] cluster of each row, in [0, k).
    k: number of clusters (static).
    metric: "cosine" (the normalised sum of the L2-normalised members) or
      "euclidean" (the mean).
    previous: float[k, d] centroids that empty clusters keep (normalised for
      cosine); zeros when None.

  Returns:
    (centroids float32[k, d], counts int32[k]).
  """
  _check_metric(metric)
  _check_points(x)
  if labels.shape != x.shape[:1]:
    raise ValueError(f"labels must be int[{x.shape[0]}] (one per row of x), "
                     f"got shape {labels.shape}.")
  if previous is not None:
    if previous.shape != (k, x.shape[1]):
      raise ValueError(f"previous must be float[{k}, {x.shape[1]}] (k, d), "
                       f"got shape {previous.shape}.")
    previous = _prepare(previous, metric)
  return _means(_prepare(x, metric), labels.astype(jnp.int32), k, metric,
                previous)


@functools.partial(
    jax.jit,
    static_argnames=("k", "iterations", "metric", "init", "chunk_size"))
def kmeans(x: jax.Array, k: int, key: jax.Array | None, *,
           iterations: int = 20, metric: str = "cosine",
           init: str = "kmeans++", previous: jax.Array | None = None,
           chunk_size: int = 4096) -> KMeansResult:
  """Lloyd's k-means: `iterations` rounds of `assign` then `update`.

  Args:
    x: float[n, d] points; may be a global array sharded over its rows
      (axis `data`), in which case every reduction is global.
    k: number of clusters (static), 1 <= k <= n.
    key: PRNG key for the seeding; unused (may be None) with `previous`.
    iterations: centroid updates (static); 0 returns the seeds.
    metric: "cosine" (spherical k-means) or "euclidean".
    init: "kmeans++" or "random", see `init_centroids`.
    previous: float[k, d] centroids to start from instead of seeding (a warm
      start, as online k-means re-uses last epoch's centroids).
    chunk_size: rows per distance block, see `assign`.

  Returns:
    KMeansResult. Its labels are the assignment to the returned centroids
    (one more `assign` after the last update), so labels, counts and inertia
    describe the same clustering. Empty clusters keep their centroid, see
    `update`.
  """
  _check_metric(metric)
  _check_points(x)
  _check_k(k, x.shape[0])
  _check_chunk_size(chunk_size)
  if iterations < 0:
    raise ValueError(f"iterations must be >= 0, got {iterations}.")
  x = _prepare(x, metric)
  if previous is None:
    centroids = _seed(x, k, key, init, metric)
  else:
    if previous.shape != (k, x.shape[1]):
      raise ValueError(f"previous must be float[{k}, {x.shape[1]}] (k, d), "
                       f"got shape {previous.shape}.")
    centroids = _prepare(previous, metric)

  def lloyd_step(_, centroids):
    labels, _ = _nearest(x, centroids, metric, chunk_size)
    return _means(x, labels, k, metric, centroids)[0]

  centroids = jax.lax.fori_loop(0, iterations, lloyd_step, centroids)
  labels, distances = _nearest(x, centroids, metric, chunk_size)
  counts = jax.ops.segment_sum(jnp.ones(labels.shape, jnp.int32), labels,
                               num_segments=k)
  return KMeansResult(centroids=centroids, labels=labels, counts=counts,
                      inertia=jnp.sum(distances))
