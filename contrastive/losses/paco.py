r"""Parametric contrastive learning: PaCo and GPaCo (Cui et al.).

A weighted SupCon L_out whose contrast set starts with C parametric class
centres: the logits of a linear classifier (owned by the trainer) on the
anchor's pooled feature. For an anchor q_i with label y_i and sample
columns c (embeddings with labels y_c; the anchor itself excluded):

  centre logits   l_ic = (class_logits_ic + log(prior_c + 1e-9)) / supt
                  (the log prior only with `class_prior`, long-tailed data)
  sample logits   s_ic = q_i . z_c / temperature
  log-denominator d_i  = log(sum_c exp(l_ic) + gamma sum_c exp(s_ic))
  weights         beta * onehot(y_i) on the centres (GPaCo: smoothed,
                  (1 - eps) on y_i and eps / (C - 1) elsewhere), alpha on
                  the same-label sample columns
  L_i = -(sum_c w_ic (l_ic - d_i) + sum_c w'_ic (s_ic - d_i))
        / (sum_c w_ic + sum_c w'_ic)

and the loss is the mean over anchors (official `PaCoLoss.forward`,
`dvlab-research/Parametric-Contrastive-Learning`, LT/losses.py and
GPaCo/LT/losses.py; methods.md section 13), times `temperature /
base_temperature` when a base temperature is given (the official default
is 1). Queue entries with label -1 (empty or unknown) are never positives
but stay in the denominator, like the official code's randomly labelled
initial queue.

PaCo (`paco`): a momentum encoder. Anchors are the online embeddings of
every view; the sample columns of the anchor of view v are the online
embeddings of view v of the global batch (gradient flows, as the official
code keeps q in `features`), the momentum keys of the other key views
(views {0, 1} but v, as in `moco.py`; for 2 views the other view, the
official (q, k) pair; `keys` may hold just views 0 and 1) and the queue.

GPaCo (`gpaco`): no momentum encoder, so no `keys`: q and k come from the
same encoder and are both anchors; the sample columns are every view of the
global batch (gradient flows) and the queue, which GPaCo keeps (K = 8192,
filled by the trainer with the stop-gradient embeddings of one view, as
the official `_dequeue_and_enqueue(k, labels)`). Label smoothing 0.1.

Unlike the official per-GPU code, the batch columns are the GLOBAL batch
(gathered inside `shard_map`), as every loss of this package does.

References:
  Cui et al., "Parametric Contrastive Learning", ICCV 2021, arXiv
  2107.12028; "Generalized Parametric Contrastive Learning", TPAMI 2023,
  arXiv 2209.12400.
"""

import numbers

import jax
import jax.numpy as jnp

from contrastive import sharding
from contrastive.losses import moco

_HIGHEST = jax.lax.Precision.HIGHEST


def _safe_lse(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Row log-sum-exp over `mask`, -inf (without NaN gradients) if empty."""
  has_any = mask.any(axis=-1)
  safe_mask = jnp.where(has_any[..., None], mask, True)
  lse = jax.nn.logsumexp(jnp.where(safe_mask, x, -jnp.inf), axis=-1)
  return jnp.where(has_any, lse, -jnp.inf)


def _check(name: str, z, labels, keys, queue, queue_labels, class_logits,
           class_prior, temperature, loss_impl, queue_valid, needs_keys,
           label_smoothing) -> None:
  moco.check_inputs(name, z, labels, keys, queue, temperature, loss_impl,
                    queue_valid, needs_keys=needs_keys, label_free=False)
  if labels is None:
    raise ValueError(
        f"{name} needs labels (int[batch] class ids); for unlabelled data "
        "use 'moco'.")
  if not needs_keys and keys is not None:
    raise ValueError(
        f"{name} takes no keys: it has no momentum encoder, its keys are the "
        "other views of z. Pass keys=None (or use 'paco').")
  size = 0 if queue is None else queue.shape[0]
  if size and queue_labels is None:
    raise ValueError(
        f"{name} needs queue_labels (int[{size}], the class of each queue "
        "entry, -1 for empty or unknown) with a non-empty queue.")
  if queue_labels is not None and queue_labels.shape != (size,):
    raise ValueError(f"{name}: queue_labels must have shape ({size},) like "
                     f"the queue's rows, got {queue_labels.shape}.")
  if class_logits is None:
    raise ValueError(
        f"{name} needs class_logits: float[batch, views, num_classes], the "
        "classifier's logits on each view's pooled feature (the parametric "
        "class centres).")
  if class_logits.shape[:2] != z.shape[:2] or class_logits.ndim != 3:
    raise ValueError(
        f"{name}: class_logits must be float[batch, views, num_classes] with "
        f"z's batch and views {z.shape[:2]}, got {class_logits.shape}.")
  num_classes = class_logits.shape[2]
  if class_prior is not None and class_prior.shape != (num_classes,):
    raise ValueError(f"{name}: class_prior must be float[{num_classes}] (the "
                     f"training class frequencies), got {class_prior.shape}.")
  if label_smoothing and num_classes < 2:
    raise ValueError(f"{name}: label smoothing needs at least 2 classes.")
  if not 0 <= label_smoothing < 1:
    raise ValueError(f"{name}: label_smoothing must be in [0, 1), got "
                     f"{label_smoothing}.")


def _per_anchor(anchors, anchor_labels, centre_logits, class_logits, columns,
                column_labels, column_valid, not_self, *, alpha, beta, gamma,
                label_smoothing):
  """PaCo's L_i and monitoring sums for anchors against sample columns.

  Args:
    anchors: float32[n, dim], already divided by the temperature.
    anchor_labels: int32[n].
    centre_logits: float32[n, C] (prior and supt applied).
    class_logits: float[n, C] the classifier's own logits (for `class_acc`:
      inference uses them without the prior).
    columns: float32[m, dim].
    column_labels: int32[m] (-1: never a positive).
    column_valid: bool[m].
    not_self: bool[n, m] False on the anchor's own column.

  Returns:
    (float32[n] loss, dict of per-device metric sums).
  """
  num_classes = centre_logits.shape[-1]
  logits = jnp.matmul(anchors, columns.T, precision=_HIGHEST)
  in_denominator = column_valid[None, :] & not_self
  positive = (in_denominator & (column_labels[None, :] >= 0)
              & (anchor_labels[:, None] == column_labels[None, :]))
  one_hot = jax.nn.one_hot(anchor_labels, num_classes, dtype=jnp.float32)
  if label_smoothing:
    one_hot = (label_smoothing / (num_classes - 1) * (1 - one_hot)
               + (1 - label_smoothing) * one_hot)
  centre_weight = beta * one_hot
  den = jax.nn.logsumexp(centre_logits, axis=-1)
  if not (isinstance(gamma, numbers.Real) and gamma == 0):
    den = jnp.logaddexp(den, jnp.log(gamma)
                        + _safe_lse(logits, in_denominator))
  weighted = ((centre_weight * (centre_logits - den[:, None])).sum(-1)
              + alpha * jnp.where(positive, logits - den[:, None],
                                  0.0).sum(-1))
  total_weight = centre_weight.sum(-1) + alpha * positive.sum(-1)
  # An anchor without any target weight (beta = 0, no positive) adds 0.
  per_anchor = jnp.where(total_weight > 0,
                         -weighted / jnp.maximum(total_weight, 1e-12), 0.0)

  sg_logits = jax.lax.stop_gradient(logits)
  has_pos = positive.any(-1)
  best = jnp.argmax(jnp.where(in_denominator, sg_logits, -jnp.inf), -1)
  correct = jnp.take_along_axis(positive, best[:, None], -1)[:, 0] & has_pos
  negative = in_denominator & ~positive
  class_correct = jnp.argmax(class_logits, -1) == anchor_labels
  sums = {
      "correct": correct.sum().astype(jnp.float32),
      "has_pos": has_pos.sum().astype(jnp.float32),
      "pos_logit": jnp.where(positive, sg_logits, 0.0).sum(),
      "num_pos": positive.sum().astype(jnp.float32),
      "neg_logit": jnp.where(negative, sg_logits, 0.0).sum(),
      "num_neg": negative.sum().astype(jnp.float32),
      "class_correct": class_correct.sum().astype(jnp.float32),
  }
  return per_anchor, sums


def _finish(per_anchor_sum, sums, anchors, axis_name, scale):
  sums = dict(sums, loss=per_anchor_sum,
              anchors=jnp.asarray(anchors, jnp.float32))
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  loss = scale * sums["loss"] / jnp.maximum(sums["anchors"], 1.0)
  metrics = {
      "contrastive_acc": sums["correct"] / jnp.maximum(sums["has_pos"], 1.0),
      "pos_logit": sums["pos_logit"] / jnp.maximum(sums["num_pos"], 1.0),
      "neg_logit": sums["neg_logit"] / jnp.maximum(sums["num_neg"], 1.0),
      "class_acc": sums["class_correct"] / jnp.maximum(sums["anchors"], 1.0),
  }
  return loss, metrics


def _centre_logits(class_logits, class_prior, class_temperature):
  logits = class_logits.astype(jnp.float32)
  if class_prior is not None:
    # The official code's log(weight + 1e-9): logit adjustment by the prior.
    logits = logits + jnp.log(jnp.asarray(class_prior, jnp.float32) + 1e-9)
  return logits / class_temperature


def _parametric(name, z, labels, keys, *, temperature, queue, queue_labels,
                class_logits, alpha, beta, gamma, class_temperature,
                class_prior, label_smoothing, base_temperature, queue_valid,
                loss_impl):
  with_keys = name == "paco"
  _check(name, z, labels, keys, queue, queue_labels, class_logits,
         class_prior, temperature, loss_impl, queue_valid, with_keys,
         label_smoothing)
  queue, queue_valid = moco.queue_or_empty(queue, queue_valid, z.shape[2])
  queue_labels = (jnp.full((queue.shape[0],), -1, jnp.int32)
                  if queue_labels is None
                  else jnp.asarray(queue_labels, jnp.int32))
  views = z.shape[1]
  pairs = moco.query_key_pairs(views) if with_keys else ()
  scale = 1.0 if base_temperature is None else (temperature
                                                / base_temperature)
  options = dict(alpha=alpha, beta=beta, gamma=gamma,
                 label_smoothing=label_smoothing)

  def kernel(z, labels, class_logits, *maybe_keys, axis_name):
    local_batch, _, dim = z.shape
    z = z.astype(jnp.float32)
    labels = labels.astype(jnp.int32)
    gather = ((lambda x: x) if axis_name is None else
              (lambda x: jax.lax.all_gather(x, axis_name, tiled=True)))
    global_z, global_labels = gather(z), gather(labels)
    global_batch = global_z.shape[0]
    offset = 0 if axis_name is None else (
        jax.lax.axis_index(axis_name) * local_batch)
    sample_ids = offset + jnp.arange(local_batch)
    centres = _centre_logits(class_logits, class_prior, class_temperature)
    total, sums = 0.0, []
    if with_keys:
      global_keys = jax.lax.stop_gradient(
          gather(maybe_keys[0].astype(jnp.float32)))
      for v in range(views):
        # The key views paired with query view v (the other large view).
        others = [u for (w, u) in pairs if w == v]
        columns = jnp.concatenate(
            [global_z[:, v]] + [global_keys[:, u] for u in others] + [queue])
        column_labels = jnp.concatenate(
            [global_labels] * (1 + len(others)) + [queue_labels])
        column_valid = jnp.concatenate(
            [jnp.ones((global_batch * (1 + len(others)),), bool),
             queue_valid])
        not_self = jnp.arange(columns.shape[0])[None, :] != sample_ids[:, None]
        per_anchor, view_sums = _per_anchor(
            z[:, v] / temperature, labels, centres[:, v], class_logits[:, v],
            columns, column_labels, column_valid, not_self, **options)
        total += per_anchor.sum()
        sums.append(view_sums)
    else:
      columns = jnp.concatenate([global_z.reshape(-1, dim), queue])
      column_labels = jnp.concatenate([jnp.repeat(global_labels, views),
                                       queue_labels])
      column_valid = jnp.concatenate(
          [jnp.ones((global_batch * views,), bool), queue_valid])
      anchor_ids = (sample_ids[:, None] * views
                    + jnp.arange(views)[None, :]).reshape(-1)
      not_self = jnp.arange(columns.shape[0])[None, :] != anchor_ids[:, None]
      per_anchor, all_sums = _per_anchor(
          z.reshape(-1, dim) / temperature, jnp.repeat(labels, views),
          centres.reshape(local_batch * views, -1),
          class_logits.reshape(local_batch * views, -1), columns,
          column_labels, column_valid, not_self, **options)
      total += per_anchor.sum()
      sums.append(all_sums)
    summed = jax.tree.map(lambda *xs: sum(xs), *sums)
    return _finish(total, summed, local_batch * views, axis_name, scale)

  inputs = (z, jnp.asarray(labels, jnp.int32), class_logits)
  if with_keys:
    inputs += (keys,)
  return sharding.map_batch_shards(kernel, *inputs)


def paco_with_metrics(
    z: jax.Array, labels: jax.Array, *, temperature, keys: jax.Array,
    queue: jax.Array | None, queue_labels: jax.Array | None,
    class_logits: jax.Array, alpha: float = 0.05, beta: float = 1.0,
    gamma: float = 1.0, class_temperature: float = 1.0,
    class_prior: jax.Array | None = None, label_smoothing: float = 0.0,
    base_temperature=None, queue_valid: jax.Array | None = None,
    loss_impl: str = "gather", block_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """PaCo loss (see the module docstring), with metrics.

  Args:
    z: float[batch, views >= 2, dim] L2-normalised online embeddings.
    labels: int[batch] class ids in [0, num_classes).
    temperature: tau of the sample logits (official `moco-t`: 0.2).
    keys: float[batch, views, dim] momentum-encoder embeddings.
    queue: float[K, dim] past keys, or None.
    queue_labels: int[K] their classes (-1: never a positive); needed with
      a non-empty queue.
    class_logits: float[batch, views, num_classes] the classifier's logits
      on each view (gradient flows to the classifier).
    alpha: weight of the same-class sample columns (Full-ImageNet: 0.05).
    beta: weight of the true class centre (1).
    gamma: weight of the sample columns in the denominator (1).
    class_temperature: `supt`, divides the centre logits (1).
    class_prior: float[num_classes] training class frequencies for the
      long-tailed log-prior adjustment, or None.
    label_smoothing: eps of the centre target (PaCo: 0).
    base_temperature: scales the loss by temperature / base_temperature;
      None is the official default (no scaling).
    queue_valid: bool[K] or None.
    loss_impl: must be "gather".
    block_size: unused.

  Returns:
    (loss, metrics): float32 mean over the global batch's anchors (every
    view), and `contrastive_acc` (anchors with a positive sample column
    whose best sample column is one), `pos_logit`, `neg_logit` (sample
    columns), `class_acc` (the classifier's top-1 on the anchors).
  """
  del block_size
  return _parametric(
      "paco", z, labels, keys, temperature=temperature, queue=queue,
      queue_labels=queue_labels, class_logits=class_logits, alpha=alpha,
      beta=beta, gamma=gamma, class_temperature=class_temperature,
      class_prior=class_prior, label_smoothing=label_smoothing,
      base_temperature=base_temperature, queue_valid=queue_valid,
      loss_impl=loss_impl)


def paco(z, labels, *, temperature, keys, queue, queue_labels, class_logits,
         alpha=0.05, beta=1.0, gamma=1.0, class_temperature=1.0,
         class_prior=None, label_smoothing=0.0, base_temperature=None,
         queue_valid=None, loss_impl="gather", block_size=None) -> jax.Array:
  """PaCo; see `paco_with_metrics` (same arguments).

  Args:
    z: float[batch, views, dim] online embeddings.
    labels: int[batch].
    temperature: tau.
    keys: float[batch, views, dim] momentum embeddings.
    queue: float[K, dim] or None.
    queue_labels: int[K] or None.
    class_logits: float[batch, views, num_classes].
    alpha: same-class sample weight.
    beta: true-centre weight.
    gamma: sample weight in the denominator.
    class_temperature: supt.
    class_prior: float[num_classes] or None.
    label_smoothing: centre target smoothing.
    base_temperature: loss scale temperature / base_temperature.
    queue_valid: bool[K] or None.
    loss_impl: must be "gather".
    block_size: unused.

  Returns:
    float32 scalar loss.
  """
  return paco_with_metrics(
      z, labels, temperature=temperature, keys=keys, queue=queue,
      queue_labels=queue_labels, class_logits=class_logits, alpha=alpha,
      beta=beta, gamma=gamma, class_temperature=class_temperature,
      class_prior=class_prior, label_smoothing=label_smoothing,
      base_temperature=base_temperature, queue_valid=queue_valid,
      loss_impl=loss_impl, block_size=block_size)[0]


def gpaco_with_metrics(
    z: jax.Array, labels: jax.Array, *, temperature,
    queue: jax.Array | None, queue_labels: jax.Array | None,
    class_logits: jax.Array, keys: None = None, alpha: float = 0.05,
    beta: float = 1.0, gamma: float = 1.0, class_temperature: float = 1.0,
    class_prior: jax.Array | None = None, label_smoothing: float = 0.1,
    base_temperature=None, queue_valid: jax.Array | None = None,
    loss_impl: str = "gather", block_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """GPaCo loss (PaCo without momentum encoder), with metrics.

  Args:
    z: float[batch, views, dim] L2-normalised embeddings of every view by
      the one encoder (all anchors, all columns).
    labels: int[batch] class ids.
    temperature: tau of the sample logits (0.2).
    queue: float[K, dim] past embeddings (stop-gradient), or None.
    queue_labels: int[K] (-1: never a positive).
    class_logits: float[batch, views, num_classes].
    keys: must be None (no momentum encoder).
    alpha, beta, gamma, class_temperature, class_prior, base_temperature,
      queue_valid: as in `paco_with_metrics`.
    label_smoothing: eps of the centre target (GPaCo: 0.1).
    loss_impl: must be "gather".
    block_size: unused.

  Returns:
    (loss, metrics) as in `paco_with_metrics`.
  """
  del block_size
  return _parametric(
      "gpaco", z, labels, keys, temperature=temperature, queue=queue,
      queue_labels=queue_labels, class_logits=class_logits, alpha=alpha,
      beta=beta, gamma=gamma, class_temperature=class_temperature,
      class_prior=class_prior, label_smoothing=label_smoothing,
      base_temperature=base_temperature, queue_valid=queue_valid,
      loss_impl=loss_impl)


def gpaco(z, labels, *, temperature, queue, queue_labels, class_logits,
          keys=None, alpha=0.05, beta=1.0, gamma=1.0, class_temperature=1.0,
          class_prior=None, label_smoothing=0.1, base_temperature=None,
          queue_valid=None, loss_impl="gather", block_size=None) -> jax.Array:
  """GPaCo; see `gpaco_with_metrics` (same arguments).

  Args:
    z: float[batch, views, dim] embeddings.
    labels: int[batch].
    temperature: tau.
    queue: float[K, dim] or None.
    queue_labels: int[K] or None.
    class_logits: float[batch, views, num_classes].
    keys: must be None.
    alpha: same-class sample weight.
    beta: true-centre weight.
    gamma: sample weight in the denominator.
    class_temperature: supt.
    class_prior: float[num_classes] or None.
    label_smoothing: centre target smoothing.
    base_temperature: loss scale temperature / base_temperature.
    queue_valid: bool[K] or None.
    loss_impl: must be "gather".
    block_size: unused.

  Returns:
    float32 scalar loss.
  """
  return gpaco_with_metrics(
      z, labels, temperature=temperature, queue=queue,
      queue_labels=queue_labels, class_logits=class_logits, keys=keys,
      alpha=alpha, beta=beta, gamma=gamma,
      class_temperature=class_temperature, class_prior=class_prior,
      label_smoothing=label_smoothing, base_temperature=base_temperature,
      queue_valid=queue_valid, loss_impl=loss_impl, block_size=block_size)[0]
