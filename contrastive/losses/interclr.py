r"""InterCLR: MoCo v2 plus an inter-image MarginNCE against a memory bank.

Xie et al., "Delving into Inter-Image Invariance for Unsupervised Visual
Representations", IJCV 130(12) 2022 (arXiv 2008.11702); official code
open-mmlab/mmselfsup `mmselfsup/models/algorithms/interclr_moco.py`
(clustering in `core/hooks/interclr_hook.py`).

  L = intra_weight * L_intra + inter_weight * L_inter     (0.75, 0.25)

L_intra is this package's MoCo v2 loss, `moco.moco_with_metrics(z, keys=...,
queue=..., temperature=...)` (symmetrised: each query view against the
other key view, the global batch's keys and the queue; see `moco.py`).

L_inter (MarginNCE) contrasts each query with a memory bank holding one
feature per training image:

  memory_bank    float[N, dim] L2-normalised rows (replicated; no gradient).
  bank_clusters  int32[N] each row's online k-means cluster; -1 for "not
                 clustered yet".
  index          int32[batch] each batch image's row of the bank.

For a query q of image i, with c = bank_clusters[index_i]:

  positive   p: a bank row drawn uniformly among the rows of cluster c other
             than row index_i itself;
  negatives  n_1..n_K: the R = `semi_hard_pool` rows most similar to q
             (cosine = dot product of unit vectors; over all N rows), minus
             the rows of cluster c (and the unclustered ones, below); K =
             `num_negatives` of those drawn uniformly WITHOUT replacement;
  s_0 = (q.p - m) / tau_inter,   s_k = q.n_k / tau_inter,
  l(q) = -log exp(s_0) / sum_{j=0..K} exp(s_j).

The margin is SUBTRACTED from the positive's cosine, as the official
`phi = cosine - inter_cos_margin`: the official m = -0.5 is a negative
margin, so the positive logit is (q.p + 0.5) / tau_inter, a less stringent
boundary than plain InfoNCE (m = 0); a positive m would be a stricter,
CosFace-like one. L_inter is the mean of l(q) over the valid queries of the
global batch (0 if there are none). A query is not valid (contributes
nothing, and is not counted) when c < 0, when cluster c has no row but
index_i, or when fewer than K rows of the pool remain after the exclusion.
The bank rows are constants: the gradient flows only through q. The draws
depend on q through its pool (a top-R by similarity), but are themselves
discrete: no gradient flows through them.

Official defaults (ImageNet-1k, `interclr_moco.py` and its config): MoCo v2
(queue 65536, momentum 0.999, tau 0.2) with a 1.28M x 128 memory bank
clustered by online k-means into 10000 clusters, intra / inter weights
0.75 / 0.25, cosine margin m = -0.5, semi-hard negatives: 16384 drawn from
the 128000 nearest bank rows, own cluster excluded; the inter temperature
is the head's, i.e. the same tau as MoCo's (`inter_temperature=None`).

What is ours:
  * Every view of every sample is an inter query (the official uses the
    first view's query only, as its MoCo is asymmetric; ours is symmetrised,
    every view being a MoCo query, so every view is an inter query too).
    Query (sample i, view v) has global id i * views + v.
  * The positive excludes the query's own bank row (the official may draw
    the image's own, stale, feature); a cluster with no other row makes the
    query invalid rather than a trivial positive.
  * Negatives are a uniform draw without replacement among the eligible pool
    rows (the official draws from the whole pool and re-draws the collisions
    with its own cluster until none is left, which can repeat rows); with too
    few eligible rows the query is invalid (the official would loop).
  * Rows with cluster -1 are never negatives: their cluster is unknown, so
    they might be same-cluster rows (the official bank is fully clustered
    before training starts, so this does not arise there).
  * Randomness: each query's draws come from `fold_in(rng, global query id)`
    (`moco.anchor_rngs`), so 1 and 8 devices draw the same; uniform choices
    are the top-k / argmax of 31-bit random integers over the eligible rows
    (O(N) work and memory per query).
  * Metrics: MoCo's (`contrastive_acc`, `pos_logit`, `neg_logit` of the
    intra loss), plus `loss_intra`, `loss_inter` (unweighted), `inter_acc`
    (valid queries whose positive logit, margin included, is the largest)
    and `inter_valid_fraction`.

The memory bank, its clusters and the queue are kept by the trainer (the
bank's rows are the momentum keys of each image, as the official
`update_samples_memory(idx, k)`); this module only reads them.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from contrastive import sharding
from contrastive.losses import moco

_HIGHEST = jax.lax.Precision.HIGHEST


class InterDraws(NamedTuple):
  """One step's inter-image draws for n queries.

  Attributes:
    positive: int32[n] the bank row of each query's positive (meaningless
      where not `valid`).
    negatives: int32[n, K] the bank rows of its K distinct negatives
      (meaningless where not `valid`).
    valid: bool[n] whether the query takes part in L_inter.
  """
  positive: jax.Array
  negatives: jax.Array
  valid: jax.Array


def _random_ints(rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Uniform int32 in [0, 2^31): ties are rarer than with float32 noise."""
  bits = jax.random.bits(rng, shape, jnp.uint32)
  return (bits >> 1).astype(jnp.int32)


def inter_draws(queries: jax.Array, memory_bank: jax.Array,
                bank_clusters: jax.Array, own_rows: jax.Array,
                query_rngs: jax.Array, *, num_negatives: int,
                semi_hard_pool: int) -> InterDraws:
  """InterCLR's positive and semi-hard negatives of each query.

  Args:
    queries: float[n, dim] L2-normalised queries (their values only are
      used: no gradient).
    memory_bank: float[N, dim] L2-normalised bank rows.
    bank_clusters: int[N] cluster of each row, -1 if not clustered.
    own_rows: int[n] each query's own bank row (its image's index); a row
      outside [0, N) counts as unclustered (the query is not valid).
    query_rngs: n PRNG keys, one per query.
    num_negatives: K, 1 <= K <= semi_hard_pool.
    semi_hard_pool: R, the most similar rows the negatives come from,
      K <= R <= N.

  Returns:
    `InterDraws`: a positive uniform among the rows of the query's cluster
    but its own; K negatives uniform without replacement among the R rows
    most similar to the query that are clustered and not of its cluster;
    valid where both exist (cluster >= 0, another row in it, >= K eligible
    pool rows).
  """
  size = memory_bank.shape[0]
  if not 1 <= num_negatives <= semi_hard_pool <= size:
    raise ValueError(
        f"interclr: need 1 <= num_negatives ({num_negatives}) <= "
        f"semi_hard_pool ({semi_hard_pool}) <= the memory bank's rows "
        f"N = {size}.")
  queries = jax.lax.stop_gradient(jnp.asarray(queries, jnp.float32))
  bank = jax.lax.stop_gradient(jnp.asarray(memory_bank, jnp.float32))
  clusters = jnp.asarray(bank_clusters, jnp.int32)
  own_rows = jnp.asarray(own_rows, jnp.int32)

  # Masks by comparison rather than gathers from the (replicated, closed
  # over inside `shard_map`) bank arrays.
  is_own = own_rows[:, None] == jnp.arange(size, dtype=jnp.int32)[None, :]
  cluster = jnp.max(jnp.where(is_own, clusters[None, :], -1), axis=1)
  clustered = cluster >= 0
  same = clusters[None, :] == cluster[:, None]
  positive_ok = same & ~is_own & clustered[:, None]
  eligible = ~same & (clusters[None, :] >= 0)

  scores = jnp.matmul(queries, bank.T, precision=_HIGHEST)
  _, pool = jax.lax.top_k(scores, semi_hard_pool)
  pool_ok = jnp.take_along_axis(eligible, pool, axis=1)

  def noise(rng):
    rng_pos, rng_neg = jax.random.split(rng)
    return (_random_ints(rng_pos, (size,)),
            _random_ints(rng_neg, (semi_hard_pool,)))

  pos_noise, neg_noise = jax.vmap(noise)(query_rngs)
  positive = jnp.argmax(jnp.where(positive_ok, pos_noise, -1),
                        axis=1).astype(jnp.int32)
  _, picks = jax.lax.top_k(jnp.where(pool_ok, neg_noise, -1), num_negatives)
  negatives = jnp.take_along_axis(pool, picks, axis=1).astype(jnp.int32)
  valid = (clustered & positive_ok.any(axis=1)
           & (pool_ok.sum(axis=1) >= num_negatives))
  return InterDraws(positive, negatives, valid)


def _check_inter_inputs(z, memory_bank, bank_clusters, index, rng,
                        num_negatives, semi_hard_pool) -> None:
  batch, _, dim = z.shape
  if memory_bank is None or bank_clusters is None or index is None:
    raise ValueError(
        "interclr needs memory_bank (float[N, dim] one feature per training "
        "image), bank_clusters (int32[N], -1 unclustered) and index "
        "(int32[batch], each sample's bank row).")
  if rng is None:
    raise ValueError("interclr needs rng (a PRNG key per step) to draw its "
                     "positives and negatives.")
  if memory_bank.ndim != 2 or memory_bank.shape[1] != dim:
    raise ValueError(
        f"interclr: memory_bank must be float[N, {dim}] (z's dimension), "
        f"got shape {memory_bank.shape}.")
  size = memory_bank.shape[0]
  if bank_clusters.shape != (size,):
    raise ValueError(
        f"interclr: bank_clusters must be int[{size}] (one cluster per bank "
        f"row), got shape {bank_clusters.shape}.")
  if index.shape != (batch,):
    raise ValueError(
        f"interclr: index must be int[{batch}] (one bank row per sample), "
        f"got shape {index.shape}.")
  for name, value in (("num_negatives", num_negatives),
                      ("semi_hard_pool", semi_hard_pool)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
      raise ValueError(f"interclr: {name} must be an int, got {value!r}.")
  if not 1 <= num_negatives <= semi_hard_pool <= size:
    raise ValueError(
        f"interclr: need 1 <= num_negatives ({num_negatives}) <= "
        f"semi_hard_pool ({semi_hard_pool}) <= the memory bank's rows "
        f"N = {size}; lower them for a smaller bank (official: 16384 of "
        "128000 for 1.28M rows).")


def interclr_with_metrics(
    z: jax.Array, labels: None = None, *, temperature, keys: jax.Array,
    queue: jax.Array | None, rng: jax.Array, memory_bank: jax.Array,
    bank_clusters: jax.Array, index: jax.Array, intra_weight: float = 0.75,
    inter_weight: float = 0.25, margin: float = -0.5,
    inter_temperature: float | None = None, num_negatives: int = 16384,
    semi_hard_pool: int = 128000, queue_valid: jax.Array | None = None,
    loss_impl: str = "gather", block_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """InterCLR (MoCo v2 + inter-image MarginNCE), with metrics.

  See the module docstring for the equations and what differs from the
  official code.

  Args:
    z: float[batch, views >= 2, dim] L2-normalised online embeddings.
    labels: must be None.
    temperature: MoCo's softmax temperature (official: 0.2).
    keys: float[batch, views, dim] momentum embeddings.
    queue: float[K, dim] past keys, or None.
    rng: PRNG key of this step; query (i, v) draws with
      `fold_in(rng, i * views + v)`.
    memory_bank: float[N, dim] L2-normalised bank rows (replicated).
    bank_clusters: int[N] cluster of each row, -1 not clustered yet.
    index: int[batch] each sample's bank row (sharded like z).
    intra_weight: weight of the MoCo loss (official 0.75).
    inter_weight: weight of the MarginNCE loss (official 0.25).
    margin: m, subtracted from the positive's cosine (official -0.5, which
      ADDS 0.5).
    inter_temperature: tau of L_inter; None: `temperature`.
    num_negatives: K negatives per query (official 16384).
    semi_hard_pool: R most similar bank rows they come from (official
      128000).
    queue_valid: bool[K] or None (all valid).
    loss_impl: must be "gather".
    block_size: unused.

  Returns:
    (loss, metrics): the float32 loss and MoCo's metrics (`contrastive_acc`,
    `pos_logit`, `neg_logit`) plus `loss_intra`, `loss_inter`, `inter_acc`,
    `inter_valid_fraction`.
  """
  if inter_temperature is None:
    inter_temperature = temperature
  moco.check_inputs("interclr", z, labels, keys, queue, temperature,
                    loss_impl, queue_valid,
                    inter_temperature=inter_temperature)
  _check_inter_inputs(z, memory_bank, bank_clusters, index, rng,
                      num_negatives, semi_hard_pool)
  intra, metrics = moco.moco_with_metrics(
      z, temperature=temperature, keys=keys, queue=queue,
      queue_valid=queue_valid, loss_impl=loss_impl, block_size=block_size)

  bank = jax.lax.stop_gradient(jnp.asarray(memory_bank, jnp.float32))
  clusters = jnp.asarray(bank_clusters, jnp.int32)
  views, dim = z.shape[1], z.shape[2]

  def kernel(z, index, axis_name):
    local_batch = z.shape[0]
    offset = 0 if axis_name is None else (
        jax.lax.axis_index(axis_name) * local_batch)
    sample_ids = (offset + jnp.arange(local_batch)).astype(jnp.int32)
    query_ids = sample_ids[:, None] * views + jnp.arange(views)[None, :]
    queries = z.astype(jnp.float32).reshape(-1, dim)
    own_rows = jnp.repeat(jnp.asarray(index, jnp.int32), views)
    draws = inter_draws(queries, bank, clusters, own_rows,
                        moco.anchor_rngs(rng, query_ids),
                        num_negatives=num_negatives,
                        semi_hard_pool=semi_hard_pool)
    # Logits from the one similarity matrix the pool was ranked by; the
    # gradient reaches the queries through it.
    scores = jnp.matmul(queries, bank.T, precision=_HIGHEST)
    columns = jnp.concatenate([draws.positive[:, None], draws.negatives],
                              axis=1)
    cosines = jnp.take_along_axis(scores, columns, axis=1)
    logits = cosines.at[:, 0].add(-margin) / inter_temperature
    per_query = jax.nn.logsumexp(logits, axis=1) - logits[:, 0]
    valid = draws.valid
    best = jnp.argmax(jax.lax.stop_gradient(logits), axis=1)
    sums = {
        "loss": jnp.where(valid, per_query, 0.0).sum(),
        "valid": valid.sum().astype(jnp.float32),
        "correct": (valid & (best == 0)).sum().astype(jnp.float32),
        "queries": jnp.asarray(valid.size, jnp.float32),
    }
    if axis_name is not None:
      sums = jax.lax.psum(sums, axis_name)
    count = jnp.maximum(sums["valid"], 1.0)
    return sums["loss"] / count, {
        "inter_acc": sums["correct"] / count,
        "inter_valid_fraction": sums["valid"] / sums["queries"],
    }

  inter, inter_metrics = sharding.map_batch_shards(kernel, z, index)
  loss = intra_weight * intra + inter_weight * inter
  metrics = {**metrics, **inter_metrics,
             "loss_intra": jax.lax.stop_gradient(intra),
             "loss_inter": jax.lax.stop_gradient(inter)}
  return loss.astype(jnp.float32), {
      name: value.astype(jnp.float32) for name, value in metrics.items()}


def interclr(z, labels=None, *, temperature, keys, queue, rng, memory_bank,
             bank_clusters, index, intra_weight=0.75, inter_weight=0.25,
             margin=-0.5, inter_temperature=None, num_negatives=16384,
             semi_hard_pool=128000, queue_valid=None, loss_impl="gather",
             block_size=None) -> jax.Array:
  """InterCLR; see `interclr_with_metrics` (same arguments).

  Args:
    z: float[batch, views, dim] online embeddings.
    labels: must be None.
    temperature: MoCo's temperature.
    keys: float[batch, views, dim] momentum embeddings.
    queue: float[K, dim] or None.
    rng: PRNG key of this step.
    memory_bank: float[N, dim] bank rows.
    bank_clusters: int[N] clusters, -1 unclustered.
    index: int[batch] bank rows of the batch.
    intra_weight: MoCo's weight.
    inter_weight: MarginNCE's weight.
    margin: m (subtracted from the positive cosine).
    inter_temperature: MarginNCE's tau; None: `temperature`.
    num_negatives: K.
    semi_hard_pool: R.
    queue_valid: bool[K] or None.
    loss_impl: must be "gather".
    block_size: unused.

  Returns:
    float32 scalar loss.
  """
  return interclr_with_metrics(
      z, labels, temperature=temperature, keys=keys, queue=queue, rng=rng,
      memory_bank=memory_bank, bank_clusters=bank_clusters, index=index,
      intra_weight=intra_weight, inter_weight=inter_weight, margin=margin,
      inter_temperature=inter_temperature, num_negatives=num_negatives,
      semi_hard_pool=semi_hard_pool, queue_valid=queue_valid,
      loss_impl=loss_impl, block_size=block_size)[0]
