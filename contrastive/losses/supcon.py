"""Supervised contrastive losses (SupCon) and their unsupervised case, SimCLR.

Every view of every sample is flattened batch-major (view `v` of sample `i`
has index `i * views + v`). With `I` all `batch * views` views, `A(i) = I \\
{i}` and `P(i) = {p in A(i): y_p = y_i}`, the similarities are
`s_ij = z_i . z_j / temperature` and, per anchor `i`,

  L_out_i = -1/|P(i)| sum_{p in P(i)} log(exp(s_ip) / sum_{a in A(i)} exp(s_ia))
  L_in_i  = -log(1/|P(i)| sum_{p in P(i)} exp(s_ip) / sum_{a in A(i)} exp(s_ia))

The loss is the mean over anchors with at least one positive. Without labels
every sample is its own class, which is SimCLR's NT-Xent. Both are members of
the masked InfoNCE family in `infonce.py`, as are the TF code's
`denominator_mode` and `positives_cap` options exposed here.

Under an ambient mesh the work is split by anchors: each device scores its own
rows against the all-gathered contrast set (`[local anchors, batch * views]`
logits), so no device holds the `(batch * views)^2` matrix.

References:
  Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020,
  https://arxiv.org/abs/2004.11362 (Eq. 2 and 3).
  Chen et al., "A Simple Framework for Contrastive Learning of Visual
  Representations", ICML 2020, https://arxiv.org/abs/2002.05709.
  PyTorch reference: https://github.com/HobbitLong/SupContrast (losses.py).
"""

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from contrastive import sharding
from contrastive.losses import infonce

VARIANTS = infonce.SUMMATIONS
CONTRAST_MODES = infonce.CONTRAST_MODES
DENOMINATOR_MODES = infonce.DENOMINATORS


def validate_inputs(z: jax.Array, labels: jax.Array | None,
                    **temperatures) -> None:
  """Shape and temperature checks shared by the in-batch losses."""
  if z.ndim != 3:
    raise ValueError(
        f"z must be float[batch, views, dim], got shape {z.shape}; reshape "
        "the embeddings of the views of each sample to [batch, views, dim].")
  if z.shape[0] * z.shape[1] < 2:
    raise ValueError(
        f"z of shape {z.shape} has {z.shape[0] * z.shape[1]} view(s); the "
        "contrast set needs at least 2 (more samples or views).")
  if labels is not None and labels.shape != (z.shape[0],):
    raise ValueError(
        f"labels must have shape [batch] = ({z.shape[0]},) to match z of "
        f"shape {z.shape}, got {labels.shape}; pass one class id per sample, "
        "not per view.")
  # Traced temperatures (e.g. a learned one) cannot be checked here.
  for name, value in temperatures.items():
    if isinstance(value, numbers.Real) and value <= 0:
      raise ValueError(f"{name} must be > 0, got {value}.")


class ExtraSamples(NamedTuple):
  """Samples that join the batch where `column_valid` / `anchor_valid`
  say, so that a fixed-shape batch holds a varying number of them."""
  z: jax.Array             # float[batch, views, dim]
  labels: jax.Array        # int[batch]
  column_valid: jax.Array  # bool[batch]: in the contrast set
  anchor_valid: jax.Array  # bool[batch]: anchors


def _spec(variant: str, contrast_mode: str, denominator_mode: str,
          positives_cap: int, margin: float = 0.0) -> infonce.Spec:
  if variant not in VARIANTS:
    raise ValueError(
        f"Unknown SupCon variant {variant!r}; use one of {VARIANTS} "
        "('out' is the paper's recommended L_out).")
  return infonce.Spec(summation=variant, denominator=denominator_mode,
                      margin=margin, positives_cap=positives_cap,
                      contrast_mode=contrast_mode)


def family_loss(z: jax.Array, labels: jax.Array | None, *, temperature,
                spec: infonce.Spec, loss_impl: str, block_size,
                alignment_weight: jax.Array | None = None,
                extra_cosines: jax.Array | None = None,
                contrast_z: jax.Array | None = None,
                extra_samples: ExtraSamples | None = None):
  """The kernel over the global batch: `(loss, metrics)`.

  `labels=None` gives every sample its own class; built on the global batch
  so that the ids stay unique once sharded. `alignment_weight`,
  `extra_cosines` and `contrast_z` (see `infonce.kernel`) are sharded like
  `z`, and so is each field of `extra_samples`, whose rows each device
  appends to its own (no resharding; the loss does not depend on the order
  of the samples).
  """
  spec.validate(z.shape[1])
  if labels is None:
    labels = jnp.arange(z.shape[0], dtype=jnp.int32)
  if extra_samples is not None and (
      alignment_weight is not None or extra_cosines is not None
      or contrast_z is not None):
    raise ValueError("extra_samples cannot be combined with "
                     "alignment_weight, extra_cosines or contrast_z.")
  optional = {name: value for name, value in (
      ("alignment_weight", alignment_weight),
      ("extra_cosines", extra_cosines), ("contrast_z", contrast_z))
              if value is not None}
  if extra_samples is not None:
    optional.update(extra_samples._asdict())
  names = tuple(optional)

  def kernel(z, labels, *values, axis_name):
    options = dict(zip(names, values))
    if extra_samples is not None:
      extra = ExtraSamples(*(options.pop(name)
                             for name in ExtraSamples._fields))
      batch = z.shape[0]
      z = jnp.concatenate([z, extra.z.astype(z.dtype)])
      labels = jnp.concatenate([labels, extra.labels.astype(labels.dtype)])
      options["column_valid"] = jnp.concatenate(
          [jnp.ones((batch,), bool), extra.column_valid])
      options["anchor_valid"] = jnp.concatenate(
          [jnp.ones((batch,), bool), extra.anchor_valid])
    return infonce.kernel(
        z, labels, axis_name=axis_name, temperature=temperature, spec=spec,
        loss_impl=loss_impl, block_size=block_size, **options)

  return sharding.map_batch_shards(kernel, z, jnp.asarray(labels, jnp.int32),
                                   *optional.values())


def supcon_with_metrics(
    z: jax.Array, labels: jax.Array | None = None, *, temperature,
    base_temperature=None, variant: str = "out", contrast_mode: str = "all",
    denominator_mode: str = "all", positives_cap: int = -1,
    loss_impl: str = "gather", block_size: int | None = None,
    extra_samples: ExtraSamples | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """SupCon loss and monitoring metrics.

  Args:
    z: float[batch, views, dim] L2-normalised embeddings (any float dtype;
      computed in float32). May be sharded on `batch` over the ambient mesh's
      `data` axis.
    labels: int[batch] class ids, or None for every sample its own class
      (SimCLR).
    temperature: softmax temperature tau > 0.
    base_temperature: the loss is multiplied by `temperature /
      base_temperature`; None (default) means no rescaling, 0.07 reproduces
      the PyTorch SupContrast reference.
    variant: "out" (L_out, Eq. 2; the paper's choice) or "in" (L_in, Eq. 3).
    contrast_mode: "all" (every view is an anchor) or "one" (only view 0 of
      each sample is; the contrast set is still every view).
    denominator_mode: which positives the denominator holds, as in the TF
      code: "all" (every positive; the paper), "one_positive" (only the
      numerator's) or "only_negatives" (none). "one_positive" needs
      loss_impl="gather".
    positives_cap: at most this many views of other samples are positives
      (the first same-class samples in global batch order; a multiple of
      the views); the dropped ones leave the denominator too. -1: no cap.
      Needs loss_impl="gather".
    loss_impl: how the global batch is met (same value and gradient):
      "gather" materialises each device's [anchors, global views] logits;
      "blockwise" streams them in column blocks (memory O(anchors * block +
      global views * dim)); "ring" passes embeddings between devices with
      ppermute (memory independent of the global batch). See
      `contrastive/losses/streaming.py`.
    block_size: columns per block for "blockwise" / "ring"; None or 0 picks
      one from the number of anchors.
    extra_samples: samples (e.g. ExCon's background images) that join the
      batch where their validity masks say, or None.

  Returns:
    (loss, metrics): the float32 scalar mean over anchors with at least one
    positive (0 if there are none), and float32 scalars `contrastive_acc`
    (fraction of those anchors whose best-scoring other view is a positive),
    `pos_logit` and `neg_logit` (mean logit over positive / negative pairs).

  Raises:
    ValueError: on a bad shape, temperature, variant, contrast_mode or
      loss_impl (the last from `streaming.anchor_stats`).
  """
  validate_inputs(z, labels, temperature=temperature,
                  base_temperature=base_temperature)
  loss, metrics = family_loss(
      z, labels, temperature=temperature,
      spec=_spec(variant, contrast_mode, denominator_mode, positives_cap),
      loss_impl=loss_impl, block_size=block_size,
      extra_samples=extra_samples)
  if base_temperature is not None:
    loss = loss * (temperature / base_temperature)
  return loss, metrics


def supcon(z: jax.Array, labels: jax.Array | None = None, *, temperature,
           base_temperature=None, variant: str = "out",
           contrast_mode: str = "all", denominator_mode: str = "all",
           positives_cap: int = -1, loss_impl: str = "gather",
           block_size: int | None = None) -> jax.Array:
  """SupCon loss (Khosla et al. 2020); see `supcon_with_metrics`.

  Args:
    z: float[batch, views, dim] L2-normalised embeddings.
    labels: int[batch] class ids, or None (SimCLR).
    temperature: softmax temperature tau > 0.
    base_temperature: rescales the loss by `temperature / base_temperature`.
    variant: "out" or "in".
    contrast_mode: "all" or "one".
    denominator_mode: "all", "one_positive" or "only_negatives".
    positives_cap: cap on other-sample positive views (-1: none).
    loss_impl: "gather", "blockwise" or "ring".
    block_size: columns per block of the streamed impls.

  Returns:
    float32 scalar loss.
  """
  return supcon_with_metrics(
      z, labels, temperature=temperature, base_temperature=base_temperature,
      variant=variant, contrast_mode=contrast_mode,
      denominator_mode=denominator_mode, positives_cap=positives_cap,
      loss_impl=loss_impl, block_size=block_size)[0]


def _check_no_labels(labels) -> None:
  if labels is not None:
    raise ValueError(
        "simclr takes no labels (each sample is its own class); use "
        "losses.get('supcon') to train with labels.")


def simclr_with_metrics(
    z: jax.Array, labels: None = None, *, temperature,
    loss_impl: str = "gather", block_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """NT-Xent over all `batch * views` anchors, with metrics.

  Args:
    z: float[batch, views, dim] L2-normalised embeddings.
    labels: must be None.
    temperature: softmax temperature tau > 0.
    loss_impl: "gather", "blockwise" or "ring" (see `supcon_with_metrics`).
    block_size: columns per block of the streamed impls.

  Returns:
    (loss, metrics) as in `supcon_with_metrics`.

  References:
    Chen et al. 2020, https://arxiv.org/abs/2002.05709, Eq. 1.
  """
  _check_no_labels(labels)
  return supcon_with_metrics(z, None, temperature=temperature,
                             loss_impl=loss_impl, block_size=block_size)


def simclr(z: jax.Array, labels: None = None, *, temperature,
           loss_impl: str = "gather",
           block_size: int | None = None) -> jax.Array:
  """NT-Xent (SimCLR): SupCon with every sample its own class.

  Args:
    z: float[batch, views, dim] L2-normalised embeddings.
    labels: must be None.
    temperature: softmax temperature tau > 0.
    loss_impl: "gather", "blockwise" or "ring".
    block_size: columns per block of the streamed impls.

  Returns:
    float32 scalar loss.
  """
  _check_no_labels(labels)
  return supcon(z, None, temperature=temperature, loss_impl=loss_impl,
                block_size=block_size)
