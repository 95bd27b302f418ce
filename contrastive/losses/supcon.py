"""Supervised contrastive losses (SupCon) and their unsupervised case, SimCLR.

Every view of every sample is flattened batch-major (view `v` of sample `i`
has index `i * views + v`). With `I` all `batch * views` views, `A(i) = I \\
{i}` and `P(i) = {p in A(i): y_p = y_i}`, the similarities are
`s_ij = z_i . z_j / temperature` and, per anchor `i`,

  L_out_i = -1/|P(i)| sum_{p in P(i)} log(exp(s_ip) / sum_{a in A(i)} exp(s_ia))
  L_in_i  = -log(1/|P(i)| sum_{p in P(i)} exp(s_ip) / sum_{a in A(i)} exp(s_ia))

The loss is the mean over anchors with at least one positive. Without labels
every sample is its own class, which is SimCLR's NT-Xent.

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

import functools
import numbers

import jax
import jax.numpy as jnp

from contrastive import sharding
from contrastive.losses import streaming

VARIANTS = ("out", "in")
CONTRAST_MODES = ("all", "one")


def _validate(z: jax.Array, labels: jax.Array | None, temperature,
              base_temperature, variant: str, contrast_mode: str) -> None:
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
  for name, value in (("temperature", temperature),
                      ("base_temperature", base_temperature)):
    if isinstance(value, numbers.Real) and value <= 0:
      raise ValueError(f"{name} must be > 0, got {value}.")
  if variant not in VARIANTS:
    raise ValueError(
        f"Unknown SupCon variant {variant!r}; use one of {VARIANTS} "
        "('out' is the paper's recommended L_out).")
  if contrast_mode not in CONTRAST_MODES:
    raise ValueError(
        f"Unknown contrast_mode {contrast_mode!r}; use one of "
        f"{CONTRAST_MODES}.")


def _supcon_kernel(z: jax.Array, labels: jax.Array, *,
                   axis_name: str | None, temperature, variant: str,
                   contrast_mode: str, loss_impl: str, block_size):
  """Mean loss and metrics over the global batch, from this device's anchors.

  Args:
    z: float[local_batch, views, dim], this device's rows.
    labels: int[local_batch], global class ids.
    axis_name: mesh axis the batch is sharded over, or None for one device.
    temperature: softmax temperature.
    variant: "out" or "in".
    contrast_mode: "all" or "one".
    loss_impl: "gather", "blockwise" or "ring" (see `streaming`).
    block_size: columns per block of the streamed impls (None: automatic).

  Returns:
    (mean loss over valid anchors, unscaled by the base temperature; dict of
    metrics), both already reduced over `axis_name`.
  """
  local_batch, views, dim = z.shape
  # Logits, log-sum-exps and sums in float32 whatever the embedding dtype:
  # bf16 has too few mantissa bits for a softmax over thousands of columns.
  z = z.astype(jnp.float32)
  offset = 0 if axis_name is None else (
      jax.lax.axis_index(axis_name) * local_batch)
  view_ids = (offset * views + jnp.arange(local_batch * views)).astype(
      jnp.int32)
  columns = streaming.Columns(z.reshape(local_batch * views, dim),
                              jnp.repeat(labels, views), view_ids)
  # Dividing the anchors (not the logits) by the temperature keeps it a
  # differentiable input however the logits are computed.
  if contrast_mode == "all":
    anchors = streaming.Anchors(columns.z / temperature, columns.labels,
                                view_ids)
  else:
    anchors = streaming.Anchors(z[:, 0] / temperature, labels,
                                view_ids[::views])
  stats = streaming.anchor_stats(anchors, columns, axis_name=axis_name,
                                 impl=loss_impl, block_size=block_size,
                                 need_pos_lse=variant == "in")

  valid = stats.num_pos > 0
  # The maximum only guards anchors without positives, which are masked out.
  num_pos = jnp.maximum(stats.num_pos, 1.0)
  if variant == "out":
    per_anchor = stats.lse - stats.pos_sum / num_pos
  else:
    per_anchor = stats.lse - stats.pos_lse + jnp.log(num_pos)

  # Metrics are monitoring only; no gradient should leak through them.
  pos_sum = jax.lax.stop_gradient(stats.pos_sum)
  sums = {
      "loss": jnp.where(valid, per_anchor, 0.0).sum(),
      "valid": valid.sum().astype(jnp.float32),
      "correct": jnp.where(valid, stats.best_is_pos, 0.0).sum(),
      "pos_logit": pos_sum.sum(),
      "num_pos": stats.num_pos.sum(),
      "neg_logit": (stats.logit_sum - pos_sum).sum(),
      "num_neg": (stats.num_den - stats.num_pos).sum(),
  }
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  # The maximum only matters when no anchor has a positive: the sum is then 0
  # and so is the loss (with zero gradient), not 0 / 0.
  loss = sums["loss"] / jnp.maximum(sums["valid"], 1.0)
  metrics = {
      "contrastive_acc": sums["correct"] / jnp.maximum(sums["valid"], 1.0),
      "pos_logit": sums["pos_logit"] / jnp.maximum(sums["num_pos"], 1.0),
      "neg_logit": sums["neg_logit"] / jnp.maximum(sums["num_neg"], 1.0),
  }
  return loss, metrics


def supcon_with_metrics(
    z: jax.Array, labels: jax.Array | None = None, *, temperature,
    base_temperature=None, variant: str = "out", contrast_mode: str = "all",
    loss_impl: str = "gather", block_size: int | None = None,
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
    loss_impl: how the global batch is met (same value and gradient):
      "gather" materialises each device's [anchors, global views] logits;
      "blockwise" streams them in column blocks (memory O(anchors * block +
      global views * dim)); "ring" passes embeddings between devices with
      ppermute (memory independent of the global batch). See
      `contrastive/losses/streaming.py`.
    block_size: columns per block for "blockwise" / "ring"; None or 0 picks
      one from the number of anchors.

  Returns:
    (loss, metrics): the float32 scalar mean over anchors with at least one
    positive (0 if there are none), and float32 scalars `contrastive_acc`
    (fraction of those anchors whose best-scoring other view is a positive),
    `pos_logit` and `neg_logit` (mean logit over positive / negative pairs).

  Raises:
    ValueError: on a bad shape, temperature, variant, contrast_mode or
      loss_impl (the last from `streaming.anchor_stats`).
  """
  _validate(z, labels, temperature, base_temperature, variant, contrast_mode)
  if labels is None:
    # Built on the global batch so that the ids stay unique once sharded.
    labels = jnp.arange(z.shape[0], dtype=jnp.int32)
  kernel = functools.partial(_supcon_kernel, temperature=temperature,
                             variant=variant, contrast_mode=contrast_mode,
                             loss_impl=loss_impl, block_size=block_size)
  loss, metrics = sharding.map_batch_shards(
      kernel, z, jnp.asarray(labels, jnp.int32))
  if base_temperature is not None:
    loss = loss * (temperature / base_temperature)
  return loss, metrics


def supcon(z: jax.Array, labels: jax.Array | None = None, *, temperature,
           base_temperature=None, variant: str = "out",
           contrast_mode: str = "all", loss_impl: str = "gather",
           block_size: int | None = None) -> jax.Array:
  """SupCon loss (Khosla et al. 2020); see `supcon_with_metrics`.

  Args:
    z: float[batch, views, dim] L2-normalised embeddings.
    labels: int[batch] class ids, or None (SimCLR).
    temperature: softmax temperature tau > 0.
    base_temperature: rescales the loss by `temperature / base_temperature`.
    variant: "out" or "in".
    contrast_mode: "all" or "one".
    loss_impl: "gather", "blockwise" or "ring".
    block_size: columns per block of the streamed impls.

  Returns:
    float32 scalar loss.
  """
  return supcon_with_metrics(
      z, labels, temperature=temperature, base_temperature=base_temperature,
      variant=variant, contrast_mode=contrast_mode, loss_impl=loss_impl,
      block_size=block_size)[0]


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
