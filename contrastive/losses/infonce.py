r"""One masked, weighted InfoNCE kernel that the in-batch losses share.

Views are flattened batch-major (view `v` of sample `i` is `i * views + v`)
and `s_ij = z_i . z_j / temperature`. For an anchor `i`:

  P(i)  positives: other views with `i`'s label (at most `positives_cap`
        other-sample views, see below); the augmentations of `i` always are.
  N(i)  negatives: views with another label.
  Views with `i`'s label that the cap drops are in neither set, as in the
  official SupCon TF code (`google-research/supcon/losses.py`).

The denominator of the positive `p` is, by `denominator`:

  all             sum_{n in N(i)} exp(s_in) + w * sum_{q in P(i)} exp(s_iq)
  one_positive    sum_{n in N(i)} exp(s_in) + w * exp(s_ip)
  only_negatives  sum_{n in N(i)} exp(s_in)

with `w = exp(-margin)`: a margin `eps` (in logit units) on every positive
term of the denominator, which is Barbano et al.'s epsilon (`eps = 0` is
SupCon for `all`). Writing `d_ip` for the log of that denominator and
`a_i` for a per-anchor weight of the alignment term (1 except for DCLW):

  out:  L_i = 1/|P(i)| sum_{p in P(i)} (d_ip - a_i s_ip)
  in:   L_i = -log(1/|P(i)| sum_{p in P(i)} exp(s_ip - d_ip))

and the loss is the mean of `L_i` over anchors with at least one positive
(and, for `only_negatives`, at least one negative).

Two ways to compute it, with the same value and gradient where both apply:

* From per-anchor statistics (`streaming.anchor_stats`: lse, pos_sum,
  pos_lse, neg_lse), with any `loss_impl` ("gather", "blockwise", "ring").
  Covers `all` and `only_negatives` without a positives cap.
* From the dense `[local anchors, global views]` logits, for what needs
  every pair: `one_positive` (a denominator per positive) and
  `positives_cap` (an edited mask). Only with `loss_impl="gather"`.

References:
  Khosla et al. 2020 (arXiv 2004.11362), Eq. 2-3, and the TF code's
  `contrast_mode`, `summation_location`, `denominator_mode`,
  `positives_cap`. Yeh et al. 2022 (DCL, arXiv 2110.06848).
  Barbano et al. 2023 (epsilon-SupInfoNCE, arXiv 2211.05568), Eq. 7 and 18.
"""

import dataclasses
import numbers

import jax
import jax.numpy as jnp

from contrastive.losses import streaming

SUMMATIONS = ("out", "in")
DENOMINATORS = ("all", "one_positive", "only_negatives")
CONTRAST_MODES = ("all", "one")


FALSE_NEGATIVE_MODES = ("attract", "eliminate")


@dataclasses.dataclass(frozen=True)
class FalseNegatives:
  """FNC's false-negative detector and what to do with what it finds.

  A column (a view of another sample) is a false negative of every view of
  sample k if it is among the `topk` columns most similar to sample k,
  scoring a column by its best cosine with any of k's views, and that score
  exceeds `threshold` (google-research/fnc `objective.py`). "attract" makes
  it a positive (FNC's default), "eliminate" drops it from the denominator
  (FNC's other mode; Gupta et al.'s false-negative removal).
  """
  mode: str = "attract"
  topk: int = 10
  threshold: float = 0.7

  def validate(self) -> None:
    if self.mode not in FALSE_NEGATIVE_MODES:
      raise ValueError(f"Unknown false-negative mode {self.mode!r}; use one "
                       f"of {FALSE_NEGATIVE_MODES}.")
    if self.topk < 1:
      raise ValueError(f"fn_topk must be >= 1, got {self.topk}.")


@dataclasses.dataclass(frozen=True)
class Spec:
  """Which member of the family: see the module docstring."""
  summation: str = "out"
  denominator: str = "all"
  margin: float = 0.0
  positives_cap: int = -1  # Other-sample positive views; < 0: no cap.
  contrast_mode: str = "all"  # "one": only view 0 of each sample anchors.
  false_negatives: FalseNegatives | None = None

  def validate(self, views: int) -> None:
    if self.false_negatives is not None:
      self.false_negatives.validate()
    if self.summation not in SUMMATIONS:
      raise ValueError(f"Unknown summation {self.summation!r}; use one of "
                       f"{SUMMATIONS} ('out' is SupCon's L_out).")
    if self.denominator not in DENOMINATORS:
      raise ValueError(f"Unknown denominator_mode {self.denominator!r}; use "
                       f"one of {DENOMINATORS}.")
    if self.contrast_mode not in CONTRAST_MODES:
      raise ValueError(f"Unknown contrast_mode {self.contrast_mode!r}; use "
                       f"one of {CONTRAST_MODES}.")
    if isinstance(self.margin, numbers.Real) and self.margin < 0:
      raise ValueError(f"The positive margin (epsilon) must be >= 0, got "
                       f"{self.margin}.")
    if self.positives_cap >= 0 and self.positives_cap % views:
      raise ValueError(
          f"positives_cap ({self.positives_cap}) counts views of other "
          f"samples and must be a multiple of the {views} views (as in the "
          "SupCon TF code), or -1 for no cap.")

  @property
  def needs_pairs(self) -> bool:
    """Whether only the dense per-pair computation can do it."""
    return (self.denominator == "one_positive" or self.positives_cap >= 0
            or self.false_negatives is not None)


def _safe_lse(x: jax.Array, mask: jax.Array, empty: float) -> jax.Array:
  """Row log-sum-exp over `mask`; `empty` (without gradient) where a row has
  no entry. Rows without entries get a stand-in mask, so that the zero
  cotangent of their result cannot meet an inf and become NaN."""
  has_any = mask.any(axis=1)
  safe_mask = jnp.where(has_any[:, None], mask, True)
  lse = jax.nn.logsumexp(jnp.where(safe_mask, x, -jnp.inf), axis=1)
  return jnp.where(has_any, lse, empty)


def dense_per_anchor(logits: jax.Array, positive: jax.Array,
                     negative: jax.Array, spec: Spec,
                     alignment_weight: jax.Array | None = None):
  """`L_i` and its validity from dense logits and masks.

  Args:
    logits: float32[n, m], anchors already divided by the temperature.
    positive: bool[n, m], P(i).
    negative: bool[n, m], N(i), disjoint from `positive`.
    spec: the family member.
    alignment_weight: float32[n] `a_i`, or None for ones.

  Returns:
    (float32[n] per-anchor loss, bool[n] valid).
  """
  num_pos = positive.sum(axis=1).astype(jnp.float32)
  has_negative = negative.any(axis=1)
  neg_lse = _safe_lse(logits, negative, -jnp.inf)
  if spec.denominator == "all":
    pos_lse = _safe_lse(logits, positive, -jnp.inf)
    den = jnp.logaddexp(neg_lse, pos_lse - spec.margin)[:, None]
  elif spec.denominator == "one_positive":
    den = jnp.logaddexp(neg_lse[:, None], logits - spec.margin)
  else:
    den = neg_lse[:, None]
  valid = num_pos > 0
  if spec.denominator == "only_negatives":
    valid &= has_negative
    # Keeps rows without negatives finite; they are not valid anyway.
    den = jnp.where(has_negative[:, None], den, 0.0)
  safe_num_pos = jnp.maximum(num_pos, 1.0)
  if spec.summation == "out":
    weight = 1.0 if alignment_weight is None else alignment_weight[:, None]
    terms = jnp.where(positive, den - weight * logits, 0.0)
    per_anchor = terms.sum(axis=1) / safe_num_pos
  else:
    per_anchor = jnp.log(safe_num_pos) - _safe_lse(logits - den, positive,
                                                   0.0)
  return per_anchor, valid


def stats_per_anchor(stats: streaming.Stats, spec: Spec,
                     alignment_weight: jax.Array | None = None):
  """`L_i` and its validity from per-anchor statistics (no pair masks)."""
  if spec.needs_pairs:
    raise ValueError("one_positive and positives_cap need the dense logits "
                     "(loss_impl='gather').")
  if spec.denominator == "only_negatives":
    den = stats.neg_lse
  elif spec.margin:
    den = jnp.logaddexp(stats.neg_lse, stats.pos_lse - spec.margin)
  else:
    den = stats.lse
  valid = stats.num_pos > 0
  if spec.denominator == "only_negatives":
    valid &= jnp.isfinite(den)
    den = jnp.where(valid, den, 0.0)
  num_pos = jnp.maximum(stats.num_pos, 1.0)
  if spec.summation == "out":
    weight = 1.0 if alignment_weight is None else alignment_weight
    per_anchor = den - weight * stats.pos_sum / num_pos
  else:
    per_anchor = den - stats.pos_lse + jnp.log(num_pos)
  return per_anchor, valid


def stats_needs(spec: Spec) -> streaming.Needs:
  with_margin = spec.denominator == "all" and bool(spec.margin)
  return streaming.Needs(
      pos_lse=spec.summation == "in" or with_margin,
      neg_lse=spec.denominator == "only_negatives" or with_margin)


def with_extra_columns(stats: streaming.Stats, logits: jax.Array,
                       positive: jax.Array, needs: streaming.Needs):
  """`stats` over the batch merged with extra columns known by their logits.

  Extra columns (e.g. class prototypes, ESupCon) are not views: they are
  never the anchor itself and every anchor sees all of them, so their
  float32[n, k] logits and bool[n, k] positive mask are all that is needed.
  """
  columns = streaming.block_stats_from_logits(logits, positive, needs)
  # Finalised stats hold 0 where an anchor has no positive; the merge needs
  # the empty sum's log, -inf, there (logaddexp handles it without NaNs).
  def pos_lse(part):
    return jnp.where(part.num_pos > 0, part.pos_lse, -jnp.inf)
  merged = streaming.merge_stats(stats, columns)
  return merged._replace(pos_lse=jnp.where(
      merged.num_pos > 0, jnp.logaddexp(pos_lse(stats), pos_lse(columns)),
      0.0))


def detect_false_negatives(samples_z: jax.Array, sample_ids: jax.Array,
                           columns: streaming.Columns, views: int,
                           detector: FalseNegatives) -> jax.Array:
  """bool[local samples, columns]: FNC's false negatives of each sample.

  Args:
    samples_z: float32[b, views, dim] this device's L2-normalised views.
    sample_ids: int32[b] their global sample indices.
    columns: the global contrast set (z not divided by the temperature).
    views: views per sample.
    detector: top-k and threshold.
  """
  # No gradient: the detector chooses masks, as FNC's top_k / greater do.
  samples_z = jax.lax.stop_gradient(samples_z)
  column_z = jax.lax.stop_gradient(columns.z)
  scores = jnp.einsum("bvd,md->bvm", samples_z, column_z,
                      precision=jax.lax.Precision.HIGHEST).max(axis=1)
  own = sample_ids[:, None] == (columns.ids // views)[None, :]
  scores = jnp.where(own | (columns.ids < 0)[None, :], -jnp.inf, scores)
  topk = min(detector.topk, scores.shape[1])
  threshold_in_topk = jax.lax.top_k(scores, topk)[0][:, -1:]
  return (scores >= threshold_in_topk) & (scores > detector.threshold)


def _capped_positive(anchors: streaming.Anchors, columns: streaming.Columns,
                     views: int, cap: int) -> jax.Array:
  """P(i) with at most `cap / views` other samples: the first ones in global
  batch order (what `tf.math.top_k` of the 0/1 mask keeps in the TF code)."""
  anchor_sample = anchors.ids // views
  column_sample = columns.ids // views
  same_label = anchors.labels[:, None] == columns.labels[None, :]
  other_sample = anchor_sample[:, None] != column_sample[None, :]
  candidate = same_label & other_sample
  # Each other sample counts once: at its first view.
  first_view = (columns.ids % views == 0)[None, :]
  rank = jnp.cumsum(candidate & first_view, axis=1)
  # The rank of a column's sample is the count up to its sample's view 0;
  # columns come sample-major, so the later views share their sample's rank.
  kept = candidate & (rank <= cap // views)
  augmentation = ~other_sample & (anchors.ids[:, None] != columns.ids[None, :])
  return augmentation | kept


def kernel(z: jax.Array, labels: jax.Array, *, axis_name: str | None,
           temperature, spec: Spec, loss_impl: str, block_size,
           alignment_weight: jax.Array | None = None,
           extra_cosines: jax.Array | None = None,
           contrast_z: jax.Array | None = None,
           column_valid: jax.Array | None = None,
           anchor_valid: jax.Array | None = None):
  """Mean loss and metrics over the global batch, from this device's rows.

  Args:
    z: float[local_batch, views, dim], this device's embeddings.
    labels: int[local_batch], global class ids (unique ids for SimCLR).
    axis_name: the mesh axis of the batch, or None on one device.
    temperature: softmax temperature.
    spec: the family member.
    loss_impl: "gather", "blockwise" or "ring".
    block_size: columns per block of the streamed impls (None: automatic).
    alignment_weight: float[local_batch, views] `a_i` of each view as an
      anchor, or None.
    extra_cosines: float[local_batch, views, k] similarities of each view
      to `k` extra columns whose labels are 0..k-1 (class prototypes), or
      None. They join every anchor's contrast set (statistics path only).
    contrast_z: float[local_batch, views, dim] embeddings that replace the
      views as the contrast set (UniCon's universum: column j is made from
      view j's image, so an anchor still skips its own index), or None.
    column_valid: bool[local_batch]: samples whose views are in the
      contrast set (the others are padding: in no anchor's positives or
      denominator), or None for all.
    anchor_valid: bool[local_batch]: samples whose views are anchors (the
      others add nothing to the loss or the metrics), or None for all.
    Together they give a fixed-shape batch a variable number of samples
    (ExCon's background negatives).

  Returns:
    (mean loss over valid anchors; metrics `contrastive_acc`, `pos_logit`,
    `neg_logit`), both reduced over `axis_name`.
  """
  local_batch, views, dim = z.shape
  # Logits, log-sum-exps and sums in float32 whatever the embedding dtype:
  # bf16 has too few mantissa bits for a softmax over thousands of columns.
  z = z.astype(jnp.float32)
  contrast = z if contrast_z is None else contrast_z.astype(jnp.float32)
  offset = 0 if axis_name is None else (
      jax.lax.axis_index(axis_name) * local_batch)
  view_ids = (offset * views + jnp.arange(local_batch * views)).astype(
      jnp.int32)
  column_ids = view_ids if column_valid is None else jnp.where(
      jnp.repeat(column_valid, views), view_ids, -1)
  columns = streaming.Columns(contrast.reshape(local_batch * views, dim),
                              jnp.repeat(labels, views), column_ids)
  # Dividing the anchors (not the logits) by the temperature keeps it a
  # differentiable input however the logits are computed.
  if spec.contrast_mode == "all":
    anchors = streaming.Anchors(
        z.reshape(local_batch * views, dim) / temperature, columns.labels,
        view_ids)
    weight = None if alignment_weight is None else alignment_weight.reshape(
        -1).astype(jnp.float32)
    anchor_ok = (None if anchor_valid is None
                 else jnp.repeat(anchor_valid, views))
  else:
    anchors = streaming.Anchors(z[:, 0] / temperature, labels,
                                view_ids[::views])
    weight = None if alignment_weight is None else alignment_weight[
        :, 0].astype(jnp.float32)
    anchor_ok = anchor_valid
  if extra_cosines is not None:
    extra = extra_cosines.astype(jnp.float32)
    extra = (extra.reshape(local_batch * views, -1)
             if spec.contrast_mode == "all" else extra[:, 0])
    extra_logits = extra / temperature
    extra_positive = (anchors.labels[:, None]
                      == jnp.arange(extra.shape[-1])[None, :])

  false_negatives_found = None
  if spec.needs_pairs:
    if extra_cosines is not None:
      raise ValueError("Extra columns (prototypes) work with the "
                       "'all' and 'only_negatives' denominators without a "
                       "positives cap.")
    if loss_impl != "gather":
      raise ValueError(
          f"denominator_mode={spec.denominator!r} with positives_cap="
          f"{spec.positives_cap} needs every (anchor, positive) pair: use "
          f"loss_impl='gather' (got {loss_impl!r}).")
    if axis_name is not None:
      columns = jax.tree.map(
          lambda x: jax.lax.all_gather(x, axis_name, tiled=True), columns)
    logits = jnp.matmul(anchors.z, columns.z.T,
                        precision=jax.lax.Precision.HIGHEST)
    not_self = anchors.ids[:, None] != columns.ids[None, :]
    same_label = anchors.labels[:, None] == columns.labels[None, :]
    column_ok = (columns.ids >= 0)[None, :]
    positive = same_label & not_self & column_ok
    negative = ~same_label & column_ok
    if spec.positives_cap >= 0:
      positive &= _capped_positive(anchors, columns, views,
                                   spec.positives_cap)
    if spec.false_negatives is not None:
      per_sample = detect_false_negatives(
          z, offset + jnp.arange(local_batch), columns, views,
          spec.false_negatives)
      false_negative = per_sample[anchors.ids // views - offset] & negative
      negative &= ~false_negative
      false_negatives_found = false_negative.sum().astype(jnp.float32)
      if spec.false_negatives.mode == "attract":
        positive |= false_negative
    per_anchor, valid = dense_per_anchor(logits, positive, negative, spec,
                                         weight)
    stats = jax.lax.stop_gradient(streaming.dense_stats(
        anchors, columns, streaming.Needs()))
  else:
    stats = streaming.anchor_stats(anchors, columns, axis_name=axis_name,
                                   impl=loss_impl, block_size=block_size,
                                   needs=stats_needs(spec))
    if extra_cosines is not None:
      stats = with_extra_columns(stats, extra_logits, extra_positive,
                                 stats_needs(spec))
    per_anchor, valid = stats_per_anchor(stats, spec, weight)

  # Metrics are monitoring only; no gradient should leak through them.
  pos_sum = jax.lax.stop_gradient(stats.pos_sum)
  num_pos, num_den = stats.num_pos, stats.num_den
  logit_sum, best_is_pos = stats.logit_sum, stats.best_is_pos
  if anchor_ok is not None:
    valid &= anchor_ok
    pos_sum, num_pos, num_den, logit_sum, best_is_pos = (
        jnp.where(anchor_ok, x, 0) for x in (pos_sum, num_pos, num_den,
                                            logit_sum, best_is_pos))
  sums = {
      "loss": jnp.where(valid, per_anchor, 0.0).sum(),
      "valid": valid.sum().astype(jnp.float32),
      "correct": jnp.where(num_pos > 0, best_is_pos, 0.0).sum(),
      "has_pos": (num_pos > 0).sum().astype(jnp.float32),
      "pos_logit": pos_sum.sum(),
      "num_pos": num_pos.sum(),
      "neg_logit": (logit_sum - pos_sum).sum(),
      "num_neg": (num_den - num_pos).sum(),
      "anchors": (jnp.asarray(num_pos.shape[0], jnp.float32)
                  if anchor_ok is None
                  else anchor_ok.sum().astype(jnp.float32)),
  }
  if false_negatives_found is not None:
    sums["false_negatives"] = false_negatives_found
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  # The maximum only matters when no anchor is valid: the sum is then 0 and
  # so is the loss (with zero gradient), not 0 / 0.
  loss = sums["loss"] / jnp.maximum(sums["valid"], 1.0)
  metrics = {
      "contrastive_acc": sums["correct"] / jnp.maximum(sums["has_pos"], 1.0),
      "pos_logit": sums["pos_logit"] / jnp.maximum(sums["num_pos"], 1.0),
      "neg_logit": sums["neg_logit"] / jnp.maximum(sums["num_neg"], 1.0),
  }
  if false_negatives_found is not None:
    metrics["false_negatives_per_anchor"] = (sums["false_negatives"]
                                             / sums["anchors"])
  return loss, metrics
