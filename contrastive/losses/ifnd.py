r"""IFND: contrastive loss that drops the false negatives the trainer detects.

Incremental False Negative Detection (Chen et al.) clusters the embeddings
during training and gives every sample whose cluster assignment it accepts
that cluster's pseudo-label. The trainer supplies them as `pseudo_labels`
int32[batch]: any two samples with the same id are each other's false
negatives, and samples without an accepted pseudo-label get unique ids. The
loss is elimination InfoNCE: an image's views are each other's positives,
views of other samples with the anchor's pseudo-label (the detected false
negatives FN(i)) leave the denominator, and every other view is a negative.
With views flattened batch-major and `s_ij = z_i . z_j / temperature`,

  L_i = -log exp(s_i+) / (exp(s_i+) + sum_{k not in FN(i) u {i, i+}} exp(s_ik))

averaged over every anchor view of the global batch; with more than two
views, SupCon's L_out average over the anchor's own other views (SupCon
with only the own sample's views as positives).

This is SupCon with the pseudo-labels as labels and `positives_cap=0`: the
kernel (`infonce.py`, `_capped_positive`) then keeps only the anchor's own
views as positives, and the same-label views of other samples that the cap
drops are in neither set, i.e. eliminated. That needs every (anchor,
column) pair's mask, so it runs with `loss_impl="gather"` only.

The monitoring metrics are SupCon's over the pseudo-label masks:
`neg_logit` is over exactly the loss's negatives, while `pos_logit` and
`contrastive_acc` count the detected false negatives with the own views
(a best-scoring view of the anchor's pseudo-class is a hit).
`false_negatives_per_anchor` is the mean number of eliminated columns per
anchor view over the global batch.

References:
  Chen et al., "Incremental False Negative Detection for Contrastive
  Learning", ICLR 2022, arXiv 2106.03719 (Eq. 3, elimination).
"""

import jax
import jax.numpy as jnp

from contrastive import sharding
from contrastive.losses import supcon


def _check_inputs(z, labels, pseudo_labels, loss_impl) -> None:
  if labels is not None:
    raise ValueError(
        "ifnd is self-supervised and takes no labels (its false negatives "
        "come from the trainer's pseudo-labels); set "
        "config.loss.use_labels=False.")
  if pseudo_labels is None:
    raise ValueError(
        "ifnd needs pseudo_labels int32[batch], the batch's pseudo-label ids "
        "from the trainer's clustering (unique ids for samples without an "
        "accepted pseudo-label).")
  pseudo_labels = jnp.asarray(pseudo_labels)
  if getattr(z, "ndim", None) == 3 and pseudo_labels.shape != (z.shape[0],):
    raise ValueError(
        f"pseudo_labels must have shape [batch] = ({z.shape[0]},) to match z "
        f"of shape {z.shape}, got {pseudo_labels.shape}; pass one id per "
        "sample, not per view.")
  if not jnp.issubdtype(pseudo_labels.dtype, jnp.integer):
    raise ValueError(
        f"pseudo_labels must be integer ids, got dtype {pseudo_labels.dtype}.")
  if loss_impl != "gather":
    raise ValueError(
        "ifnd eliminates its false negatives pair by pair, which needs every "
        f"(anchor, column) pair: use loss_impl='gather' (got {loss_impl!r}).")


def _false_negatives_per_anchor(pseudo_labels: jax.Array,
                                views: int) -> jax.Array:
  """Mean over anchor views of the views of other samples sharing the
  anchor's pseudo-label, over the global batch."""

  def count(local, *, axis_name):
    everyone = local if axis_name is None else jax.lax.all_gather(
        local, axis_name, tiled=True)
    # Each sample matches itself once; the rest are other samples.
    others = ((local[:, None] == everyone[None, :]).sum()
              - local.shape[0]).astype(jnp.float32)
    samples = jnp.asarray(local.shape[0], jnp.float32)
    if axis_name is not None:
      others, samples = jax.lax.psum((others, samples), axis_name)
    # Each of a sample's views is an anchor with `views` columns per other
    # sample of its pseudo-class.
    return views * others / samples

  return sharding.map_batch_shards(count,
                                   jnp.asarray(pseudo_labels, jnp.int32))


def ifnd_with_metrics(
    z: jax.Array, labels: None = None, *, temperature,
    pseudo_labels: jax.Array, loss_impl: str = "gather",
    block_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """IFND's elimination loss and metrics.

  Args:
    z: float[batch, views, dim] L2-normalised embeddings, may be sharded on
      `batch` over the ambient mesh's `data` axis.
    labels: must be None (self-supervised).
    temperature: softmax temperature tau > 0.
    pseudo_labels: int[batch] pseudo-label ids (same id: false negatives of
      each other; unique ids for samples without an accepted pseudo-label),
      sharded like `z`.
    loss_impl: must be "gather".
    block_size: unused by "gather".

  Returns:
    (loss, metrics): the float32 scalar mean over anchor views, and
    `supcon.supcon_with_metrics`'s metrics over the pseudo-label masks plus
    `false_negatives_per_anchor`.

  Raises:
    ValueError: on labels, missing or misshapen pseudo_labels, a loss_impl
      other than "gather", or SupCon's shape and temperature errors.
  """
  _check_inputs(z, labels, pseudo_labels, loss_impl)
  loss, metrics = supcon.supcon_with_metrics(
      z, pseudo_labels, temperature=temperature, variant="out",
      contrast_mode="all", denominator_mode="all", positives_cap=0,
      loss_impl=loss_impl, block_size=block_size)
  metrics = dict(metrics)
  metrics["false_negatives_per_anchor"] = _false_negatives_per_anchor(
      pseudo_labels, z.shape[1])
  return loss, metrics


def ifnd(z: jax.Array, labels: None = None, *, temperature,
         pseudo_labels: jax.Array, loss_impl: str = "gather",
         block_size: int | None = None) -> jax.Array:
  """IFND loss (Chen et al. 2022); see `ifnd_with_metrics`."""
  return ifnd_with_metrics(z, labels, temperature=temperature,
                           pseudo_labels=pseudo_labels, loss_impl=loss_impl,
                           block_size=block_size)[0]
