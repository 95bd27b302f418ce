"""Per-anchor statistics of an in-batch softmax, computed three ways.

The in-batch losses of the SupCon family need, for every anchor row `i` and
contrast columns `j` with logits `s_ij = a_i . c_j` (the anchors arrive
already divided by the temperature), only a few per-anchor numbers:

  lse       log sum_{j in D(i)} exp(s_ij)        D(i): every column but i
  pos_sum   sum_{j in P(i)} s_ij                 P(i): D(i) with i's label
  pos_lse   log sum_{j in P(i)} exp(s_ij)        (0 where P(i) is empty)
  neg_lse   log sum_{j in N(i)} exp(s_ij)        N(i) = D(i) \\ P(i)
                                                 (-inf where N(i) is empty)
  num_pos   |P(i)|,  num_den |D(i)|,  logit_sum sum_{j in D(i)} s_ij,
  best_is_pos  whether the best-scoring column of D(i) is in P(i)

The first four carry gradients; the rest are counts and monitoring
(`pos_lse` and `neg_lse` cost an exp per logit, so they are computed only
when asked for, see `Needs`). Three
implementations give the same numbers (`IMPLS`):

* `gather`: all-gather the embeddings and materialise the `[n, N]` logits
  (`n` local anchors, `N` global columns); plain autodiff.
* `blockwise`: all-gather the embeddings, then stream column blocks of
  `block_size` with an online log-sum-exp. A custom VJP recomputes each block
  in the backward pass, so memory is O(n * block + N * D) instead of
  O(n * N).
* `ring`: no all-gather. Each device's columns travel around the ring of
  devices with `ppermute`; in the backward pass their gradient buffer
  travels with them and arrives back at its owner after a full turn. Memory
  is O(n * block + n * D), independent of N and of the device count.

The math (online LSE, the backward pass as softmax minus positive mask) is in
../shared/reference/scaling.md, section 2.4; Inf-CL (Wang et al. 2024,
arXiv 2410.17243) does the one-positive case on GPUs.

Ids are global view indices (`-1` marks padding); the self pair is where an
anchor id equals a column id.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

IMPLS = ("gather", "blockwise", "ring")

# Blocks are chosen so that one [anchors, block] float32 tile is about this
# many elements (512 KiB, cache-sized): the loop holds a few tiles at a time
# and each block's matmul is still large enough to run at full speed.
_TILE_ELEMENTS = 2**17
_MIN_BLOCK, _MAX_BLOCK = 128, 4096
# Hops of the ring unrolled per loop iteration, so that XLA can overlap a
# hop's ppermute with the previous hop's blocks. Two keeps a bounded number
# of chunks in flight (compiled temp at N = 32768 on 8 devices: 14 MiB with
# no unrolling, 18 MiB with 2, 37 MiB with 7) and cuts the synchronisation
# overhead that dominates small global batches.
_MAX_HOP_UNROLL = 2


class Stats(NamedTuple):
  """Per-anchor statistics; every field is float32[anchors]."""
  lse: jax.Array
  pos_sum: jax.Array
  pos_lse: jax.Array
  neg_lse: jax.Array
  num_pos: jax.Array
  num_den: jax.Array
  logit_sum: jax.Array
  best: jax.Array
  best_is_pos: jax.Array


class Needs(NamedTuple):
  """Which optional log-sum-exps to compute; the others are placeholders
  (pos_lse 0, neg_lse -inf) without gradient."""
  pos_lse: bool = False
  neg_lse: bool = False


class Anchors(NamedTuple):
  """Anchor rows, already divided by the temperature."""
  z: jax.Array       # float32[n, dim]
  labels: jax.Array  # int32[n]
  ids: jax.Array     # int32[n], global view index


class Columns(NamedTuple):
  z: jax.Array       # float32[m, dim]
  labels: jax.Array  # int32[m]
  ids: jax.Array     # int32[m], global view index or -1 for padding


def default_block_size(num_anchors: int, num_columns: int, dim: int) -> int:
  """Columns per block: a power of two in [128, 4096], at most the columns.

  The [anchors, block] logits tile is kept near `_TILE_ELEMENTS` (cache
  sized), or up to the size of the [anchors, dim] embeddings the device
  holds anyway when those are larger (large `dim`), so streamed memory stays
  a small multiple of O(anchors * dim) while each block's matmul
  (2 * anchors * block * dim FLOPs) stays large.
  """
  target = max(_TILE_ELEMENTS // max(num_anchors, 1), dim, 1)
  block = 1 << (target.bit_length() - 1)
  block = min(max(block, _MIN_BLOCK), _MAX_BLOCK)
  return min(block, 1 << max(num_columns - 1, 0).bit_length())


def _masks(anchors: Anchors, labels: jax.Array, ids: jax.Array):
  denominator = ((anchors.ids[:, None] != ids[None, :])
                 & (ids[None, :] >= 0))
  positive = denominator & (anchors.labels[:, None] == labels[None, :])
  return denominator, positive


def _logits(anchor_z: jax.Array, column_z: jax.Array) -> jax.Array:
  # Full float32 precision: an error of 1e-3 in a cosine is 1e-2 in a logit
  # at tau = 0.1, and this matmul is a negligible share of a step's FLOPs.
  return jnp.matmul(anchor_z, column_z.T, precision=jax.lax.Precision.HIGHEST)


def _masked_lse(logits: jax.Array, mask: jax.Array) -> jax.Array:
  return jax.nn.logsumexp(jnp.where(mask, logits, -jnp.inf), axis=1)


def _block_stats(anchors: Anchors, columns: Columns,
                 needs: Needs) -> Stats:
  logits = _logits(anchors.z, columns.z)
  denominator, positive = _masks(anchors, columns.labels, columns.ids)
  masked = jnp.where(denominator, logits, -jnp.inf)
  best_index = jnp.argmax(masked, axis=1)
  zeros = jnp.zeros_like(anchors.z[:, 0])
  return Stats(
      lse=jax.nn.logsumexp(masked, axis=1),
      pos_sum=jnp.where(positive, logits, 0.0).sum(axis=1),
      pos_lse=(_masked_lse(logits, positive) if needs.pos_lse
               else zeros - jnp.inf),
      neg_lse=(_masked_lse(logits, denominator & ~positive) if needs.neg_lse
               else zeros - jnp.inf),
      num_pos=positive.sum(axis=1).astype(jnp.float32),
      num_den=denominator.sum(axis=1).astype(jnp.float32),
      logit_sum=jnp.where(denominator, logits, 0.0).sum(axis=1),
      best=masked.max(axis=1),
      best_is_pos=jnp.take_along_axis(
          positive, best_index[:, None], axis=1)[:, 0].astype(jnp.float32),
  )


def merge_stats(a: Stats, b: Stats) -> Stats:
  """Stats over the union of two disjoint column sets."""
  # Strictly greater: on ties the columns seen first win, like argmax.
  b_better = b.best > a.best
  return Stats(
      lse=jnp.logaddexp(a.lse, b.lse),
      pos_sum=a.pos_sum + b.pos_sum,
      pos_lse=jnp.logaddexp(a.pos_lse, b.pos_lse),
      neg_lse=jnp.logaddexp(a.neg_lse, b.neg_lse),
      num_pos=a.num_pos + b.num_pos,
      num_den=a.num_den + b.num_den,
      logit_sum=a.logit_sum + b.logit_sum,
      best=jnp.where(b_better, b.best, a.best),
      best_is_pos=jnp.where(b_better, b.best_is_pos, a.best_is_pos),
  )


def _finalize(stats: Stats, needs: Needs) -> Stats:
  # An anchor without positives has pos_lse = -inf; 0 keeps every later
  # expression finite (its loss term is masked out by the caller). An anchor
  # without negatives keeps neg_lse = -inf: its exp, 0, is the right value.
  keep = stats.num_pos > 0 if needs.pos_lse else False
  return stats._replace(pos_lse=jnp.where(keep, stats.pos_lse, 0.0))


def _split_blocks(columns: Columns, block: int) -> Columns:
  """[m, ...] -> [m / block, block, ...], padding with ids -1."""
  m = columns.z.shape[0]
  padded = -(-m // block) * block
  if padded != m:
    pad = padded - m
    columns = Columns(
        z=jnp.pad(columns.z, ((0, pad), (0, 0))),
        labels=jnp.pad(columns.labels, (0, pad)),
        ids=jnp.pad(columns.ids, (0, pad), constant_values=-1))
  return jax.tree.map(
      lambda x: x.reshape(padded // block, block, *x.shape[1:]), columns)


def _empty_stats(anchors: Anchors) -> Stats:
  # Built from the anchors so that inside shard_map the carry varies over the
  # mesh axis like the values merged into it.
  zeros = jnp.zeros_like(anchors.z[:, 0])
  return Stats(lse=zeros - jnp.inf, pos_sum=zeros, pos_lse=zeros - jnp.inf,
               neg_lse=zeros - jnp.inf, num_pos=zeros, num_den=zeros, logit_sum=zeros,
               best=zeros - jnp.inf, best_is_pos=zeros)


def _stream(anchors: Anchors, columns: Columns, block: int,
            needs: Needs, stats: Stats | None = None) -> Stats:
  """Merges the stats of `columns`, block by block, into `stats`."""

  def body(carry, block_columns):
    return merge_stats(carry, _block_stats(anchors, block_columns,
                                      needs)), None

  if stats is None:
    stats = _empty_stats(anchors)
  stats, _ = jax.lax.scan(body, stats, _split_blocks(columns, block))
  return stats


def _logit_cotangent(anchors: Anchors, columns: Columns, stats: Stats,
                     cotangent: Stats, needs: Needs) -> jax.Array:
  """d loss / d s_ij for one block, from the cotangents of lse/pos_*."""
  logits = _logits(anchors.z, columns.z)
  denominator, positive = _masks(anchors, columns.labels, columns.ids)
  softmax = jnp.exp(jnp.where(denominator, logits - stats.lse[:, None],
                              -jnp.inf))
  d_logits = (cotangent.lse[:, None] * softmax
              + cotangent.pos_sum[:, None] * positive)
  if needs.pos_lse:
    d_logits += cotangent.pos_lse[:, None] * jnp.exp(
        jnp.where(positive, logits - stats.pos_lse[:, None], -jnp.inf))
  if needs.neg_lse:
    d_logits += cotangent.neg_lse[:, None] * jnp.exp(
        jnp.where(denominator & ~positive, logits - stats.neg_lse[:, None],
                  -jnp.inf))
  return d_logits


def _stream_backward(anchors: Anchors, columns: Columns, stats: Stats,
                     cotangent: Stats, block: int, needs: Needs,
                     d_anchor_z: jax.Array):
  """Adds this column set's share to d anchors; returns (d anchors, d cols)."""
  m = columns.z.shape[0]
  blocks = _split_blocks(columns, block)

  def body(d_anchor, block_columns):
    d_logits = _logit_cotangent(anchors, block_columns, stats, cotangent,
                                needs)
    precision = jax.lax.Precision.HIGHEST
    d_anchor = d_anchor + jnp.matmul(d_logits, block_columns.z,
                                     precision=precision)
    d_columns = jnp.matmul(d_logits.T, anchors.z, precision=precision)
    return d_anchor, d_columns

  d_anchor_z, d_column_blocks = jax.lax.scan(body, d_anchor_z, blocks)
  d_column_z = d_column_blocks.reshape(-1, columns.z.shape[1])[:m]
  return d_anchor_z, d_column_z


def _custom_stats(compute, gradient):
  """`stats(anchor_z, anchor_labels, anchor_ids, col_z, col_labels, col_ids)`.

  `compute(anchors, columns) -> Stats` runs forward; `gradient(anchors,
  columns, stats, cotangent) -> (d anchor z, d column z)` replaces autodiff,
  recomputing blocks instead of storing them. Labels and ids get no
  gradient.
  """

  @jax.custom_vjp
  def stats_fn(anchor_z, anchor_labels, anchor_ids, column_z, column_labels,
               column_ids):
    return compute(Anchors(anchor_z, anchor_labels, anchor_ids),
                   Columns(column_z, column_labels, column_ids))

  def forward(*args):
    stats = stats_fn(*args)
    return stats, (args, stats)

  def backward(residuals, cotangent):
    args, stats = residuals
    d_anchor_z, d_column_z = gradient(Anchors(*args[:3]), Columns(*args[3:]),
                                      stats, cotangent)
    return d_anchor_z, None, None, d_column_z, None, None

  stats_fn.defvjp(forward, backward)
  return stats_fn


@functools.lru_cache(maxsize=None)
def _blockwise_fn(block: int, needs: Needs):
  """Stats against columns that are all present (e.g. all-gathered)."""

  def compute(anchors, columns):
    return _finalize(_stream(anchors, columns, block, needs),
                     needs)

  def gradient(anchors, columns, stats, cotangent):
    return _stream_backward(anchors, columns, stats, cotangent, block,
                            needs, jnp.zeros_like(anchors.z))

  return _custom_stats(compute, gradient)


@functools.lru_cache(maxsize=None)
def _ring_fn(block: int, needs: Needs, axis_name: str,
             num_devices: int):
  """Like `_blockwise_fn`, with the columns this device's shard only."""
  # Device d sends to d + 1: after k hops, device d holds the columns of
  # device d - k; after num_devices hops they are home again.
  permutation = [(d, (d + 1) % num_devices) for d in range(num_devices)]
  unroll = max(min(num_devices - 1, _MAX_HOP_UNROLL), 1)

  def send(tree):
    return jax.lax.ppermute(tree, axis_name, permutation)

  def compute(anchors, columns):
    stats = _stream(anchors, columns, block, needs)

    def hop(carry, _):
      columns, stats = carry
      columns = send(columns)
      return (columns, _stream(anchors, columns, block, needs,
                               stats)), None

    (_, stats), _ = jax.lax.scan(hop, (columns, stats), None,
                                 length=num_devices - 1, unroll=unroll)
    return _finalize(stats, needs)

  def gradient(anchors, columns, stats, cotangent):
    d_anchor, d_columns = _stream_backward(
        anchors, columns, stats, cotangent, block, needs,
        jnp.zeros_like(anchors.z))

    def hop(carry, _):
      columns, d_columns, d_anchor = carry
      columns, d_columns = send((columns, d_columns))
      d_anchor, d_here = _stream_backward(
          anchors, columns, stats, cotangent, block, needs, d_anchor)
      return (columns, d_columns + d_here, d_anchor), None

    (_, d_columns, d_anchor), _ = jax.lax.scan(
        hop, (columns, d_columns, d_anchor), None, length=num_devices - 1,
        unroll=unroll)
    # One last hop brings every column gradient back to its owner.
    d_columns = send(d_columns) if num_devices > 1 else d_columns
    return d_anchor, d_columns

  return _custom_stats(compute, gradient)


def dense_stats(anchors: Anchors, columns: Columns,
                needs: Needs = Needs(pos_lse=True, neg_lse=True)) -> Stats:
  """The `gather` statistics: one [n, m] logits matrix, plain autodiff."""
  logits = _logits(anchors.z, columns.z)
  denominator, positive = _masks(anchors, columns.labels, columns.ids)
  num_pos = positive.sum(axis=1)
  has_positive = num_pos > 0
  zeros = jnp.zeros_like(anchors.z[:, 0])
  if needs.pos_lse:
    # Anchors without positives get a stand-in positive set so that the zero
    # cotangent of their (masked) term cannot become 0 * inf = NaN.
    safe_positive = jnp.where(has_positive[:, None], positive, denominator)
    pos_lse = jnp.where(has_positive, _masked_lse(logits, safe_positive), 0.0)
  else:
    pos_lse = zeros
  if needs.neg_lse:
    negative = denominator & ~positive
    has_negative = negative.any(axis=1)
    safe_negative = jnp.where(has_negative[:, None], negative, denominator)
    neg_lse = jnp.where(has_negative, _masked_lse(logits, safe_negative),
                        -jnp.inf)
  else:
    neg_lse = zeros - jnp.inf
  masked = jnp.where(denominator, logits, -jnp.inf)
  masked_ng = jax.lax.stop_gradient(masked)
  best_index = jnp.argmax(masked_ng, axis=1)
  return Stats(
      lse=jax.nn.logsumexp(masked, axis=1),
      pos_sum=jnp.where(positive, logits, 0.0).sum(axis=1),
      pos_lse=pos_lse,
      neg_lse=neg_lse,
      num_pos=num_pos.astype(jnp.float32),
      num_den=denominator.sum(axis=1).astype(jnp.float32),
      logit_sum=jnp.where(denominator, masked_ng, 0.0).sum(axis=1),
      best=masked_ng.max(axis=1),
      best_is_pos=jnp.take_along_axis(
          positive, best_index[:, None], axis=1)[:, 0].astype(jnp.float32),
  )


def block_stats_from_logits(logits: jax.Array, positive: jax.Array,
                            needs: Needs = Needs()) -> Stats:
  """Stats of columns given by their float32[n, k] logits and bool[n, k]
  positive mask, every column in every anchor's denominator (columns that
  are not views, e.g. class prototypes); plain autodiff. pos_lse is -inf
  (not 0) where an anchor has no positive, ready for `merge_stats`."""
  denominator = jnp.ones_like(positive)
  negative = ~positive
  masked_ng = jax.lax.stop_gradient(logits)
  best_index = jnp.argmax(masked_ng, axis=1)

  def lse_over(mask):
    has_any = mask.any(axis=1)
    safe = jnp.where(has_any[:, None], mask, True)
    return jnp.where(has_any, _masked_lse(logits, safe), -jnp.inf)

  zeros = jnp.zeros_like(logits[:, 0])
  return Stats(
      lse=jax.nn.logsumexp(logits, axis=1),
      pos_sum=jnp.where(positive, logits, 0.0).sum(axis=1),
      pos_lse=lse_over(positive) if needs.pos_lse else zeros - jnp.inf,
      neg_lse=lse_over(negative) if needs.neg_lse else zeros - jnp.inf,
      num_pos=positive.sum(axis=1).astype(jnp.float32),
      num_den=denominator.sum(axis=1).astype(jnp.float32),
      logit_sum=masked_ng.sum(axis=1),
      best=masked_ng.max(axis=1),
      best_is_pos=jnp.take_along_axis(
          positive, best_index[:, None], axis=1)[:, 0].astype(jnp.float32),
  )


def anchor_stats(anchors: Anchors, local_columns: Columns, *,
                 axis_name: str | None, impl: str = "gather",
                 block_size: int | None = None,
                 needs: Needs = Needs(pos_lse=True)) -> Stats:
  """Stats of this device's anchors against the global contrast set.

  Args:
    anchors: this device's anchor rows (z already divided by temperature).
    local_columns: this device's share of the contrast set; the global set is
      the concatenation over `axis_name` in device order.
    axis_name: the mesh axis the batch is sharded over (inside `shard_map`),
      or None on one device.
    impl: one of `IMPLS`.
    block_size: columns per block for `blockwise` / `ring`; None or 0 picks
      `default_block_size`.
    needs: which of `pos_lse` (L_in) and `neg_lse` (denominators without
      positives) to compute; each costs an exp per logit.

  Returns:
    `Stats` of the anchors, differentiable in `lse`, `pos_sum`, `pos_lse`,
    `neg_lse`.
  """
  if impl not in IMPLS:
    raise ValueError(f"Unknown loss_impl {impl!r}; use one of {IMPLS}.")
  if block_size is not None and block_size < 0:
    raise ValueError(f"block_size must be >= 0 (0: automatic), got "
                     f"{block_size}.")
  num_devices = 1 if axis_name is None else jax.lax.axis_size(axis_name)
  if impl == "ring" and num_devices > 1:
    block = block_size or default_block_size(*anchors.z.shape[:1],
                                             *local_columns.z.shape)
    return _ring_fn(block, needs, axis_name, num_devices)(
        *anchors, *local_columns)
  columns = local_columns
  if axis_name is not None:
    columns = jax.tree.map(
        lambda x: jax.lax.all_gather(x, axis_name, tiled=True), columns)
  if impl == "gather":
    return dense_stats(anchors, columns, needs)
  block = block_size or default_block_size(*anchors.z.shape[:1],
                                           *columns.z.shape)
  return _blockwise_fn(block, needs)(*anchors, *columns)
