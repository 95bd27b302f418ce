r"""CMC: Contrastive Multiview Coding (Tian, Krishnan, Isola 2020).

Each image has M views that are different modalities (the L and ab channels
of Lab colour, depth, optical flow, ...), each embedded by its own encoder.
The loss receives

  z  float[batch, M, dim] L2-normalised embeddings, z[:, m] view m's (from
     encoder m), sharded on the batch.

Two-view term. For views a (anchor) and b (contrast), with the global batch
of B samples (all devices) as the contrast set,

  L(V_a, V_b) = mean_i -log [ exp(z_ia . z_ib / tau)
                              / sum_{k=1..B} exp(z_ia . z_kb / tau) ],

the positive being sample i's own view b and the negatives view b of every
other sample. CMC's objective over M views is a SUM over view pairs (not a
mean), as in the paper:

  "full_graph":  L = sum_{a < b} [L(V_a, V_b) + L(V_b, V_a)]
  "core_view":   L = sum_{b != c} [L(V_c, V_b) + L(V_b, V_c)], c = core_view

For M = 2 both are the symmetric two-view loss L(V_1, V_2) + L(V_2, V_1),
which is twice MoCo's no-queue loss with keys = z (MoCo averages its two
directions; CMC sums them). The gradient flows into both the anchors and the
gathered contrast views (there is no momentum encoder): the gather inside
`shard_map` transposes to a reduce-scatter, so each device's rows receive
their summed gradient.

Difference from the official code (HobbitLong/CMC): there the contrast views
come from a per-view memory bank of the whole dataset (K = 4096 sampled
entries, bank momentum 0.5, NCE or a softmax over the K + 1 columns), so the
positive and negatives are stored, stop-gradient features. Here the
negatives are the current global batch, with gradient: the in-batch softmax
variant of the same InfoNCE (SimCLR's cross-view term with one encoder per
view), which needs no per-sample dataset index. The official temperature is
0.07 (ImageNet) / 0.1 (STL-10); with batch negatives a larger batch plays
the role of K.

Metrics, over every (sample, ordered view pair) anchor of the global batch:
`contrastive_acc` (anchors whose highest logit is their positive),
`pos_logit` and `neg_logit` (mean logit of the positive / negative columns).

Reference:
  Tian, Krishnan, Isola, "Contrastive Multiview Coding", ECCV 2020 (arXiv
  1906.05849); code HobbitLong/CMC. /work/shared/reference/methods.md
  section 11.
"""

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from contrastive import sharding
from contrastive.losses import moco
from contrastive.losses import supcon

_HIGHEST = jax.lax.Precision.HIGHEST
_NAME = "cmc"
GRAPHS = ("full_graph", "core_view")


def view_pairs(views: int, graph: str = "full_graph", core_view: int = 0
               ) -> tuple[tuple[int, int], ...]:
  """The ordered (anchor view, contrast view) pairs of the objective.

  Args:
    views: M, views per sample (>= 2).
    graph: "full_graph" (every pair of views) or "core_view" (every view
      with the core view).
    core_view: the core view's index (used by "core_view" only).

  Returns:
    Tuple of (a, b) pairs, both directions of each unordered pair:
    full_graph (0, 1), (1, 0), (0, 2), (2, 0), ...; core_view (c, b),
    (b, c) for every b != c.
  """
  if graph == "full_graph":
    unordered = [(a, b) for a in range(views) for b in range(a + 1, views)]
  else:
    unordered = [(core_view, b) for b in range(views) if b != core_view]
  return tuple(pair for a, b in unordered for pair in ((a, b), (b, a)))


def _check(z, labels, temperature, graph, core_view, loss_impl) -> None:
  """Shape and option checks (clear messages)."""
  supcon.validate_inputs(z, None, temperature=temperature)
  if labels is not None:
    raise ValueError(
        f"{_NAME} takes no labels (each sample's views are its only "
        "positives); pass labels=None.")
  views = z.shape[1]
  if views < 2:
    raise ValueError(
        f"{_NAME} contrasts the views (modalities) of each sample and needs "
        f"at least 2 views, got z of shape {z.shape}.")
  if graph not in GRAPHS:
    raise ValueError(
        f"{_NAME}: graph must be one of {GRAPHS}, got {graph!r}.")
  if (not isinstance(core_view, numbers.Integral)
      or isinstance(core_view, bool) or not 0 <= core_view < views):
    raise ValueError(
        f"{_NAME}: core_view must be a view index in [0, {views}) for z "
        f"of shape {z.shape}, got {core_view!r}.")
  if loss_impl != "gather":
    raise ValueError(
        f"{_NAME} supports only loss_impl='gather' (each device's anchors "
        f"against the gathered views of the global batch), got "
        f"{loss_impl!r}.")


def cmc_with_metrics(
    z: jax.Array, labels: None = None, *, temperature,
    graph: str = "full_graph", core_view: int = 0, loss_impl: str = "gather",
    block_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """CMC's multiview InfoNCE (see the module docstring), with metrics.

  Args:
    z: float[batch, M >= 2, dim] L2-normalised embeddings, view m from
      encoder m; computed in float32 whatever the dtype.
    labels: must be None.
    temperature: tau (official: 0.07 ImageNet, 0.1 STL-10).
    graph: "full_graph" (sum over all view pairs) or "core_view" (sum over
      the pairs with `core_view`). The same for M = 2.
    core_view: index of the core view, in [0, M).
    loss_impl: must be "gather".
    block_size: unused (no streamed implementation).

  Returns:
    (loss, metrics): the float32 sum over the ordered view pairs (a, b) of
    L(V_a, V_b), each the mean over the global batch, and float32 scalars
    `contrastive_acc`, `pos_logit`, `neg_logit` over all (sample, pair)
    anchors.

  Raises:
    ValueError: for labels, fewer than 2 views, an unknown graph, a
      core_view out of range, temperature <= 0 or another loss_impl.
  """
  del block_size
  _check(z, labels, temperature, graph, core_view, loss_impl)
  pairs = view_pairs(z.shape[1], graph, core_view)
  anchor_views = np.array([a for a, _ in pairs])
  contrast_views = np.array([b for _, b in pairs])

  def kernel(z, axis_name):
    local_batch = z.shape[0]
    z = z.astype(jnp.float32)
    global_z = z if axis_name is None else jax.lax.all_gather(
        z, axis_name, tiled=True)
    global_batch = global_z.shape[0]
    offset = 0 if axis_name is None else (
        jax.lax.axis_index(axis_name) * local_batch)
    # Dividing the anchors (not the logits) keeps the temperature an input
    # whatever the logits feed, as `moco.pair_logits` does.
    anchors = z[:, anchor_views] / temperature             # [b, P, dim]
    columns = global_z[:, contrast_views]                  # [B, P, dim]
    logits = jnp.einsum("bpd,npd->bpn", anchors, columns,
                        precision=_HIGHEST)                # [b, P, B]
    sample_ids = offset + jnp.arange(local_batch)
    own = sample_ids[:, None] == jnp.arange(global_batch)[None, :]
    positive = jnp.broadcast_to(own[:, None], logits.shape)
    per_anchor = (jax.nn.logsumexp(logits, axis=-1)
                  - jnp.where(positive, logits, 0.0).sum(axis=-1))
    # The mean over the B * P anchors, times P: the sum over the pairs of
    # each pair's mean over the global batch.
    mean, metrics = moco.reduce_over_anchors(per_anchor, logits, positive,
                                             ~positive, axis_name)
    return len(pairs) * mean, metrics

  return sharding.map_batch_shards(kernel, z)


def cmc(z, labels=None, *, temperature, graph="full_graph", core_view=0,
        loss_impl="gather", block_size=None) -> jax.Array:
  """CMC; see `cmc_with_metrics` (same arguments).

  Args:
    z: float[batch, M, dim] embeddings, one encoder per view.
    labels: must be None.
    temperature: softmax temperature.
    graph: "full_graph" or "core_view".
    core_view: index of the core view.
    loss_impl: must be "gather".
    block_size: unused.

  Returns:
    float32 scalar loss.
  """
  return cmc_with_metrics(
      z, labels, temperature=temperature, graph=graph, core_view=core_view,
      loss_impl=loss_impl, block_size=block_size)[0]
