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
                   contrast_mode: str):
  """Mean loss and metrics over the global batch, from this device's anchors.

  Args:
    z: float[local_batch, views, dim], this device's rows.
    labels: int[local_batch], global class ids.
    axis_name: mesh axis the batch is sharded over, or None for one device.
    temperature: softmax temperature.
    variant: "out" or "in".
    contrast_mode: "all" or "one".

  Returns:
    (mean loss over valid anchors, unscaled by the base temperature; dict of
    metrics), both already reduced over `axis_name`.
  """
  local_batch, views, dim = z.shape
  # Logits, log-sum-exps and sums in float32 whatever the embedding dtype:
  # bf16 has too few mantissa bits for a softmax over thousands of columns.
  z = z.astype(jnp.float32)
  if axis_name is None:
    contrast_z, contrast_labels, offset = z, labels, 0
  else:
    contrast_z = jax.lax.all_gather(z, axis_name, tiled=True)
    contrast_labels = jax.lax.all_gather(labels, axis_name, tiled=True)
    offset = jax.lax.axis_index(axis_name) * local_batch
  num_contrast = contrast_z.shape[0] * views
  contrast_z = contrast_z.reshape(num_contrast, dim)
  contrast_labels = jnp.repeat(contrast_labels, views)

  if contrast_mode == "all":
    anchor_z = z.reshape(local_batch * views, dim)
    anchor_labels = jnp.repeat(labels, views)
    anchor_index = offset * views + jnp.arange(local_batch * views)
  else:
    anchor_z = z[:, 0]
    anchor_labels = labels
    anchor_index = (offset + jnp.arange(local_batch)) * views

  # Full float32 precision (no TF32 / one-pass bf16): an error of 1e-3 in a
  # cosine is 1e-2 in a logit at tau = 0.1, and this matmul is a negligible
  # fraction of the step's FLOPs.
  logits = jnp.matmul(anchor_z, contrast_z.T,
                      precision=jax.lax.Precision.HIGHEST) / temperature
  not_self = anchor_index[:, None] != jnp.arange(num_contrast)[None, :]
  positive = (anchor_labels[:, None] == contrast_labels[None, :]) & not_self
  num_positives = positive.sum(axis=1)
  valid = num_positives > 0
  # Anchors without positives are dropped from the mean below; giving them a
  # stand-in (non-empty) positive set keeps their terms finite, so their
  # zero cotangent cannot turn into 0 * inf = NaN in the backward pass.
  safe_positive = jnp.where(valid[:, None], positive, not_self)
  safe_num_positives = jnp.maximum(num_positives, 1).astype(jnp.float32)

  log_denominator = jax.nn.logsumexp(
      jnp.where(not_self, logits, -jnp.inf), axis=1)
  if variant == "out":
    mean_positive_logit = jnp.where(safe_positive, logits, 0.0).sum(
        axis=1) / safe_num_positives
    per_anchor = log_denominator - mean_positive_logit
  else:
    log_mean_positive = jax.nn.logsumexp(
        jnp.where(safe_positive, logits, -jnp.inf),
        axis=1) - jnp.log(safe_num_positives)
    per_anchor = log_denominator - log_mean_positive

  # Metrics are monitoring only; no gradient should leak through them.
  logits_ng = jax.lax.stop_gradient(logits)
  top = jnp.argmax(jnp.where(not_self, logits_ng, -jnp.inf), axis=1)
  top_is_positive = jnp.take_along_axis(positive, top[:, None], axis=1)[:, 0]
  negative = not_self & ~positive
  sums = {
      "loss": jnp.where(valid, per_anchor, 0.0).sum(),
      "valid": valid.sum().astype(jnp.float32),
      "correct": (top_is_positive & valid).sum().astype(jnp.float32),
      "pos_logit": jnp.where(positive, logits_ng, 0.0).sum(),
      "num_pos": num_positives.sum().astype(jnp.float32),
      "neg_logit": jnp.where(negative, logits_ng, 0.0).sum(),
      "num_neg": negative.sum().astype(jnp.float32),
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

  Returns:
    (loss, metrics): the float32 scalar mean over anchors with at least one
    positive (0 if there are none), and float32 scalars `contrastive_acc`
    (fraction of those anchors whose best-scoring other view is a positive),
    `pos_logit` and `neg_logit` (mean logit over positive / negative pairs).

  Raises:
    ValueError: on a bad shape, temperature, variant or contrast_mode.
  """
  _validate(z, labels, temperature, base_temperature, variant, contrast_mode)
  if labels is None:
    # Built on the global batch so that the ids stay unique once sharded.
    labels = jnp.arange(z.shape[0], dtype=jnp.int32)
  kernel = functools.partial(_supcon_kernel, temperature=temperature,
                             variant=variant, contrast_mode=contrast_mode)
  loss, metrics = sharding.map_batch_shards(
      kernel, z, jnp.asarray(labels, jnp.int32))
  if base_temperature is not None:
    loss = loss * (temperature / base_temperature)
  return loss, metrics


def supcon(z: jax.Array, labels: jax.Array | None = None, *, temperature,
           base_temperature=None, variant: str = "out",
           contrast_mode: str = "all") -> jax.Array:
  """SupCon loss (Khosla et al. 2020); see `supcon_with_metrics`.

  Args:
    z: float[batch, views, dim] L2-normalised embeddings.
    labels: int[batch] class ids, or None (SimCLR).
    temperature: softmax temperature tau > 0.
    base_temperature: rescales the loss by `temperature / base_temperature`.
    variant: "out" or "in".
    contrast_mode: "all" or "one".

  Returns:
    float32 scalar loss.
  """
  return supcon_with_metrics(
      z, labels, temperature=temperature, base_temperature=base_temperature,
      variant=variant, contrast_mode=contrast_mode)[0]


def _check_no_labels(labels) -> None:
  if labels is not None:
    raise ValueError(
        "simclr takes no labels (each sample is its own class); use "
        "losses.get('supcon') to train with labels.")


def simclr_with_metrics(
    z: jax.Array, labels: None = None, *, temperature,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """NT-Xent over all `batch * views` anchors, with metrics.

  Args:
    z: float[batch, views, dim] L2-normalised embeddings.
    labels: must be None.
    temperature: softmax temperature tau > 0.

  Returns:
    (loss, metrics) as in `supcon_with_metrics`.

  References:
    Chen et al. 2020, https://arxiv.org/abs/2002.05709, Eq. 1.
  """
  _check_no_labels(labels)
  return supcon_with_metrics(z, None, temperature=temperature)


def simclr(z: jax.Array, labels: None = None, *,
           temperature) -> jax.Array:
  """NT-Xent (SimCLR): SupCon with every sample its own class.

  Args:
    z: float[batch, views, dim] L2-normalised embeddings.
    labels: must be None.
    temperature: softmax temperature tau > 0.

  Returns:
    float32 scalar loss.
  """
  _check_no_labels(labels)
  return supcon(z, None, temperature=temperature)
