r"""OpenCon: open-world contrastive learning (Sun & Li, TMLR 2023).

A batch mixes labelled images of the seen classes and unlabelled images of
seen and novel classes; `open_labels` int[batch] holds the class of each
labelled image and -1 for each unlabelled one (the loss never sees the
true class of an unlabelled image). K prototypes mu_k (K = seen + novel
classes, the first `num_seen` the seen classes; L2-normalised, replicated,
stop-gradient) are kept by the trainer with `update_prototypes` (an EMA,
never a gradient).

With z_iv the embedding of view v of sample i of the GLOBAL batch, Lb the
labelled and U the unlabelled samples, S = num_seen:

  c_ik   = z_i0 . mu_k                       (view 0, as the official code)
  b_ik   = (c_ik - mean_k c_ik) / std_k c_ik (std with ddof 1, torch's)
  yhat_i = argmax_k b_ik (= argmax_k c_ik)   pseudo-label
  s_i    = max_{k < S} b_ik                  ID score
  t      = percentile_{i in Lb}(s_i, 100 - id_thresh)   (numpy 'linear')
  N      = {i in U : s_i < t}                the images flagged novel

  For a set T of samples with classes y and temperature tau, with anchors
  every view (i, v) of i in T, contrast set A(i, v) = the other views of T
  and positives P(i, v) = those of A(i, v) with y_j = y_i:

  L_T = 1 / (V |T|) sum_{(i,v)} -1/|P| sum_{p in P} log(
          exp(z_iv . z_p / tau) / sum_{a in A} exp(z_iv . z_a / tau))

  L_simclr = L_U  (y = sample id, tau_simclr; the UNLABELLED images only,
                  anchors and contrast set: the official "zu" masks)
  L_supcon = L_Lb (y = open_labels, tau_supcon)
  L_proto  = L_N  (y = yhat, tau_semicon)
  pbar     = mean_{i in U} softmax(10 c_i)
  q_k      ∝ 1 - labeled_ratio (k < S), 1 (k >= S)
  H        = -sum_k max(pbar_k, 1e-5) log(max(pbar_k, 1e-5) / q_k)
  L = w_simclr L_simclr + w_supcon L_supcon + w_semicon L_proto - w_ent H

(`models/OpenSupCon.py`, `forward_cifar`, `opensupcon_loss`,
`indexing_mask_factory` with the default mask policy "zuzuzoodzood",
`cl_loss`, `entropy`). Every positive set is non-empty (the other views of
the anchor are positives), so the official `cl_loss`'s max shift cancels.
Defaults (`main_cifar.py`, CIFAR-100, 50 seen classes, 50% of their
images labelled, batch 512): tau_simclr 0.4, tau_supcon 0.1, tau_semicon
0.7; w_simclr 1, w_supcon 0.2, w_semicon 0.1 (the official trainer ramps
it linearly from 0 over the first 100 epochs; pass a traced value to do
the same), w_ent 0.05; id_thresh 70 (so the cut is the 30th percentile of
the labelled images' scores: 70% of them count as in-distribution);
prototype momentum 0.9.

`temperature` (the framework's required argument) is tau_simclr unless
`simclr_temperature` is given.

Prototype update (`update_prototypes`, official `update_prototype_lazy`):
every labelled image and every unlabelled image whose pseudo-label is a
NOVEL prototype (yhat >= S; those assigned to a seen prototype do not
update) moves its prototype, one image at a time,
mu_y <- normalise(m mu_y + (1 - m) z_i0), with the pseudo-labels of the
prototypes before the update.

Differences from the official code:
  - Global batch: every set, percentile, count and mean is over the
    global batch (gathered inside `shard_map`), identical on 1 and N
    devices; the official code is single-GPU.
  - Prototype EMA order: the images update their prototypes in global
    batch order (deterministic, sharding-independent); the official code
    draws a random permutation each step. (The batch order of a shuffled
    loader is random already.)
  - Normalisation: x / ||x||; the official normaliser returns
    x / ||x|| + 1e-10 (the 1e-10 added to every component). The official
    `cl_loss`'s epsilons (1e-10 on |P|, 1e-15 in the log) are dropped.
  - Empty sets give 0 instead of NaN: no labelled image (the official
    `labeled_len == 0` branch cannot run: `balanced_dist` is undefined
    there) gives L_supcon = 0 and no image flagged novel; no unlabelled
    image gives L_simclr = 0 and H = 0; no novel image gives L_proto = 0.
  - Views: V >= 2 views are allowed (the official code has 2); the
    prototype scores, pseudo-labels and updates use view 0.
  - Only the sets' anchors are rows of the loss (loss_impl="gather": each
    device scores its local anchors against all gathered views).

Metrics: `loss_simclr`, `loss_supcon`, `loss_proto`, `entropy` (H, the
official `ent_loss`, a negative KL), `novel_fraction` (|N| / |U|, 0 without
unlabelled images) and, from the SimCLR part (anchors in U, contrast set
the views of U), `contrastive_acc`, `pos_logit` and `neg_logit`.

Reference:
  Sun & Li, "OpenCon: Open-world Contrastive Learning", TMLR 2023, arXiv
  2208.02764; code deeplearning-wisc/opencon.
"""

import numbers

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from contrastive import sharding
from contrastive.losses import supcon

_HIGHEST = jax.lax.Precision.HIGHEST

# The official entropy's clamp and the scale of its prototype logits.
_ENTROPY_EPS = 1e-5


def _check(z, labels, open_labels, prototypes, num_seen, loss_impl,
           temperatures, id_thresh, labeled_ratio) -> None:
  supcon.validate_inputs(z, None, **temperatures)
  if labels is not None:
    raise ValueError(
        "opencon takes no labels: it must never see the classes of the "
        "unlabelled images. Pass labels=None and open_labels (int[batch], "
        "the class of each labelled image, -1 for unlabelled ones).")
  if loss_impl != "gather":
    raise ValueError(
        "opencon supports only loss_impl='gather' (each device's anchors "
        f"against the gathered global batch), got {loss_impl!r}.")
  batch, views, dim = z.shape
  if views < 2:
    raise ValueError(
        f"opencon needs at least 2 views per sample, got z of shape "
        f"{z.shape}: every anchor's positive is another view of its image.")
  if open_labels is None:
    raise ValueError(
        "opencon needs open_labels: int[batch], the class in [0, num_seen) "
        "of each labelled image and -1 for each unlabelled one.")
  if open_labels.shape != (batch,):
    raise ValueError(
        f"opencon: open_labels must have shape ({batch},) like z's batch, "
        f"got {open_labels.shape}.")
  if prototypes is None:
    raise ValueError(
        "opencon needs prototypes: float[K, dim] L2-normalised class "
        "prototypes (seen then novel), kept by `opencon.update_prototypes`.")
  _check_prototypes(prototypes, dim, num_seen)
  if not 0 <= id_thresh <= 100:
    raise ValueError(f"opencon: id_thresh must be in [0, 100], got "
                     f"{id_thresh}.")
  if isinstance(labeled_ratio, numbers.Real) and not 0 <= labeled_ratio < 1:
    raise ValueError(f"opencon: labeled_ratio must be in [0, 1), got "
                     f"{labeled_ratio}.")


def _check_prototypes(prototypes, dim, num_seen) -> None:
  if prototypes.ndim != 2 or prototypes.shape[1] != dim:
    raise ValueError(
        f"opencon: prototypes must be float[K, {dim}] (K = seen + novel "
        f"classes, z's dim), got {prototypes.shape}.")
  num_prototypes = prototypes.shape[0]
  if not 1 <= num_seen < num_prototypes:
    raise ValueError(
        f"opencon: num_seen must be in [1, K) = [1, {num_prototypes}) (the "
        f"first num_seen of the K prototypes are the seen classes, the rest "
        f"novel), got {num_seen}.")


def _masked_percentile(x, mask, q):
  """numpy's percentile ('linear') of x[mask]; -inf when mask is empty."""
  n = mask.sum()
  last = jnp.maximum(n - 1, 0)
  ordered = jnp.sort(jnp.where(mask, x, jnp.inf))
  position = last.astype(jnp.float32) * (q / 100.0)
  lo = jnp.clip(jnp.floor(position).astype(jnp.int32), 0, last)
  hi = jnp.minimum(lo + 1, last)
  frac = position - lo.astype(jnp.float32)
  value = ordered[lo] + frac * (ordered[hi] - ordered[lo])
  return jnp.where(n > 0, value, -jnp.inf)


def _assignments(z0, prototypes, num_seen):
  """(pseudo-labels, ID scores) of view-0 embeddings: int32[n], float32[n]."""
  c = jnp.matmul(z0, prototypes.T, precision=_HIGHEST)
  mean = c.mean(-1, keepdims=True)
  std = c.std(-1, ddof=1, keepdims=True)
  balanced = (c - mean) / std
  return (jnp.argmax(balanced, -1).astype(jnp.int32),
          balanced[:, :num_seen].max(-1))


def _masked_lse(x, mask):
  """Row log-sum-exp over `mask`; 0 (with zero gradient) on empty rows."""
  has_any = mask.any(-1)
  safe = jnp.where(has_any[:, None], mask, True)
  lse = jax.nn.logsumexp(jnp.where(safe, x, -jnp.inf), axis=-1)
  return jnp.where(has_any, lse, 0.0)


def _set_loss(cos, tau, anchor_in, column_in, anchor_class, column_class,
              not_self):
  """Sum over the anchors in the set of SupCon L_out restricted to the set.

  Returns (sum of per-anchor losses, number of anchors, logits, positive
  mask, denominator mask, active anchors).
  """
  logits = cos / tau
  in_den = anchor_in[:, None] & column_in[None, :] & not_self
  positive = in_den & (anchor_class[:, None] == column_class[None, :])
  num_pos = positive.sum(-1)
  active = anchor_in & (num_pos > 0)
  lse = _masked_lse(logits, in_den)
  per_anchor = -(jnp.where(positive, logits, 0.0).sum(-1)
                 - num_pos * lse) / jnp.maximum(num_pos, 1)
  total = jnp.where(active, per_anchor, 0.0).sum()
  return (total, active.sum().astype(jnp.float32), logits, positive, in_den,
          active)


def _entropy_target(num_prototypes, num_seen, labeled_ratio):
  seen = jnp.arange(num_prototypes) < num_seen
  q = jnp.where(seen, 1.0 - labeled_ratio, 1.0).astype(jnp.float32)
  return q / q.sum()


def opencon_with_metrics(
    z: jax.Array, labels: None = None, *, temperature,
    open_labels: jax.Array, prototypes: jax.Array, num_seen: int,
    simclr_temperature=None, supcon_temperature=0.1,
    semicon_temperature=0.7, w_simclr=1.0, w_supcon=0.2, w_semicon=0.1,
    w_ent=0.05, id_thresh: float = 70.0, labeled_ratio=0.5,
    prototype_scale: float = 10.0, loss_impl: str = "gather",
    block_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """OpenCon loss (see the module docstring), with metrics.

  Args:
    z: float[batch, views >= 2, dim] L2-normalised embeddings, may be
      sharded on `batch` over the ambient mesh's `data` axis.
    labels: must be None (pass `open_labels`).
    temperature: tau_simclr unless `simclr_temperature` is given (0.4).
    open_labels: int[batch] class in [0, num_seen) of each labelled image,
      -1 for each unlabelled one; sharded like z.
    prototypes: float[K, dim] L2-normalised prototypes, seen classes first;
      replicated, stop-gradient.
    num_seen: number of seen classes S (1 <= S < K).
    simclr_temperature: overrides `temperature` for L_simclr.
    supcon_temperature: tau_supcon (0.1).
    semicon_temperature: tau_semicon of L_proto (0.7).
    w_simclr, w_supcon, w_semicon, w_ent: the weights (1, 0.2, 0.1, 0.05);
      may be traced (e.g. w_semicon's warm-up).
    id_thresh: percent of the labelled images counted in-distribution; an
      unlabelled image is novel if its ID score is below the (100 -
      id_thresh)-th percentile of the labelled images' scores (70).
    labeled_ratio: fraction of the seen classes' images that are labelled,
      for the entropy's class prior q (0.5).
    prototype_scale: scale of the prototype cosines in the entropy's
      softmax (official: 10).
    loss_impl: must be "gather".
    block_size: unused.

  Returns:
    (loss, metrics): float32 scalar loss and float32 scalar metrics
    `loss_simclr`, `loss_supcon`, `loss_proto`, `entropy`,
    `novel_fraction`, `contrastive_acc`, `pos_logit`, `neg_logit`.
  """
  del block_size
  tau_simclr = temperature if simclr_temperature is None else (
      simclr_temperature)
  _check(z, labels, open_labels, prototypes, num_seen, loss_impl,
         dict(temperature=temperature, simclr_temperature=tau_simclr,
              supcon_temperature=supcon_temperature,
              semicon_temperature=semicon_temperature),
         id_thresh, labeled_ratio)
  prototypes = jax.lax.stop_gradient(jnp.asarray(prototypes, jnp.float32))
  num_prototypes = prototypes.shape[0]
  q = _entropy_target(num_prototypes, num_seen, labeled_ratio)

  def kernel(z, open_labels, *, axis_name):
    local_batch, views, dim = z.shape
    z = z.astype(jnp.float32)
    open_labels = open_labels.astype(jnp.int32)
    gather = ((lambda x: x) if axis_name is None else
              (lambda x: jax.lax.all_gather(x, axis_name, tiled=True)))
    global_z, global_labels = gather(z), gather(open_labels)
    global_batch = global_z.shape[0]
    offset = 0 if axis_name is None else (
        jax.lax.axis_index(axis_name) * local_batch)
    sample_ids = offset + jnp.arange(local_batch)

    # The discrete choices, from the whole global batch (no gradient).
    labelled = global_labels >= 0
    unlabelled = ~labelled
    pseudo, score = _assignments(jax.lax.stop_gradient(global_z[:, 0]),
                                 prototypes, num_seen)
    cut = _masked_percentile(score, labelled, 100.0 - id_thresh)
    novel = unlabelled & (score < cut)

    # Local anchors (every view) against every view of the global batch.
    anchors = z.reshape(local_batch * views, dim)
    columns = global_z.reshape(global_batch * views, dim)
    cos = jnp.matmul(anchors, columns.T, precision=_HIGHEST)
    anchor_sample = jnp.repeat(sample_ids, views)
    column_sample = jnp.repeat(jnp.arange(global_batch), views)
    anchor_index = (sample_ids[:, None] * views
                    + jnp.arange(views)[None, :]).reshape(-1)
    not_self = (jnp.arange(global_batch * views)[None, :]
                != anchor_index[:, None])

    def part(member, classes, tau):
      return _set_loss(cos, tau, member[anchor_sample], member[column_sample],
                       classes[anchor_sample], classes[column_sample],
                       not_self)

    simclr_sum, simclr_n, logits, positive, in_den, active = part(
        unlabelled, jnp.arange(global_batch), tau_simclr)
    supcon_sum, supcon_n, *_ = part(labelled, global_labels,
                                    supcon_temperature)
    proto_sum, proto_n, *_ = part(novel, pseudo, semicon_temperature)

    # SimCLR monitoring, as the other losses report it.
    sg = jax.lax.stop_gradient(logits)
    best = jnp.argmax(jnp.where(in_den, sg, -jnp.inf), -1)
    correct = jnp.take_along_axis(positive, best[:, None], -1)[:, 0] & active
    negative = in_den & ~positive

    # Mean prototype assignment of the unlabelled images (view 0).
    local_unlabelled = open_labels < 0
    probs = jax.nn.softmax(prototype_scale * jnp.matmul(
        z[:, 0], prototypes.T, precision=_HIGHEST), axis=-1)
    prob_sum = jnp.where(local_unlabelled[:, None], probs, 0.0).sum(0)

    sums = {
        "simclr": simclr_sum, "simclr_n": simclr_n,
        "supcon": supcon_sum, "supcon_n": supcon_n,
        "proto": proto_sum, "proto_n": proto_n,
        "correct": correct.sum().astype(jnp.float32),
        "pos_logit": jnp.where(positive, sg, 0.0).sum(),
        "num_pos": positive.sum().astype(jnp.float32),
        "neg_logit": jnp.where(negative, sg, 0.0).sum(),
        "num_neg": negative.sum().astype(jnp.float32),
        "prob_sum": prob_sum,
        "num_novel": novel[sample_ids].sum().astype(jnp.float32),
        "num_unlabelled": local_unlabelled.sum().astype(jnp.float32),
    }
    if axis_name is not None:
      sums = jax.lax.psum(sums, axis_name)
    return sums

  sums = sharding.map_batch_shards(kernel, z,
                                   jnp.asarray(open_labels, jnp.int32))
  mean = lambda total, count: total / jnp.maximum(count, 1.0)
  loss_simclr = mean(sums["simclr"], sums["simclr_n"])
  loss_supcon = mean(sums["supcon"], sums["supcon_n"])
  loss_proto = mean(sums["proto"], sums["proto_n"])
  has_unlabelled = sums["num_unlabelled"] > 0
  pbar = jnp.maximum(mean(sums["prob_sum"], sums["num_unlabelled"]),
                     _ENTROPY_EPS)
  entropy = jnp.where(has_unlabelled, -(pbar * jnp.log(pbar / q)).sum(), 0.0)
  loss = (w_simclr * loss_simclr + w_supcon * loss_supcon
          + w_semicon * loss_proto - w_ent * entropy)
  metrics = {
      "loss_simclr": loss_simclr,
      "loss_supcon": loss_supcon,
      "loss_proto": loss_proto,
      "entropy": entropy,
      "novel_fraction": mean(sums["num_novel"], sums["num_unlabelled"]),
      "contrastive_acc": mean(sums["correct"], sums["simclr_n"]),
      "pos_logit": mean(sums["pos_logit"], sums["num_pos"]),
      "neg_logit": mean(sums["neg_logit"], sums["num_neg"]),
  }
  metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
  return jnp.asarray(loss, jnp.float32), metrics


def opencon(z, labels=None, *, temperature, open_labels, prototypes,
            num_seen, simclr_temperature=None, supcon_temperature=0.1,
            semicon_temperature=0.7, w_simclr=1.0, w_supcon=0.2,
            w_semicon=0.1, w_ent=0.05, id_thresh=70.0, labeled_ratio=0.5,
            prototype_scale=10.0, loss_impl="gather", block_size=None):
  """OpenCon loss; see `opencon_with_metrics` (same arguments).

  Returns:
    float32 scalar loss.
  """
  return opencon_with_metrics(
      z, labels, temperature=temperature, open_labels=open_labels,
      prototypes=prototypes, num_seen=num_seen,
      simclr_temperature=simclr_temperature,
      supcon_temperature=supcon_temperature,
      semicon_temperature=semicon_temperature, w_simclr=w_simclr,
      w_supcon=w_supcon, w_semicon=w_semicon, w_ent=w_ent,
      id_thresh=id_thresh, labeled_ratio=labeled_ratio,
      prototype_scale=prototype_scale, loss_impl=loss_impl,
      block_size=block_size)[0]


def initial_prototypes(rng: jax.Array, num_prototypes: int,
                       dim: int) -> jax.Array:
  """Random L2-normalised float32[K, dim] prototypes (the official init)."""
  x = jax.random.normal(rng, (num_prototypes, dim), jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def update_prototypes(prototypes: jax.Array, z: jax.Array,
                      open_labels: jax.Array, *, num_seen: int,
                      momentum: float = 0.9) -> jax.Array:
  """The official prototype EMA after a step, over the global batch.

  Labelled image i moves prototype open_labels[i]; unlabelled image i moves
  its pseudo-label's prototype yhat_i (from `prototypes` before the update)
  if yhat_i >= num_seen (a novel prototype), else nothing. In global batch
  order, mu_y <- normalise(momentum mu_y + (1 - momentum) z_i0). Pure and
  deterministic; on a sharded batch the view-0 embeddings are gathered
  first, so the result is the same on any mesh.

  Args:
    prototypes: float[K, dim] the current prototypes (seen first).
    z: float[batch, views, dim] (or [batch, dim]) the step's embeddings;
      view 0 is used; no gradient.
    open_labels: int[batch] class of each labelled image, -1 unlabelled.
    num_seen: number of seen classes (1 <= num_seen < K).
    momentum: EMA momentum (official 0.9).

  Returns:
    float32[K, dim] the updated L2-normalised prototypes.
  """
  z0 = z[:, 0] if z.ndim == 3 else z
  if z0.ndim != 2 or z0.shape[0] != open_labels.shape[0]:
    raise ValueError(
        f"update_prototypes: z must be float[batch, views, dim] with "
        f"open_labels int[batch], got {z.shape} and {open_labels.shape}.")
  _check_prototypes(prototypes, z0.shape[1], num_seen)
  prototypes = jax.lax.stop_gradient(jnp.asarray(prototypes, jnp.float32))
  z0 = jax.lax.stop_gradient(jnp.asarray(z0, jnp.float32))
  open_labels = jnp.asarray(open_labels, jnp.int32)
  if sharding.batch_axis_size() > 1:
    z0 = jax.lax.with_sharding_constraint(z0, P())
    open_labels = jax.lax.with_sharding_constraint(open_labels, P())
  pseudo, _ = _assignments(z0, prototypes, num_seen)
  labelled = open_labels >= 0
  target = jnp.where(labelled, open_labels, pseudo)
  moves = labelled | (pseudo >= num_seen)

  def step(protos, inputs):
    feature, row, move = inputs
    mixed = momentum * protos[row] + (1.0 - momentum) * feature
    mixed = mixed / jnp.linalg.norm(mixed)
    return protos.at[row].set(jnp.where(move, mixed, protos[row])), None

  updated, _ = jax.lax.scan(step, prototypes, (z0, target, moves))
  return updated
