"""ResCom against a float64 numpy transcription of its equations (Zhong et
al., `SiamBS_SPM`), anchor by anchor, plus its hard mining, its SupCon
special case, its class weights and its errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive import losses
from contrastive.losses import rescom
from losses_test import _embeddings
from losses_test import _finite_difference_grad
from moco_test import _run

COUNTS = np.array([100.0, 30.0, 10.0, 3.0], np.float32)


def _log_softmax(x):
  m = x.max()
  return x - (m + np.log(np.exp(x - m).sum()))


def _rescom_reference(z, labels, class_queue, class_logits, counts, tau, *,
                      con_weight, num_pos, num_neg, beta, prior_weight):
  """Returns a dict: loss, loss_cls, loss_con and the metrics.

  Rows r: every view of every sample. Columns of r: the other rows
  (positive iff same label), the `num_pos` keys of class y_r least similar
  to q_r (positive) and the `num_neg` keys of other classes most similar
  (negative); logits q.k / tau + prior_weight log(pi_class + 1e-9).
  L_con(r) = -mean_{p in P} log softmax_p, weighted by Cui et al.'s
  w = mean(E) / E, E = (1 - beta^n) / (1 - beta).
  """
  z, class_queue, class_logits = (
      np.asarray(x, np.float64) for x in (z, class_queue, class_logits))
  counts = np.asarray(counts, np.float64)
  batch, views, dim = z.shape
  num_classes, per_class, _ = class_queue.shape
  log_prior = np.log(counts / counts.sum() + 1e-9)
  if beta == 0:
    weights = np.ones(num_classes)
  else:
    effective = (1 - beta ** counts) / (1 - beta)
    weights = effective.mean() / effective
  rows = z.reshape(-1, dim)
  row_labels = np.repeat(labels, views)
  flat_logits = class_logits.reshape(-1, num_classes)
  cls, con, correct, pos, neg, class_correct = [], [], [], [], [], []
  for r in range(len(rows)):
    y = row_labels[r]
    others = [a for a in range(len(rows)) if a != r]
    s = list(rows[others] @ rows[r])
    is_pos = list(row_labels[others] == y)
    classes = list(row_labels[others])
    own = class_queue[y] @ rows[r]
    for k in np.argsort(own)[:num_pos]:
      s.append(own[k])
      is_pos.append(True)
      classes.append(y)
    other_keys = [(class_queue[c, k] @ rows[r], c)
                  for c in range(num_classes) if c != y
                  for k in range(per_class)]
    for sim, c in sorted(other_keys, reverse=True)[:num_neg]:
      s.append(sim)
      is_pos.append(False)
      classes.append(c)
    logits = np.array(s) / tau + prior_weight * log_prior[np.array(classes)]
    is_pos = np.array(is_pos)
    con.append(-weights[y] * _log_softmax(logits)[is_pos].mean())
    correct.append(is_pos[np.argmax(logits)])
    pos.extend(logits[is_pos])
    neg.extend(logits[~is_pos])
    cls.append(-_log_softmax(flat_logits[r] + log_prior)[y])
    class_correct.append(np.argmax(flat_logits[r]) == y)
  loss_cls, loss_con = np.mean(cls), np.mean(con)
  return dict(loss=loss_cls + con_weight * loss_con, loss_cls=loss_cls,
              loss_con=loss_con, contrastive_acc=np.mean(correct),
              pos_logit=np.mean(pos), neg_logit=np.mean(neg),
              class_acc=np.mean(class_correct))


def _inputs(seed, batch=8, views=2, dim=5, num_classes=4, per_class=3,
            present=4):
  """`present` classes in the batch (each at least once); all in the queue."""
  rng = np.random.default_rng(seed)
  z = _embeddings(rng, batch, views, dim)
  labels = np.concatenate([np.arange(present), rng.integers(
      0, present, size=batch - present)]).astype(np.int32)
  rng.shuffle(labels)
  queue = _embeddings(rng, num_classes * per_class, 1, dim).reshape(
      num_classes, per_class, dim)
  class_logits = rng.normal(size=(batch, views, num_classes)).astype(
      np.float32)
  return z, labels, queue, class_logits


CASES = {
    # Every class in the batch; the official beta and prior weight.
    "plain": (1, 4, dict(con_weight=0.5, num_hard_positives=2,
                         num_hard_negatives=5, effective_num_beta=0.999,
                         prior_weight=0.0)),
    # Class 3 never in the batch (only in the queue), column priors.
    "prior_missing_class": (8, 3, dict(
        con_weight=0.7, num_hard_positives=1, num_hard_negatives=4,
        effective_num_beta=0.9, prior_weight=0.6)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(case):
  devices, present, options = CASES[case]
  z, labels, queue, class_logits = _inputs(len(case), present=present)
  tau = 0.2
  ref_options = dict(con_weight=options["con_weight"],
                     num_pos=options["num_hard_positives"],
                     num_neg=options["num_hard_negatives"],
                     beta=options["effective_num_beta"],
                     prior_weight=options["prior_weight"])
  reference = lambda z, logits: _rescom_reference(
      z, labels, queue, logits, COUNTS, tau, **ref_options)
  expected = reference(z, class_logits)
  grad_z = _finite_difference_grad(lambda x: reference(x, class_logits)["loss"],
                                   z)
  grad_logits = _finite_difference_grad(
      lambda x: reference(z, x)["loss"], class_logits)
  value, metrics, (grad, other_grads) = _run(
      "rescom", z, devices, labels=labels,
      batch_inputs={"class_logits": class_logits}, class_queue=queue,
      class_counts=COUNTS, temperature=tau, **options)
  np.testing.assert_allclose(value, expected["loss"], rtol=2e-5, atol=1e-6)
  assert set(metrics) == {"contrastive_acc", "pos_logit", "neg_logit",
                          "class_acc", "loss_cls", "loss_con"}
  for key, metric in metrics.items():
    assert metric.dtype == np.float32 and metric.shape == ()
    np.testing.assert_allclose(metric, expected[key], rtol=2e-5, atol=1e-6,
                               err_msg=key)
  scale = np.abs(grad_z).max()
  np.testing.assert_allclose(grad, grad_z, rtol=1e-3, atol=2e-4 * scale)
  scale = np.abs(grad_logits).max()
  np.testing.assert_allclose(other_grads["class_logits"], grad_logits,
                             rtol=1e-3, atol=2e-4 * scale)


def test_hard_mining_selects_extreme_keys():
  """Anchors near e0 all rank keys by their e0 component: the hard
  positives are each class's keys with the smallest one, the hard
  negatives the other classes' with the largest. Moving the keys that are
  not selected (without changing the ranking) leaves the loss unchanged;
  moving a selected one changes it."""
  rng = np.random.default_rng(0)
  batch, views, dim, num_classes, per_class = 4, 2, 6, 3, 4
  z = np.zeros((batch, views, dim))
  z[..., 0] = 1.0
  z[..., 1:] = 0.01 * rng.normal(size=(batch, views, dim - 1))
  z[..., -1] = 0.0  # The keys' other axis: similarity = a z_0.
  z = (z / np.linalg.norm(z, axis=-1, keepdims=True)).astype(np.float32)
  labels = np.array([0, 1, 2, 0], np.int32)
  # Key (c, k) has e0 component a[c, k] and is orthogonal to the anchors'
  # small components otherwise (it lives on the last axis only).
  a = rng.uniform(-0.9, 0.9, size=(num_classes, per_class))

  def queue_from(a):
    queue = np.zeros((num_classes, per_class, dim), np.float32)
    queue[..., 0] = a
    queue[..., -1] = np.sqrt(1 - a ** 2)
    return queue

  class_logits = rng.normal(size=(batch, views, num_classes)).astype(
      np.float32)
  kwargs = dict(temperature=0.2, class_logits=class_logits,
                class_counts=np.array([5.0, 3.0, 2.0], np.float32),
                num_hard_positives=1, num_hard_negatives=2)
  loss = jax.jit(lambda z, queue: losses.get("rescom")(
      z, labels, class_queue=queue, **kwargs))
  base = float(loss(z, queue_from(a)))
  # The reference (which sorts) agrees.
  np.testing.assert_allclose(base, _rescom_reference(
      z, labels, queue_from(a), class_logits, kwargs["class_counts"], 0.2,
      con_weight=0.5, num_pos=1, num_neg=2, beta=0.999,
      prior_weight=0.0)["loss"], rtol=2e-5)
  # Every class is someone's own class and someone's other class here, so
  # a key is selected iff it is its class's minimum (hard positive) or
  # among the 2 largest of the other classes of some anchor label.
  selected = np.zeros_like(a, bool)
  selected[np.arange(num_classes), a.argmin(1)] = True
  for y in set(labels.tolist()):
    others = [(a[c, k], c, k) for c in range(num_classes) if c != y
              for k in range(per_class)]
    for _, c, k in sorted(others, reverse=True)[:2]:
      selected[c, k] = True
  moved = a.copy()
  # Not selected: strictly between its class's minimum and the smallest
  # selected negative, so the ranking (and the selection) stay the same.
  for c in range(num_classes):
    for k in range(per_class):
      if not selected[c, k]:
        low = a[c].min()
        high = min(a[selected & (a > low)].min(), 0.95)
        moved[c, k] = low + rng.uniform(0.1, 0.9) * (high - low)
  assert not np.allclose(moved, a)
  np.testing.assert_allclose(float(loss(z, queue_from(moved))), base,
                             rtol=1e-6)
  # A selected hard positive moved: the loss changes.
  changed = a.copy()
  c = 0
  changed[c, a[c].argmin()] -= 0.05
  assert abs(float(loss(z, queue_from(changed))) - base) > 1e-4


def test_degenerate_case_is_supcon():
  """No mined keys, unit weights, no prior, con_weight 1: L - L_cls is
  SupCon L_out at the same temperature (no base-temperature scaling)."""
  z, labels, queue, class_logits = _inputs(3, present=3)
  tau = 0.3
  loss, metrics = jax.jit(lambda z: losses.get_with_metrics("rescom")(
      z, labels, temperature=tau, class_queue=queue,
      class_logits=class_logits, class_counts=COUNTS, con_weight=1.0,
      num_hard_positives=0, num_hard_negatives=0, effective_num_beta=0.0,
      prior_weight=0.0))(z)
  expected = jax.jit(lambda z: losses.get("supcon")(
      z, labels, temperature=tau))(z)
  np.testing.assert_allclose(loss - metrics["loss_cls"], expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_con"], expected, rtol=1e-5)


def test_class_balanced_weights():
  np.testing.assert_array_equal(rescom.class_balanced_weights(COUNTS, 0.0),
                                np.ones(4))
  counts = COUNTS.astype(np.float64)
  for beta in (0.5, 0.99, 0.999999):
    effective = (1 - beta ** counts) / (1 - beta)
    np.testing.assert_allclose(rescom.class_balanced_weights(COUNTS, beta),
                               effective.mean() / effective, rtol=1e-5)
  # beta -> 1: w_c = mean(n) / n_c (first order in 1 - beta).
  np.testing.assert_allclose(
      rescom.class_balanced_weights(COUNTS, 0.999999),
      counts.mean() / counts, rtol=1e-4)


def test_low_precision_inputs_compute_in_float32():
  z, labels, queue, class_logits = _inputs(5)
  kwargs = dict(temperature=0.2, class_counts=COUNTS, num_hard_positives=1,
                num_hard_negatives=3)
  fn = jax.jit(lambda z, queue, logits: losses.get("rescom")(
      z, labels, class_queue=queue, class_logits=logits, **kwargs))
  low = fn(*(jnp.asarray(x, jnp.bfloat16) for x in (z, queue, class_logits)))
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(low, fn(z, queue, class_logits), rtol=2e-2)


def test_clear_errors():
  z, labels, queue, class_logits = _inputs(6)
  kwargs = dict(temperature=0.2, class_queue=queue, class_logits=class_logits,
                class_counts=COUNTS, num_hard_positives=1,
                num_hard_negatives=3)
  fn = losses.get("rescom")
  with pytest.raises(ValueError, match="use_labels=True"):
    fn(z, None, **kwargs)
  with pytest.raises(ValueError, match="lower num_hard_positives"):
    fn(z, labels, **dict(kwargs, num_hard_positives=4))
  with pytest.raises(ValueError, match="lower num_hard_negatives"):
    fn(z, labels, **dict(kwargs, num_hard_negatives=10))
  with pytest.raises(ValueError, match="class_queue must be"):
    fn(z, labels, **dict(kwargs, class_queue=queue[:3]))
  with pytest.raises(ValueError, match="class_queue must be"):
    fn(z, labels, **dict(kwargs, class_queue=queue[..., :4]))
  with pytest.raises(ValueError, match="class_queue must be"):
    fn(z, labels, **dict(kwargs, class_queue=queue.reshape(-1, 5)))
  with pytest.raises(ValueError, match="class_logits must be"):
    fn(z, labels, **dict(kwargs, class_logits=class_logits[:, :1]))
  with pytest.raises(ValueError, match="needs class_logits"):
    fn(z, labels, **dict(kwargs, class_logits=None))
  with pytest.raises(ValueError, match="class_counts must be"):
    fn(z, labels, **dict(kwargs, class_counts=COUNTS[:3]))
  with pytest.raises(ValueError, match="must be > 0"):
    fn(z, labels, **dict(kwargs, class_counts=COUNTS * [1, 1, 0, 1]))
  with pytest.raises(ValueError, match="effective_num_beta"):
    fn(z, labels, **dict(kwargs, effective_num_beta=1.0))
  with pytest.raises(ValueError, match="at least 2 views"):
    fn(z[:, :1], labels, **dict(kwargs, class_logits=class_logits[:, :1]))
  with pytest.raises(ValueError, match="rescom supports only"):
    fn(z, labels, loss_impl="ring", **kwargs)


def test_registry():
  assert "rescom" in losses.names()
  assert losses.get("rescom") is rescom.rescom
  assert losses.get_with_metrics("rescom") is rescom.rescom_with_metrics
  assert losses.extra_inputs("rescom") == ("class_queue", "class_logits")
  assert set(losses.extra_inputs("rescom")) <= set(losses.EXTRA_INPUTS)
