r"""ResCom: rebalanced Siamese contrastive mining (Zhong et al.).

A long-tailed loss for one encoder seeing two (or more) views of each image:
a Balanced Softmax classifier plus a class-balanced supervised contrastive
term whose contrast set is the batch and hard keys mined from a class-
balanced queue. With `pi_c = n_c / sum_c' n_c` the training class
frequencies, rows r = every view of every sample of the global batch
(batch-major: view v of sample i is row i * views + v), q_r their
L2-normalised embeddings, y_r their labels and the queue K[c] (Q keys of
class c, stop-gradient):

  L_cls   = mean_r CE(class_logits_r + log(pi + 1e-9), y_r)  (Balanced Softmax)
  columns of anchor r:
    (a) every other row a != r, positive iff y_a = y_r;
    (b) hard positives: the `num_hard_positives` keys of K[y_r] LEAST
        similar to q_r, all positive;
    (c) hard negatives: the `num_hard_negatives` keys of K[c], c != y_r,
        MOST similar to q_r, all negative;
  logits  l_rc = q_r . k_c / temperature + prior_weight log(pi_{y_c} + 1e-9)
  L_con(r) = -1/|P_r| sum_{p in P_r} log softmax_p(l_r)   (SupCon L_out, 0
             without positive)
  E_c     = (1 - beta^{n_c}) / (1 - beta),  w_c = mean_c'(E_c') / E_c
            (Cui et al.'s effective number; beta = 0: every w_c = 1)
  L_con   = mean_r w_{y_r} L_con(r)
  L       = L_cls + con_weight L_con

The official CIFAR-100-LT (imbalance 100) run uses temperature 0.2,
con_weight 0.5, 10 queue keys per class, 1 hard positive, 400 hard
negatives, beta = 0.999999 and batch 128 (official code
`dvlab-research/Imbalanced-Learning`, ResCom/losses.py `SiamBS_SPM` and
ResCom/rescom/builder.py).

Differences from the official code:
  - The batch columns are the GLOBAL batch (gathered inside `shard_map`, the
    gradient flowing to the gathered rows), as every loss of this package
    does, not each GPU's own batch.
  - The queue is an input (`class_queue`, float[C, Q, dim], replicated): what
    enters it and in which order (the official code enqueues the detached
    embeddings of each class's newest samples) is the trainer's business.
  - `prior_weight` adds each column's OWN class log prior (a batch row's
    label, the anchor's class for a hard positive, the key's class for a
    hard negative). The official default ("balsfx_n") is 0; its non-zero
    branch concatenates priors whose length does not match the columns, so
    this is its evident intent, not a transcription.
  - An anchor without positives (impossible with 2 views) adds 0, where the
    official code divides 0 by its 1e-9; it divides by |P_r| + 1e-9, we by
    |P_r| (a relative difference of 1e-9 / |P_r|).

Reference:
  Zhong et al., "Rebalanced Siamese Contrastive Mining for Long-Tailed
  Recognition", arXiv 2203.11506.
  Cui et al., "Class-Balanced Loss Based on Effective Number of Samples",
  CVPR 2019 (the weights w_c).
  Ren et al., "Balanced Meta-Softmax for Long-Tailed Visual Recognition",
  NeurIPS 2020 (L_cls).
"""

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from contrastive import sharding
from contrastive.losses import supcon

_HIGHEST = jax.lax.Precision.HIGHEST
_NAME = "rescom"


def class_balanced_weights(class_counts, beta) -> jax.Array:
  """Cui et al.'s class weights w_c = mean(E) / E_c (effective numbers).

  E_c = (1 - beta^n_c) / (1 - beta), the effective number of class c.

  Args:
    class_counts: float[C] training images per class (> 0).
    beta: in [0, 1); 0 gives every weight 1, beta -> 1 weights proportional
      to 1 / n_c (normalised to mean(n) / n_c).

  Returns:
    float32[C].
  """
  counts = jnp.asarray(class_counts, jnp.float32)
  if isinstance(beta, numbers.Real) and beta == 0:
    return jnp.ones_like(counts)
  # The 1 / (1 - beta) of E cancels in the ratio; 1 - beta^n as
  # -expm1(n log beta) with log beta in double precision keeps the official
  # beta = 0.999999 (1 - beta ~ 1e-6) accurate in float32.
  log_beta = (math.log(beta) if isinstance(beta, numbers.Real)
              else jnp.log(jnp.asarray(beta, jnp.float32)))
  effective = -jnp.expm1(counts * log_beta)
  return effective.mean() / effective


def _check(z, labels, class_queue, class_logits, class_counts, temperature,
           con_weight, num_hard_positives, num_hard_negatives,
           effective_num_beta, loss_impl) -> None:
  supcon.validate_inputs(z, labels, temperature=temperature)
  if labels is None:
    raise ValueError(
        f"{_NAME} needs labels (int[batch] class ids): set "
        "config.loss.use_labels=True.")
  if loss_impl != "gather":
    raise ValueError(
        f"{_NAME} supports only loss_impl='gather' (each device's anchors "
        f"against the gathered batch and the queue), got {loss_impl!r}.")
  batch, views, dim = z.shape
  if views < 2:
    raise ValueError(
        f"{_NAME} needs at least 2 views per sample (its Siamese pairs), got "
        f"z of shape {z.shape}.")
  if class_logits is None:
    raise ValueError(
        f"{_NAME} needs class_logits: float[batch, views, num_classes], the "
        "linear classifier's logits on each view's pooled feature.")
  if class_logits.ndim != 3 or class_logits.shape[:2] != (batch, views):
    raise ValueError(
        f"{_NAME}: class_logits must be float[batch, views, num_classes] with "
        f"z's batch and views {(batch, views)}, got {class_logits.shape}.")
  num_classes = class_logits.shape[2]
  if class_counts is None:
    raise ValueError(
        f"{_NAME} needs class_counts: float[{num_classes}], the number of "
        "training images of each class (its prior and class weights).")
  if np.shape(class_counts) != (num_classes,):
    raise ValueError(
        f"{_NAME}: class_counts must be float[{num_classes}] (one count per "
        f"class of class_logits), got shape {np.shape(class_counts)}.")
  if not isinstance(class_counts, jax.core.Tracer) and not (
      np.asarray(class_counts) > 0).all():
    raise ValueError(
        f"{_NAME}: every class_counts entry must be > 0 (training images per "
        f"class), got {np.asarray(class_counts)}.")
  if class_queue is None:
    raise ValueError(
        f"{_NAME} needs class_queue: float[{num_classes}, Q, {dim}], Q past "
        "embeddings of each class (stop-gradient).")
  if class_queue.ndim != 3 or class_queue.shape[0] != num_classes or (
      class_queue.shape[2] != dim):
    raise ValueError(
        f"{_NAME}: class_queue must be float[{num_classes}, Q, {dim}] (Q keys "
        "per class of class_logits, of z's dimension), got shape "
        f"{class_queue.shape}.")
  per_class = class_queue.shape[1]
  for option, value in (("num_hard_positives", num_hard_positives),
                        ("num_hard_negatives", num_hard_negatives)):
    if not isinstance(value, numbers.Integral) or value < 0:
      raise ValueError(f"{_NAME}: {option} must be an int >= 0, got "
                       f"{value!r}.")
  if num_hard_positives > per_class:
    raise ValueError(
        f"{_NAME}: num_hard_positives={num_hard_positives} exceeds the "
        f"{per_class} queue keys per class; lower num_hard_positives or raise "
        "the queue size per class.")
  if num_hard_negatives > (num_classes - 1) * per_class:
    raise ValueError(
        f"{_NAME}: num_hard_negatives={num_hard_negatives} exceeds the "
        f"{(num_classes - 1) * per_class} queue keys of the other classes "
        f"({num_classes - 1} classes x {per_class}); lower "
        "num_hard_negatives or raise the queue size per class.")
  if isinstance(effective_num_beta, numbers.Real) and not (
      0 <= effective_num_beta < 1):
    raise ValueError(f"{_NAME}: effective_num_beta must be in [0, 1), got "
                     f"{effective_num_beta}.")
  if isinstance(con_weight, numbers.Real) and con_weight < 0:
    raise ValueError(f"{_NAME}: con_weight must be >= 0, got {con_weight}.")


def rescom_with_metrics(
    z: jax.Array, labels: jax.Array | None = None, *, temperature,
    class_queue: jax.Array, class_logits: jax.Array, class_counts: jax.Array,
    con_weight: float = 0.5, num_hard_positives: int = 1,
    num_hard_negatives: int = 400, effective_num_beta: float = 0.999,
    prior_weight: float = 0.0, loss_impl: str = "gather",
    block_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ResCom loss (see the module docstring), with metrics.

  Args:
    z: float[batch, views >= 2, dim] L2-normalised embeddings, sharded on
      the batch; every view of every sample is an anchor.
    labels: int[batch] class ids in [0, C).
    temperature: tau of the contrast logits (official: 0.2).
    class_queue: float[C, Q, dim] the class-balanced queue, row c holding Q
      keys of class c (replicated; no gradient).
    class_logits: float[batch, views, C] the linear classifier's logits on
      each view (gradient flows to the classifier).
    class_counts: float[C] training images per class (> 0).
    con_weight: weight of L_con (official: 0.5).
    num_hard_positives: least-similar own-class queue keys per anchor (1).
    num_hard_negatives: most-similar other-class queue keys per anchor (400).
    effective_num_beta: beta of the class weights (official CIFAR-100-LT:
      0.999999); 0 gives unit weights.
    prior_weight: weight of each column's log class prior added to the
      contrast logits (official: 0).
    loss_impl: must be "gather".
    block_size: unused.

  Returns:
    (loss, metrics): float32 loss and float32 scalars over the global batch:
    `contrastive_acc` (anchors whose highest-logit column is a positive),
    `pos_logit`, `neg_logit` (mean contrast logit of positive / negative
    columns), `class_acc` (the classifier's top-1 on the rows, raw logits),
    `loss_cls` and `loss_con` (L_cls and the weighted L_con).
  """
  del block_size
  _check(z, labels, class_queue, class_logits, class_counts, temperature,
         con_weight, num_hard_positives, num_hard_negatives,
         effective_num_beta, loss_impl)
  num_classes, per_class, dim = class_queue.shape
  counts = jnp.asarray(class_counts, jnp.float32)
  log_prior = jnp.log(counts / counts.sum() + 1e-9)
  class_weights = class_balanced_weights(counts, effective_num_beta)
  # The queue holds past embeddings: constants of this step.
  keys = jax.lax.stop_gradient(
      jnp.asarray(class_queue, jnp.float32)).reshape(-1, dim)
  use_prior = not (isinstance(prior_weight, numbers.Real)
                   and prior_weight == 0)

  def kernel(z, labels, class_logits, axis_name):
    local_batch, views, _ = z.shape
    z = z.astype(jnp.float32)
    labels = labels.astype(jnp.int32)
    gather = ((lambda x: x) if axis_name is None else
              (lambda x: jax.lax.all_gather(x, axis_name, tiled=True)))
    global_z, global_labels = gather(z), gather(labels)
    offset = 0 if axis_name is None else (
        jax.lax.axis_index(axis_name) * local_batch)
    anchors = z.reshape(-1, dim)
    anchor_labels = jnp.repeat(labels, views)
    anchor_ids = ((offset + jnp.arange(local_batch))[:, None] * views
                  + jnp.arange(views)[None, :]).reshape(-1)
    num_anchors = anchors.shape[0]
    key_classes = jnp.repeat(jnp.arange(num_classes), per_class)
    # Per-class constants are looked up by one-hot sums: indexing the
    # replicated arrays closed over by `shard_map` is not allowed, and a
    # matmul could round them (TF32 / bf16 passes on accelerators).
    of_class = lambda values, classes: (jax.nn.one_hot(
        classes, num_classes, dtype=jnp.float32) * values).sum(-1)

    # (a) The global batch's rows, the anchor itself excluded.
    row_labels = jnp.repeat(global_labels, views)
    blocks = [jnp.matmul(anchors, global_z.reshape(-1, dim).T,
                         precision=_HIGHEST)]
    valid = [jnp.arange(row_labels.shape[0])[None, :] != anchor_ids[:, None]]
    positive = [valid[0] & (row_labels[None, :] == anchor_labels[:, None])]
    column_classes = [jnp.broadcast_to(row_labels, blocks[0].shape)]
    if num_hard_positives or num_hard_negatives:
      key_sims = jnp.matmul(anchors, keys.T, precision=_HIGHEST)
      own = key_classes[None, :] == anchor_labels[:, None]
    if num_hard_positives:
      # (b) The own class's least similar keys: top-k of -similarity.
      own_sims = jnp.take_along_axis(
          key_sims.reshape(num_anchors, num_classes, per_class),
          anchor_labels[:, None, None], axis=1)[:, 0]
      hard_pos = -jax.lax.top_k(-own_sims, num_hard_positives)[0]
      blocks.append(hard_pos)
      valid.append(jnp.ones(hard_pos.shape, bool))
      positive.append(jnp.ones(hard_pos.shape, bool))
      column_classes.append(jnp.broadcast_to(anchor_labels[:, None],
                                             hard_pos.shape))
    if num_hard_negatives:
      # (c) The other classes' most similar keys. The checks guarantee
      # enough of them, so no -inf is ever selected.
      hard_neg, index = jax.lax.top_k(
          jnp.where(own, -jnp.inf, key_sims), num_hard_negatives)
      blocks.append(hard_neg)
      valid.append(jnp.ones(hard_neg.shape, bool))
      positive.append(jnp.zeros(hard_neg.shape, bool))
      column_classes.append(index // per_class)
    logits = jnp.concatenate(blocks, axis=1) / temperature
    if use_prior:
      logits = logits + prior_weight * of_class(
          log_prior, jnp.concatenate(column_classes, axis=1))
    valid = jnp.concatenate(valid, axis=1)
    positive = jnp.concatenate(positive, axis=1)
    log_den = jax.nn.logsumexp(jnp.where(valid, logits, -jnp.inf), axis=1)
    num_pos = positive.sum(1).astype(jnp.float32)
    pos_sum = jnp.where(positive, logits - log_den[:, None], 0.0).sum(1)
    per_anchor = jnp.where(num_pos > 0, -pos_sum / jnp.maximum(num_pos, 1.0),
                           0.0)
    per_anchor = of_class(class_weights, anchor_labels) * per_anchor

    flat_logits = class_logits.reshape(num_anchors, -1).astype(jnp.float32)
    balanced = flat_logits + log_prior
    cross_entropy = (jax.nn.logsumexp(balanced, axis=1)
                     - jnp.take_along_axis(balanced, anchor_labels[:, None],
                                           axis=1)[:, 0])

    # Monitoring only: no gradient through the metrics.
    sg_logits = jax.lax.stop_gradient(logits)
    has_pos = num_pos > 0
    best = jnp.argmax(jnp.where(valid, sg_logits, -jnp.inf), axis=1)
    correct = jnp.take_along_axis(positive, best[:, None], 1)[:, 0] & has_pos
    negative = valid & ~positive
    sums = {
        "loss_cls": cross_entropy.sum(),
        "loss_con": per_anchor.sum(),
        "anchors": jnp.asarray(num_anchors, jnp.float32),
        "correct": correct.sum().astype(jnp.float32),
        "has_pos": has_pos.sum().astype(jnp.float32),
        "pos_logit": jnp.where(positive, sg_logits, 0.0).sum(),
        "num_pos": num_pos.sum(),
        "neg_logit": jnp.where(negative, sg_logits, 0.0).sum(),
        "num_neg": negative.sum().astype(jnp.float32),
        "class_correct": (jnp.argmax(flat_logits, 1) == anchor_labels).sum(
            ).astype(jnp.float32),
    }
    if axis_name is not None:
      sums = jax.lax.psum(sums, axis_name)
    anchors_total = jnp.maximum(sums["anchors"], 1.0)
    loss_cls = sums["loss_cls"] / anchors_total
    loss_con = sums["loss_con"] / anchors_total
    metrics = {
        "contrastive_acc": sums["correct"] / jnp.maximum(sums["has_pos"],
                                                         1.0),
        "pos_logit": sums["pos_logit"] / jnp.maximum(sums["num_pos"], 1.0),
        "neg_logit": sums["neg_logit"] / jnp.maximum(sums["num_neg"], 1.0),
        "class_acc": sums["class_correct"] / anchors_total,
        "loss_cls": jax.lax.stop_gradient(loss_cls),
        "loss_con": jax.lax.stop_gradient(loss_con),
    }
    return loss_cls + con_weight * loss_con, metrics

  return sharding.map_batch_shards(kernel, z, jnp.asarray(labels, jnp.int32),
                                   class_logits)


def rescom(z, labels=None, *, temperature, class_queue, class_logits,
           class_counts, con_weight=0.5, num_hard_positives=1,
           num_hard_negatives=400, effective_num_beta=0.999,
           prior_weight=0.0, loss_impl="gather",
           block_size=None) -> jax.Array:
  """ResCom; see `rescom_with_metrics` (same arguments).

  Args:
    z: float[batch, views, dim] embeddings.
    labels: int[batch].
    temperature: tau.
    class_queue: float[C, Q, dim] class-balanced queue.
    class_logits: float[batch, views, C].
    class_counts: float[C] training images per class.
    con_weight: weight of L_con.
    num_hard_positives: mined hard positives per anchor.
    num_hard_negatives: mined hard negatives per anchor.
    effective_num_beta: beta of the class weights.
    prior_weight: weight of the columns' log priors.
    loss_impl: must be "gather".
    block_size: unused.

  Returns:
    float32 scalar loss.
  """
  return rescom_with_metrics(
      z, labels, temperature=temperature, class_queue=class_queue,
      class_logits=class_logits, class_counts=class_counts,
      con_weight=con_weight, num_hard_positives=num_hard_positives,
      num_hard_negatives=num_hard_negatives,
      effective_num_beta=effective_num_beta, prior_weight=prior_weight,
      loss_impl=loss_impl, block_size=block_size)[0]
