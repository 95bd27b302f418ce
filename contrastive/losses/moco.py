r"""Momentum-encoder / queue losses: MoCo, MoCHi, SCE, ReLIC, RényiCL.

Inputs shared by every loss here:

  z       float[batch, views, dim] L2-normalised online (query) embeddings;
          the gradient flows through them.
  keys    float[batch, views, dim] L2-normalised embeddings of the same views
          by the momentum (key / target) encoder; stop-gradient. Only the
          key views (0 and 1, below) are read, so with more views keys may
          hold just those two: float[batch, 2, dim].
  queue   float[K, dim] L2-normalised keys of past batches (replicated;
          stop-gradient), or None for no queue (K = 0).
  queue_valid  bool[K] or None (all valid): entries that take part. MoCo
          fills its queue with random unit vectors, which are negatives from
          the first step on, so the trainer needs this only to leave entries
          out on purpose.

Pairing. The momentum encoder sees the first two views (the two large crops
of MoCo v3, RényiCL, ReLICv2 and SCE with multi-crop): the key views are
{0, 1}, and at least 2 views are needed. Each query view `v` is paired with
every key view `u != v`:

  2 views: (q0, k1) and (q1, k0), the symmetrised loss of MoCo v3.
  V views: (q0, k1), (q1, k0) and (q_v, k0), (q_v, k1) for v >= 2 (the
           small crops against both large ones, as RényiCL's and ReLICv2's
           multi-crop loops do).

An anchor is one (sample i, query view v, key view u) pair; its logits are
`s = q_iv . c / temperature` over the columns

  keys of view u of every sample of the GLOBAL batch (k_iu is the positive,
  the others negatives; gathered with `all_gather` inside `shard_map`),
  then every valid queue entry (negatives),
  then, for MoCHi only, the anchor's synthetic hard negatives.

MoCo (`moco`), per anchor:
  L = -log exp(s_pos) / sum_{c in columns} exp(s_c)
and the loss is the mean over the global batch's anchors (each sample gives
`len(pairs)` anchors). MoCo v2's code contrasts a query with its key and the
queue only; MoCo v3's with the global batch's keys only (and sums its two
directions, scaled by 2 tau, which only rescales the learning rate). Here
both sets are negatives: with `queue=None` this is MoCo v3's loss / (2 tau)
averaged over the directions.

References:
  He et al. 2020 (MoCo, arXiv 1911.05722); Chen et al. 2020 (MoCo v2, arXiv
  2003.04297); Chen, Xie, He 2021 (MoCo v3, arXiv 2104.02057).
  Kalantidis et al. 2020 (MoCHi, arXiv 2010.01028).
  Denize et al. 2023 (SCE, arXiv 2111.14585; eztorch `losses/sce_loss.py`).
  Mitrovic et al. 2021 (ReLIC, arXiv 2010.07922); Tomasev et al. 2022
  (ReLICv2, arXiv 2201.05119).
  Lee & Shin 2022 (RényiCL, arXiv 2208.06270; kyungmnlee/RenyiCL
  `renyicl/builder.py`).
  The formulas and defaults: /work/shared/reference/methods.md sections 7,
  9, 14, 20 and "Shared machinery".
"""

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from contrastive import sharding
from contrastive.losses import supcon

_HIGHEST = jax.lax.Precision.HIGHEST
# The momentum encoder embeds the first two views (the large crops).
KEY_VIEWS = 2


def query_key_pairs(views: int, symmetric: bool = True
                    ) -> tuple[tuple[int, int], ...]:
  """The (query view, key view) pairs of the loss; see the module docstring.

  Args:
    views: views per sample (>= 2).
    symmetric: False keeps only the pairs whose key is view 0 (SCE's
      asymmetric loss: view 0 is the weak view, seen by the momentum
      encoder; every other view is a strong query).

  Returns:
    Tuple of (v, u) pairs, query view first.
  """
  if views < 2:
    raise ValueError(
        f"Momentum-encoder losses pair a view's query with another view's "
        f"key and need at least 2 views per sample, got {views}.")
  key_views = range(min(views, KEY_VIEWS)) if symmetric else (0,)
  return tuple((v, u) for v in range(views) for u in key_views if u != v)


def check_inputs(name: str, z: jax.Array, labels, keys, queue, temperature,
                 loss_impl: str, queue_valid=None, *, needs_keys: bool = True,
                 label_free: bool = True, **temperatures) -> None:
  """Shape, label and option checks of the queue losses (clear messages).

  Args:
    name: the loss's registered name, for the messages.
    z: the online embeddings.
    labels: must be None for a label-free loss.
    keys: the momentum embeddings (required if `needs_keys`).
    queue: float[K, dim] or None.
    temperature: softmax temperature.
    loss_impl: only "gather" is supported.
    queue_valid: bool[K] or None.
    needs_keys: whether the loss takes `keys`.
    label_free: whether labels must be None.
    **temperatures: further temperatures to check (> 0).
  """
  supcon.validate_inputs(z, labels, temperature=temperature, **temperatures)
  if label_free and labels is not None:
    raise ValueError(
        f"{name} takes no labels (every sample is its own class); pass "
        "labels=None, or use 'paco' / 'gpaco' to train with labels.")
  if loss_impl != "gather":
    raise ValueError(
        f"{name} supports only loss_impl='gather' (each device's anchors "
        f"against the gathered keys and the queue), got {loss_impl!r}.")
  if needs_keys:
    if keys is None:
      raise ValueError(
          f"{name} needs keys: the momentum encoder's float[batch, views, "
          "dim] embeddings of the same views as z.")
    batch, views, dim = z.shape
    key_views = min(views, KEY_VIEWS)
    if (keys.ndim != 3 or keys.shape[0] != batch or keys.shape[2] != dim
        or not key_views <= keys.shape[1] <= views):
      raise ValueError(
          f"{name}: keys must be float[{batch}, views, {dim}] like z "
          f"{z.shape}, with all {views} views or just the first "
          f"{key_views} (the key views), got {keys.shape}.")
  if queue is not None and (queue.ndim != 2 or queue.shape[1] != z.shape[2]):
    raise ValueError(
        f"{name}: queue must be float[K, {z.shape[2]}] (K past keys of z's "
        f"dimension), got shape {queue.shape}.")
  size = 0 if queue is None else queue.shape[0]
  if queue_valid is not None and queue_valid.shape != (size,):
    raise ValueError(f"{name}: queue_valid must be bool[{size}] (one flag per "
                     f"queue entry), got shape {queue_valid.shape}.")


def queue_or_empty(queue, queue_valid, dim: int):
  """(float32 stop-gradient queue [K, dim], bool[K] validity)."""
  if queue is None:
    queue = jnp.zeros((0, dim), jnp.float32)
  queue = jax.lax.stop_gradient(jnp.asarray(queue, jnp.float32))
  if queue_valid is None:
    queue_valid = jnp.ones((queue.shape[0],), bool)
  return queue, jnp.asarray(queue_valid, bool)


def masked_logsumexp(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Log-sum-exp of `x` over `mask` along the last axis (rows need one)."""
  return jax.nn.logsumexp(jnp.where(mask, x, -jnp.inf), axis=-1)


class PairLogits(NamedTuple):
  """One device's anchors and their columns (see the module docstring).

  Attributes:
    queries: float32[b, P, dim] the anchors' online embeddings.
    paired_keys: float32[b, P, dim] their own keys k_iu (stop-gradient).
    column_keys: float32[global_batch, P, dim] the key of view u of every
      sample of the global batch, per pair (stop-gradient).
    queue: float32[K, dim] (stop-gradient).
    logits: float32[b, P, global_batch + K], query . column / temperature.
    positive: bool[b, P, global_batch + K], the own key's column.
    negative: bool[b, P, global_batch + K], other keys and valid queue rows.
    anchor_ids: int32[b, P] global anchor index, independent of sharding:
      (sample * views + query view) * views + key view.
  """
  queries: jax.Array
  paired_keys: jax.Array
  column_keys: jax.Array
  queue: jax.Array
  logits: jax.Array
  positive: jax.Array
  negative: jax.Array
  anchor_ids: jax.Array


def pair_logits(z: jax.Array, keys: jax.Array, queue: jax.Array,
                queue_valid: jax.Array, temperature,
                pairs: tuple[tuple[int, int], ...],
                axis_name: str | None) -> PairLogits:
  """Builds the logits of this device's anchors against the global columns."""
  local_batch, views, _ = z.shape
  z = z.astype(jnp.float32)
  keys = jax.lax.stop_gradient(keys.astype(jnp.float32))
  global_keys = keys if axis_name is None else jax.lax.all_gather(
      keys, axis_name, tiled=True)
  global_batch = global_keys.shape[0]
  offset = 0 if axis_name is None else (
      jax.lax.axis_index(axis_name) * local_batch)
  query_views = np.array([v for v, _ in pairs])
  key_views = np.array([u for _, u in pairs])
  queries = z[:, query_views]
  column_keys = global_keys[:, key_views]
  # Dividing the queries (not the logits) keeps the temperature an input
  # whatever the logits feed.
  scaled = queries / temperature
  logits = jnp.concatenate([
      jnp.einsum("bpd,npd->bpn", scaled, column_keys, precision=_HIGHEST),
      jnp.einsum("bpd,kd->bpk", scaled, queue, precision=_HIGHEST)], axis=-1)
  sample_ids = (offset + jnp.arange(local_batch)).astype(jnp.int32)
  own = sample_ids[:, None] == jnp.arange(global_batch)[None, :]
  size = queue.shape[0]
  shape = logits.shape
  positive = jnp.broadcast_to(jnp.concatenate(
      [own, jnp.zeros((local_batch, size), bool)], axis=1)[:, None], shape)
  negative = jnp.broadcast_to(jnp.concatenate(
      [~own, jnp.broadcast_to(queue_valid, (local_batch, size))],
      axis=1)[:, None], shape)
  anchor_ids = ((sample_ids[:, None] * views + query_views[None, :]) * views
                + key_views[None, :]).astype(jnp.int32)
  return PairLogits(queries, keys[:, key_views], column_keys, queue, logits,
                    positive, negative, anchor_ids)


def reduce_over_anchors(per_anchor: jax.Array, logits: jax.Array,
                        positive: jax.Array, negative: jax.Array,
                        axis_name: str | None,
                        extra: dict[str, jax.Array] | None = None):
  """Mean loss over the global batch's anchors, and the metrics.

  Args:
    per_anchor: float32[...] loss of each local anchor.
    logits, positive, negative: float32 / bool [..., columns].
    axis_name: the batch's mesh axis, or None.
    extra: more per-device sums to average over the anchors (name -> sum),
      returned as metrics.

  Returns:
    (loss, metrics): `contrastive_acc` (anchors whose best column is their
    positive), `pos_logit`, `neg_logit` (mean logit of positive / negative
    columns), and the `extra` means.
  """
  # Metrics are monitoring only; no gradient should leak through them.
  logits = jax.lax.stop_gradient(logits)
  considered = positive | negative
  best = jnp.argmax(jnp.where(considered, logits, -jnp.inf), axis=-1)
  correct = jnp.take_along_axis(positive, best[..., None], axis=-1)[..., 0]
  sums = {
      "loss": per_anchor.sum(),
      "anchors": jnp.asarray(per_anchor.size, jnp.float32),
      "correct": correct.sum().astype(jnp.float32),
      "pos_logit": jnp.where(positive, logits, 0.0).sum(),
      "num_pos": positive.sum().astype(jnp.float32),
      "neg_logit": jnp.where(negative, logits, 0.0).sum(),
      "num_neg": negative.sum().astype(jnp.float32),
  }
  extra = extra or {}
  sums.update({f"extra_{name}": value for name, value in extra.items()})
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  anchors = jnp.maximum(sums["anchors"], 1.0)
  metrics = {
      "contrastive_acc": sums["correct"] / anchors,
      "pos_logit": sums["pos_logit"] / jnp.maximum(sums["num_pos"], 1.0),
      "neg_logit": sums["neg_logit"] / jnp.maximum(sums["num_neg"], 1.0),
  }
  metrics.update({name: sums[f"extra_{name}"] / anchors for name in extra})
  return sums["loss"] / anchors, metrics


def _cross_entropy(built: PairLogits, logits=None, positive=None,
                   negative=None) -> jax.Array:
  """-log softmax of the positive column, per anchor."""
  logits = built.logits if logits is None else logits
  positive = built.positive if positive is None else positive
  negative = built.negative if negative is None else negative
  den = masked_logsumexp(logits, positive | negative)
  return den - jnp.where(positive, logits, 0.0).sum(axis=-1)


def _over_global_batch(kernel, z, keys):
  """`kernel(z, keys, axis_name)` over the global batch."""
  return sharding.map_batch_shards(kernel, z, keys)


# ----------------------------------------------------------------- MoCo --


def moco_with_metrics(
    z: jax.Array, labels: None = None, *, temperature, keys: jax.Array,
    queue: jax.Array | None, queue_valid: jax.Array | None = None,
    loss_impl: str = "gather", block_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """MoCo's InfoNCE with a queue and the global batch's keys, with metrics.

  Args:
    z: float[batch, views >= 2, dim] L2-normalised online embeddings.
    labels: must be None.
    temperature: softmax temperature (MoCo v2: 0.2).
    keys: float[batch, views, dim] momentum-encoder embeddings.
    queue: float[K, dim] past keys, or None.
    queue_valid: bool[K] or None (all valid).
    loss_impl: must be "gather".
    block_size: unused (no streamed implementation).

  Returns:
    (loss, metrics): the float32 mean over the global batch's anchors of
    `-log exp(s_pos) / sum_c exp(s_c)`, and `contrastive_acc`, `pos_logit`,
    `neg_logit`.
  """
  del block_size
  check_inputs("moco", z, labels, keys, queue, temperature, loss_impl,
               queue_valid)
  queue, queue_valid = queue_or_empty(queue, queue_valid, z.shape[2])
  pairs = query_key_pairs(z.shape[1])

  def kernel(z, keys, axis_name):
    built = pair_logits(z, keys, queue, queue_valid, temperature, pairs,
                        axis_name)
    return reduce_over_anchors(_cross_entropy(built), built.logits,
                               built.positive, built.negative, axis_name)

  return _over_global_batch(kernel, z, keys)


def moco(z, labels=None, *, temperature, keys, queue, queue_valid=None,
         loss_impl="gather", block_size=None) -> jax.Array:
  """MoCo v2/v3 InfoNCE; see `moco_with_metrics`.

  Args:
    z: float[batch, views, dim] online embeddings.
    labels: must be None.
    temperature: softmax temperature.
    keys: float[batch, views, dim] momentum embeddings.
    queue: float[K, dim] or None.
    queue_valid: bool[K] or None.
    loss_impl: must be "gather".
    block_size: unused.

  Returns:
    float32 scalar loss.
  """
  return moco_with_metrics(
      z, labels, temperature=temperature, keys=keys, queue=queue,
      queue_valid=queue_valid, loss_impl=loss_impl, block_size=block_size)[0]


# ---------------------------------------------------------------- MoCHi --


class SyntheticNegatives(NamedTuple):
  """MoCHi's synthetic negatives of a batch of queries.

  Attributes:
    negatives: float32[n, s + s', dim] unit vectors (stop-gradient): first
      the s mixes of two hard negatives, then the s' mixes with the query.
    valid: bool[n, s + s'] False where a source queue entry was not valid.
    hard_indices: int32[n, N] the queue rows of the N hardest negatives.
    first: int32[n, s + s'] queue row of the first source; -1 where it is
      the query.
    second: int32[n, s + s'] queue row of the second source.
    coefficient: float32[n, s + s'] the first source's share: alpha ~ U(0, 1)
      for the negative mixes, beta ~ U(0, 0.5) (the query's share) for the
      query mixes.
  """
  negatives: jax.Array
  valid: jax.Array
  hard_indices: jax.Array
  first: jax.Array
  second: jax.Array
  coefficient: jax.Array


def mochi_synthetic_negatives(queries: jax.Array, queue: jax.Array,
                              rngs: jax.Array, *, num_hard: int,
                              num_mix: int, num_query_mix: int,
                              queue_valid: jax.Array | None = None
                              ) -> SyntheticNegatives:
  """MoCHi(N, s, s') hard negatives of each query (Kalantidis et al. 2020).

  For a query q: Q^N = the N valid queue entries most similar to q;
  h = normalise(alpha n_i + (1 - alpha) n_j), n_i, n_j drawn uniformly (with
  replacement) from Q^N, alpha ~ U(0, 1), s times; h' = normalise(beta q +
  (1 - beta) n_j), n_j from Q^N, beta ~ U(0, 0.5) (the query's share stays
  under one half, as in the paper), s' times. All of it stop-gradient: the
  synthetic points are per-query constants.

  Args:
    queries: float[n, dim] L2-normalised queries.
    queue: float[K, dim] L2-normalised queue.
    rngs: n PRNG keys, one per query.
    num_hard: N, 1 <= N <= K.
    num_mix: s.
    num_query_mix: s'.
    queue_valid: bool[K] or None (all valid). Invalid rows rank last; mixes
      built from one are marked invalid.

  Returns:
    `SyntheticNegatives`.
  """
  size = queue.shape[0]
  if not 1 <= num_hard <= size:
    raise ValueError(
        f"mochi: num_hard (N = {num_hard}) must be between 1 and the queue "
        f"size K = {size}; shorten N or lengthen the queue.")
  if num_mix < 0 or num_query_mix < 0:
    raise ValueError(f"mochi: num_mix ({num_mix}) and num_query_mix "
                     f"({num_query_mix}) must be >= 0.")
  queries = jax.lax.stop_gradient(jnp.asarray(queries, jnp.float32))
  queue = jax.lax.stop_gradient(jnp.asarray(queue, jnp.float32))
  valid = (jnp.ones((size,), bool) if queue_valid is None
           else jnp.asarray(queue_valid, bool))

  scores = jnp.where(valid[None, :],
                     jnp.matmul(queries, queue.T, precision=_HIGHEST),
                     -jnp.inf)
  hard_scores, hard = jax.lax.top_k(scores, num_hard)
  hard = hard.astype(jnp.int32)
  # Validity from the scores, not by indexing `valid`: a gather from an
  # array closed over by `shard_map` trips JAX's mesh check.
  hard_valid = jnp.isfinite(hard_scores)

  def draw(rng):
    rng_i, rng_j, rng_alpha, rng_k, rng_beta = jax.random.split(rng, 5)
    return (jax.random.randint(rng_i, (num_mix,), 0, num_hard),
            jax.random.randint(rng_j, (num_mix,), 0, num_hard),
            jax.random.uniform(rng_alpha, (num_mix,)),
            jax.random.randint(rng_k, (num_query_mix,), 0, num_hard),
            jax.random.uniform(rng_beta, (num_query_mix,), maxval=0.5))

  # Only the draws are vmapped: the rest is batched by hand.
  pick_i, pick_j, alpha, pick_k, beta = jax.vmap(draw)(rngs)
  first = jnp.take_along_axis(hard, pick_i, axis=1)
  second = jnp.take_along_axis(hard, pick_j, axis=1)
  query_second = jnp.take_along_axis(hard, pick_k, axis=1)
  alpha, beta = alpha[..., None], beta[..., None]
  mixes = jnp.concatenate([
      alpha * queue[first] + (1 - alpha) * queue[second],
      beta * queries[:, None] + (1 - beta) * queue[query_second]], axis=1)
  norms = jnp.linalg.norm(mixes, axis=-1, keepdims=True)
  return SyntheticNegatives(
      negatives=mixes / jnp.maximum(norms, 1e-12),
      valid=jnp.concatenate([
          jnp.take_along_axis(hard_valid, pick_i, axis=1)
          & jnp.take_along_axis(hard_valid, pick_j, axis=1),
          jnp.take_along_axis(hard_valid, pick_k, axis=1)], axis=1),
      hard_indices=hard,
      first=jnp.concatenate(
          [first, jnp.full(query_second.shape, -1, jnp.int32)], axis=1),
      second=jnp.concatenate([second, query_second], axis=1),
      coefficient=jnp.concatenate([alpha[..., 0], beta[..., 0]], axis=1))


def anchor_rngs(rng: jax.Array, anchor_ids: jax.Array) -> jax.Array:
  """One key per anchor, from its global index: the same on any mesh."""
  flat = anchor_ids.reshape(-1)
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(flat)


def mochi_with_metrics(
    z: jax.Array, labels: None = None, *, temperature, keys: jax.Array,
    queue: jax.Array, rng: jax.Array, num_hard: int = 1024,
    num_mix: int = 512, num_query_mix: int = 256,
    mix_from_step: int = 0, step: jax.Array | None = None,
    queue_valid: jax.Array | None = None, loss_impl: str = "gather",
    block_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """MoCHi: MoCo with synthetic hard negatives, with metrics.

  Per anchor, the MoCo loss with the anchor's s + s' synthetic negatives of
  `mochi_synthetic_negatives` (from the queue only, as in the paper) as
  extra negative columns:
    L = -log exp(q.k/t) / (exp(q.k/t) + sum_{n in batch keys, queue}
        exp(q.n/t) + sum_{h in H u H'} exp(q.h/t)).
  Defaults MoCHi(1024, 512, 256), the paper's ImageNet-1k setting. The
  paper's later start of the mixing is `mix_from_step`: before that step
  the synthetic columns are masked out of the denominator, which is MoCo
  (they are still drawn, so the compiled step is one program). The metrics
  count the synthetic columns that take part as negatives, and
  `mochi_mixing` is 1 once they do.

  Args:
    z: float[batch, views >= 2, dim] online embeddings.
    labels: must be None.
    temperature: softmax temperature (MoCo v2: 0.2).
    keys: float[batch, views, dim] momentum embeddings.
    queue: float[K, dim] past keys (K >= num_hard when mixing).
    rng: PRNG key of this step. Each anchor's randomness is
      `fold_in(rng, global anchor index)`, so it does not depend on the
      sharding.
    num_hard: N, the hardest queue entries mixed.
    num_mix: s, mixes of two hard negatives.
    num_query_mix: s', mixes of the query with a hard negative.
    mix_from_step: the first training step that mixes (0: from the start).
    step: int scalar, the current training step (the trainer's "step"
      input); needed when mix_from_step > 0.
    queue_valid: bool[K] or None.
    loss_impl: must be "gather".
    block_size: unused.

  Returns:
    (loss, metrics) as in `moco_with_metrics`, plus `mochi_mixing`.
  """
  del block_size
  check_inputs("mochi", z, labels, keys, queue, temperature, loss_impl,
               queue_valid)
  queue, queue_valid = queue_or_empty(queue, queue_valid, z.shape[2])
  pairs = query_key_pairs(z.shape[1])
  mixing = num_mix + num_query_mix > 0
  if mixing and rng is None:
    raise ValueError("mochi needs rng (a PRNG key per step) to draw its "
                     "synthetic negatives.")
  if mixing and not 1 <= num_hard <= queue.shape[0]:
    raise ValueError(
        f"mochi: num_hard (N = {num_hard}) must be between 1 and the queue "
        f"size K = {queue.shape[0]}; shorten N or lengthen the queue.")
  if mix_from_step < 0:
    raise ValueError(f"mochi: mix_from_step ({mix_from_step}) must be >= 0.")
  if mixing and mix_from_step > 0 and step is None:
    raise ValueError("mochi: mix_from_step > 0 needs step (the current "
                     "training step) to know when mixing starts.")
  mixing_active = jnp.asarray(mixing and (
      mix_from_step == 0 or step >= mix_from_step))

  def kernel(z, keys, axis_name):
    built = pair_logits(z, keys, queue, queue_valid, temperature, pairs,
                        axis_name)
    logits, positive, negative = built.logits, built.positive, built.negative
    if mixing:
      local_batch, num_pairs, dim = built.queries.shape
      synthetic = mochi_synthetic_negatives(
          built.queries.reshape(-1, dim), queue,
          anchor_rngs(rng, built.anchor_ids), num_hard=num_hard,
          num_mix=num_mix, num_query_mix=num_query_mix,
          queue_valid=queue_valid)
      count = num_mix + num_query_mix
      negatives = synthetic.negatives.reshape(local_batch, num_pairs, count,
                                              dim)
      extra_logits = jnp.einsum("bpd,bpsd->bps", built.queries / temperature,
                                negatives, precision=_HIGHEST)
      logits = jnp.concatenate([logits, extra_logits], axis=-1)
      positive = jnp.concatenate(
          [positive, jnp.zeros(extra_logits.shape, bool)], axis=-1)
      negative = jnp.concatenate(
          [negative,
           synthetic.valid.reshape(extra_logits.shape) & mixing_active],
          axis=-1)
    per_anchor = _cross_entropy(built, logits, positive, negative)
    return reduce_over_anchors(per_anchor, logits, positive, negative,
                               axis_name)

  loss, metrics = _over_global_batch(kernel, z, keys)
  return loss, {**metrics, "mochi_mixing": mixing_active.astype(jnp.float32)}


def mochi(z, labels=None, *, temperature, keys, queue, rng, num_hard=1024,
          num_mix=512, num_query_mix=256, mix_from_step=0, step=None,
          queue_valid=None, loss_impl="gather",
          block_size=None) -> jax.Array:
  """MoCHi; see `mochi_with_metrics` (same arguments).

  Args:
    z: float[batch, views, dim] online embeddings.
    labels: must be None.
    temperature: softmax temperature.
    keys: float[batch, views, dim] momentum embeddings.
    queue: float[K, dim].
    rng: PRNG key of this step.
    num_hard: N.
    num_mix: s.
    num_query_mix: s'.
    mix_from_step: the first step that mixes.
    step: int scalar, the current step.
    queue_valid: bool[K] or None.
    loss_impl: must be "gather".
    block_size: unused.

  Returns:
    float32 scalar loss.
  """
  return mochi_with_metrics(
      z, labels, temperature=temperature, keys=keys, queue=queue, rng=rng,
      num_hard=num_hard, num_mix=num_mix, num_query_mix=num_query_mix,
      mix_from_step=mix_from_step, step=step, queue_valid=queue_valid, loss_impl=loss_impl, block_size=block_size)[0]


# ------------------------------------------------------------------ SCE --


def sce_with_metrics(
    z: jax.Array, labels: None = None, *, temperature, keys: jax.Array,
    queue: jax.Array | None, coefficient: float = 0.5,
    temperature_m: float = 0.07, symmetric: bool = True,
    queue_valid: jax.Array | None = None, loss_impl: str = "gather",
    block_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Similarity Contrastive Estimation (Denize et al.), with metrics.

  Per anchor (query q of a strong view, key k of the weak view), over the
  columns c (the global batch's keys of k's view, k itself first among
  them, then the queue):
    w = normalise_L1(lambda onehot(k) + (1 - lambda) p),
    p_c = softmax_{c != k}(k . c / temperature_m), 0 on k's own column,
    L = -sum_c w_c log softmax_c(q . c / temperature).
  As eztorch's `compute_sce_loss`, the key's own column is left out of the
  sharpened distribution (masked with -1e9 there); lambda = 1 is MoCo.
  The paper's columns (other batch keys and the queue) are used; eztorch's
  default `use_keys=False` (queue only) is not offered.

  Views: view 0 is the weak view (the momentum encoder's input) and the
  others strong (the online encoder's). `symmetric=True` (eztorch's
  `sym=True`, the ImageNet config) also uses the reverse pairs, so each of
  the two large views is both; False keeps only (q_v, k_0), v >= 1.

  Args:
    z: float[batch, views >= 2, dim] online embeddings.
    labels: must be None.
    temperature: tau of the online similarities (ImageNet config: 0.1).
    keys: float[batch, views, dim] momentum embeddings.
    queue: float[K, dim] or None.
    coefficient: lambda in [0, 1] (config: 0.5).
    temperature_m: tau_m of the key similarities (config: 0.07).
    symmetric: see above.
    queue_valid: bool[K] or None.
    loss_impl: must be "gather".
    block_size: unused.

  Returns:
    (loss, metrics) as in `moco_with_metrics`.
  """
  del block_size
  check_inputs("sce", z, labels, keys, queue, temperature, loss_impl,
               queue_valid, temperature_m=temperature_m)
  if isinstance(coefficient, numbers.Real) and not 0 <= coefficient <= 1:
    raise ValueError(f"sce: coefficient (lambda) must be in [0, 1], got "
                     f"{coefficient}.")
  queue, queue_valid = queue_or_empty(queue, queue_valid, z.shape[2])
  pairs = query_key_pairs(z.shape[1], symmetric=symmetric)

  def kernel(z, keys, axis_name):
    built = pair_logits(z, keys, queue, queue_valid, temperature, pairs,
                        axis_name)
    sharp_keys = built.paired_keys / temperature_m
    key_logits = jnp.concatenate([
        jnp.einsum("bpd,npd->bpn", sharp_keys, built.column_keys,
                   precision=_HIGHEST),
        jnp.einsum("bpd,kd->bpk", sharp_keys, queue, precision=_HIGHEST)],
                                 axis=-1)
    relational = built.negative  # Every column but the key's own.
    has_other = relational.any(axis=-1, keepdims=True)
    relational_log = key_logits - masked_logsumexp(
        key_logits, relational | ~has_other)[..., None]
    sharpened = jnp.where(relational, jnp.exp(relational_log), 0.0)
    target = (coefficient * built.positive.astype(jnp.float32)
              + (1.0 - coefficient) * sharpened)
    target = jax.lax.stop_gradient(
        target / jnp.maximum(target.sum(axis=-1, keepdims=True), 1e-12))
    considered = built.positive | built.negative
    log_q = built.logits - masked_logsumexp(built.logits,
                                            considered)[..., None]
    per_anchor = -jnp.where(considered, target * log_q, 0.0).sum(axis=-1)
    return reduce_over_anchors(per_anchor, built.logits, built.positive,
                               built.negative, axis_name)

  return _over_global_batch(kernel, z, keys)


def sce(z, labels=None, *, temperature, keys, queue, coefficient=0.5,
        temperature_m=0.07, symmetric=True, queue_valid=None,
        loss_impl="gather", block_size=None) -> jax.Array:
  """SCE; see `sce_with_metrics` (same arguments).

  Args:
    z: float[batch, views, dim] online embeddings.
    labels: must be None.
    temperature: tau.
    keys: float[batch, views, dim] momentum embeddings.
    queue: float[K, dim] or None.
    coefficient: lambda.
    temperature_m: tau_m.
    symmetric: both directions (True) or strong queries on view 0's keys.
    queue_valid: bool[K] or None.
    loss_impl: must be "gather".
    block_size: unused.

  Returns:
    float32 scalar loss.
  """
  return sce_with_metrics(
      z, labels, temperature=temperature, keys=keys, queue=queue,
      coefficient=coefficient, temperature_m=temperature_m,
      symmetric=symmetric, queue_valid=queue_valid, loss_impl=loss_impl,
      block_size=block_size)[0]


# ---------------------------------------------------------------- ReLIC --


def relic_with_metrics(
    z: jax.Array, labels: None = None, *, temperature, keys: jax.Array,
    queue: jax.Array | None, alpha: float = 1.0,
    queue_valid: jax.Array | None = None, loss_impl: str = "gather",
    block_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ReLIC(v2): InfoNCE plus an invariance KL, with metrics.

  For the anchor (i, a, b) (query view a, key view b) let
    p^{ab}_i(c) = softmax_c(f(x_i^a) . g(x_c^b) / temperature)
  over the columns c (the global batch's samples' keys of view b, then the
  queue). Then, as methods.md section 9 writes it,
    L = -log p^{ab}_i(i) + alpha KL(p^{ab}_i || sg p^{ba}_i),
  the KL between the distributions of the two views' queries over the same
  columns (sample c's key of the other view, queue entry c), the gradient
  flowing only through the first. A pair (a, b) whose reverse is not a pair
  (a small crop's query, v >= 2) has the InfoNCE term only. ReLICv2 has no
  queue (None here) and no public pre-training code; methods.md leaves
  alpha, tau and the negatives' count n_e unverified, so the default
  alpha = 1 (equal weights) is a choice, not a paper value. The negatives
  are all other samples of the global batch (n_e = batch - 1).
  metrics["kl"] is the mean KL term.

  Args:
    z: float[batch, views >= 2, dim] online embeddings.
    labels: must be None.
    temperature: softmax temperature.
    keys: float[batch, views, dim] target (EMA) embeddings.
    queue: float[K, dim] or None.
    alpha: weight of the KL term (0: MoCo).
    queue_valid: bool[K] or None.
    loss_impl: must be "gather".
    block_size: unused.

  Returns:
    (loss, metrics) as in `moco_with_metrics`, plus `kl`.
  """
  del block_size
  check_inputs("relic", z, labels, keys, queue, temperature, loss_impl,
               queue_valid)
  queue, queue_valid = queue_or_empty(queue, queue_valid, z.shape[2])
  pairs = query_key_pairs(z.shape[1])
  reverse = [pairs.index((u, v)) if (u, v) in pairs else -1
             for v, u in pairs]
  has_reverse = np.array([r >= 0 for r in reverse])
  reverse = np.array([max(r, 0) for r in reverse])

  def kernel(z, keys, axis_name):
    built = pair_logits(z, keys, queue, queue_valid, temperature, pairs,
                        axis_name)
    considered = built.positive | built.negative
    log_p = built.logits - masked_logsumexp(built.logits,
                                            considered)[..., None]
    partner = jax.lax.stop_gradient(log_p[:, reverse])
    kl = jnp.where(considered, jnp.exp(log_p) * (log_p - partner),
                   0.0).sum(axis=-1)
    kl = jnp.where(has_reverse[None, :], kl, 0.0)
    per_anchor = _cross_entropy(built) + alpha * kl
    return reduce_over_anchors(
        per_anchor, built.logits, built.positive, built.negative, axis_name,
        extra={"kl": jax.lax.stop_gradient(kl).sum()})

  return _over_global_batch(kernel, z, keys)


def relic(z, labels=None, *, temperature, keys, queue, alpha=1.0,
          queue_valid=None, loss_impl="gather", block_size=None) -> jax.Array:
  """ReLIC; see `relic_with_metrics` (same arguments).

  Args:
    z: float[batch, views, dim] online embeddings.
    labels: must be None.
    temperature: softmax temperature.
    keys: float[batch, views, dim] target embeddings.
    queue: float[K, dim] or None.
    alpha: KL weight.
    queue_valid: bool[K] or None.
    loss_impl: must be "gather".
    block_size: unused.

  Returns:
    float32 scalar loss.
  """
  return relic_with_metrics(
      z, labels, temperature=temperature, keys=keys, queue=queue, alpha=alpha,
      queue_valid=queue_valid, loss_impl=loss_impl, block_size=block_size)[0]


# -------------------------------------------------------------- RényiCL --


def renyicl_with_metrics(
    z: jax.Array, labels: None = None, *, temperature, keys: jax.Array,
    queue: jax.Array | None = None, gamma: float = 2.0,
    alpha: float = 1.0 / 65536, queue_valid: jax.Array | None = None,
    loss_impl: str = "gather", block_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """RényiCL's skew-Rényi surrogate (Lee & Shin 2022), with metrics.

  With the critic f = q . c / temperature, for each key view t (0 and 1)
  the pairs whose key is of view t form P_t (every anchor's positive) and
  Q_t (every anchor's negatives: other samples' keys, and the queue) over
  the GLOBAL batch, and (official `contrastive_loss`, methods.md section 20)
    L_t = -E_P[f w1] / E_P[w1]
          + (alpha E_P[f w2] + (1 - alpha) E_Q[f w2])
            / (alpha E_P[w2] + (1 - alpha) E_Q[w2]),
  w1 = exp((gamma - 1) f), w2 = exp(gamma f), both stop-gradient, E the
  mean over all the global pairs of the set. L = sum_t L_t, the sum over
  the two key views as the official `forward` does (no 2 tau scaling).
  Defaults gamma = 2, alpha = 1/65536 as the official scripts; the official
  method has no queue (None here).

  Args:
    z: float[batch, views >= 2, dim] online (predictor) embeddings.
    labels: must be None.
    temperature: critic temperature (official: 0.5).
    keys: float[batch, views, dim] momentum embeddings.
    queue: float[K, dim] or None.
    gamma: re-weighting exponent.
    alpha: skew, in [0, 1].
    queue_valid: bool[K] or None.
    loss_impl: must be "gather".
    block_size: unused.

  Returns:
    (loss, metrics) as in `moco_with_metrics` (metrics per anchor).
  """
  del block_size
  check_inputs("renyicl", z, labels, keys, queue, temperature, loss_impl,
               queue_valid)
  if isinstance(alpha, numbers.Real) and not 0 <= alpha <= 1:
    raise ValueError(f"renyicl: alpha (the skew) must be in [0, 1], got "
                     f"{alpha}.")
  queue, queue_valid = queue_or_empty(queue, queue_valid, z.shape[2])
  pairs = query_key_pairs(z.shape[1])
  key_views = np.array([u for _, u in pairs])
  groups = sorted(set(key_views.tolist()))

  def kernel(z, keys, axis_name):
    built = pair_logits(z, keys, queue, queue_valid, temperature, pairs,
                        axis_name)
    f = built.logits
    f_sg = jax.lax.stop_gradient(f)
    considered = built.positive | built.negative
    # The weights' common scale cancels in each ratio; subtracting the
    # global maximum keeps exp() finite at small temperatures.
    shift1 = jnp.max(jnp.where(built.positive, (gamma - 1) * f_sg, -jnp.inf))
    shift2 = jnp.max(jnp.where(considered, gamma * f_sg, -jnp.inf))
    if axis_name is not None:
      shift1 = jax.lax.pmax(shift1, axis_name)
      shift2 = jax.lax.pmax(shift2, axis_name)
    w1 = jnp.where(built.positive, jnp.exp((gamma - 1) * f_sg - shift1), 0.0)
    w2 = jnp.where(considered, jnp.exp(gamma * f_sg - shift2), 0.0)
    sums = {}
    for t in groups:
      in_group = jnp.asarray(key_views == t)[None, :, None]
      pos = built.positive & in_group
      neg = built.negative & in_group
      sums[t] = {
          "f_w1": jnp.where(pos, f * w1, 0.0).sum(),
          "w1": jnp.where(pos, w1, 0.0).sum(),
          "pos_f_w2": jnp.where(pos, f * w2, 0.0).sum(),
          "pos_w2": jnp.where(pos, w2, 0.0).sum(),
          "neg_f_w2": jnp.where(neg, f * w2, 0.0).sum(),
          "neg_w2": jnp.where(neg, w2, 0.0).sum(),
          "num_pos": pos.sum().astype(jnp.float32),
          "num_neg": neg.sum().astype(jnp.float32),
      }
    if axis_name is not None:
      sums = jax.lax.psum(sums, axis_name)
    loss = 0.0
    for t in groups:
      s = sums[t]
      num_pos = jnp.maximum(s["num_pos"], 1.0)
      num_neg = jnp.maximum(s["num_neg"], 1.0)
      attract = -s["f_w1"] / s["w1"]
      numerator = (alpha * s["pos_f_w2"] / num_pos
                   + (1 - alpha) * s["neg_f_w2"] / num_neg)
      denominator = (alpha * s["pos_w2"] / num_pos
                     + (1 - alpha) * s["neg_w2"] / num_neg)
      loss = loss + attract + numerator / denominator
    # The metrics only; the loss is already global.
    _, metrics = reduce_over_anchors(jnp.zeros(f.shape[:-1]), f,
                                     built.positive, built.negative,
                                     axis_name)
    return loss, metrics

  return _over_global_batch(kernel, z, keys)


def renyicl(z, labels=None, *, temperature, keys, queue=None, gamma=2.0,
            alpha=1.0 / 65536, queue_valid=None, loss_impl="gather",
            block_size=None) -> jax.Array:
  """RényiCL; see `renyicl_with_metrics` (same arguments).

  Args:
    z: float[batch, views, dim] online embeddings.
    labels: must be None.
    temperature: critic temperature.
    keys: float[batch, views, dim] momentum embeddings.
    queue: float[K, dim] or None.
    gamma: re-weighting exponent.
    alpha: skew.
    queue_valid: bool[K] or None.
    loss_impl: must be "gather".
    block_size: unused.

  Returns:
    float32 scalar loss.
  """
  return renyicl_with_metrics(
      z, labels, temperature=temperature, keys=keys, queue=queue,
      gamma=gamma, alpha=alpha, queue_valid=queue_valid, loss_impl=loss_impl,
      block_size=block_size)[0]
