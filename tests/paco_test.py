"""PaCo and GPaCo against a float64 numpy transcription of the official
loss (Cui et al., `PaCoLoss.forward`), anchor by anchor."""

import jax
import numpy as np
import pytest

from contrastive import losses
from losses_test import _embeddings
from losses_test import _finite_difference_grad
from moco_test import _run


def _lse(x):
  return x.max() + np.log(np.exp(x - x.max()).sum())


def _paco_reference(z, labels, keys, queue, queue_labels, class_logits,
                    temperature, *, alpha, beta, gamma, supt=1.0,
                    class_prior=None, smoothing=0.0, gpaco=False):
  """Returns (loss, contrastive_acc, pos_logit, neg_logit, class_acc).

  Anchor (i, v). Columns: GPaCo every view of every sample and the queue;
  PaCo view v of every sample (online), the keys of the other key view(s)
  u in {0, 1} \\ {v}, and the queue; the anchor itself never. Centres:
  (class_logits + log(prior + 1e-9)) / supt. With targets beta * y (GPaCo:
  smoothed) on the centres and alpha on same-label columns,
  L = -sum_c t_c log(e^{l_c} / (sum_centres e^l + gamma sum_cols e^s))
  / sum_c t_c.
  """
  z, keys, queue, class_logits = (
      np.asarray(x, np.float64) for x in (z, keys, queue, class_logits))
  batch, views, dim = z.shape
  num_classes = class_logits.shape[2]
  # Every embedding that can be a column: online views, keys, the queue.
  pool = np.concatenate([z.reshape(-1, dim), keys.reshape(-1, dim),
                         queue.reshape(-1, dim)])
  pool_labels = np.concatenate([np.repeat(labels, views),
                                np.repeat(labels, views), queue_labels])
  online = lambda j, w: j * views + w
  key = lambda j, u: batch * views + j * views + u
  in_queue = list(range(2 * batch * views, len(pool)))
  per_anchor, correct, pos, neg, class_correct = [], [], [], [], []
  for i in range(batch):
    for v in range(views):
      rows = [online(j, w) for j in range(batch)
              for w in (range(views) if gpaco else (v,)) if (j, w) != (i, v)]
      if not gpaco:
        rows += [key(j, u) for u in (0, 1) if u != v for j in range(batch)]
      rows += in_queue
      columns, column_labels = pool[rows], pool_labels[rows]
      s = columns @ z[i, v] / temperature
      centres = class_logits[i, v].copy()
      if class_prior is not None:
        centres = centres + np.log(np.asarray(class_prior, np.float64) + 1e-9)
      centres = centres / supt
      log_den = np.log(np.exp(centres).sum() + gamma * np.exp(s).sum())
      centre_target = np.full(num_classes, smoothing / max(num_classes - 1, 1))
      centre_target[labels[i]] = 1 - smoothing
      centre_target *= beta
      positive = (column_labels == labels[i]) & (column_labels >= 0)
      total = (centre_target * (centres - log_den)).sum() + alpha * (
          s[positive] - log_den).sum()
      per_anchor.append(-total / (centre_target.sum()
                                  + alpha * positive.sum()))
      if positive.any():
        correct.append(positive[np.argmax(s)])
      pos.extend(s[positive])
      neg.extend(s[~positive])
      class_correct.append(np.argmax(class_logits[i, v]) == labels[i])
  return (np.mean(per_anchor), np.mean(correct), np.mean(pos), np.mean(neg),
          np.mean(class_correct))


def _inputs(seed, batch=16, views=2, dim=4, queue_size=6, num_classes=3):
  rng = np.random.default_rng(seed)
  z = _embeddings(rng, batch, views, dim)
  keys = _embeddings(rng, batch, views, dim)
  queue = _embeddings(rng, queue_size, 1, dim)[:, 0]
  labels = rng.integers(0, num_classes, size=batch).astype(np.int32)
  queue_labels = rng.integers(-1, num_classes, size=queue_size).astype(
      np.int32)
  queue_labels[0] = -1  # At least one unknown entry.
  class_logits = rng.normal(size=(batch, views, num_classes)).astype(
      np.float32)
  return z, labels, keys, queue, queue_labels, class_logits


CASES = {
    "paco": ("paco", 2, dict(alpha=0.05, beta=1.0, gamma=1.0)),
    "paco_3_views_prior": ("paco", 3, dict(
        alpha=0.3, beta=0.7, gamma=0.5, class_temperature=2.0,
        class_prior=np.array([0.6, 0.3, 0.1], np.float32))),
    "paco_smoothed_gamma_0": ("paco", 2, dict(
        alpha=1.0, beta=1.0, gamma=0.0, label_smoothing=0.2)),
    "gpaco": ("gpaco", 2, dict(alpha=0.05, beta=1.0, gamma=1.0)),
    "gpaco_3_views_prior": ("gpaco", 3, dict(
        alpha=0.5, beta=1.0, gamma=1.0, label_smoothing=0.0,
        class_prior=np.array([0.2, 0.2, 0.6], np.float32))),
}


def _reference_kwargs(name, options):
  smoothing = options.get("label_smoothing", 0.1 if name == "gpaco" else 0.0)
  return dict(alpha=options["alpha"], beta=options["beta"],
              gamma=options["gamma"],
              supt=options.get("class_temperature", 1.0),
              class_prior=options.get("class_prior"), smoothing=smoothing,
              gpaco=name == "gpaco")


def _expected(case, tau):
  """The reference's (values, d/dz, d/d class_logits)."""
  name, views, options = CASES[case]
  z, labels, keys, queue, queue_labels, class_logits = _inputs(
      len(case), views=views)
  reference_kwargs = _reference_kwargs(name, options)
  expected = _paco_reference(z, labels, keys, queue, queue_labels,
                             class_logits, tau, **reference_kwargs)
  grad_z = _finite_difference_grad(
      lambda x: _paco_reference(x, labels, keys, queue, queue_labels,
                                class_logits, tau, **reference_kwargs)[0], z)
  grad_logits = _finite_difference_grad(
      lambda x: _paco_reference(z, labels, keys, queue, queue_labels, x, tau,
                                **reference_kwargs)[0], class_logits)
  return expected, grad_z, grad_logits


# One device for the plain cases, 8 for the richer ones (compilation
# dominates the run time on 2 cores).
@pytest.mark.parametrize("case,devices", [
    ("paco", 1), ("paco_3_views_prior", 8), ("paco_smoothed_gamma_0", 8),
    ("gpaco", 1), ("gpaco_3_views_prior", 8)])
def test_matches_reference(case, devices):
  name, views, options = CASES[case]
  z, labels, keys, queue, queue_labels, class_logits = _inputs(
      len(case), views=views)
  tau = 0.2
  expected, grad_z, grad_logits = _expected(case, tau)
  batch_inputs = {"class_logits": class_logits}
  if name == "paco":
    batch_inputs["keys"] = keys
  value, metrics, (grad, other_grads) = _run(
      name, z, devices, labels=labels, batch_inputs=batch_inputs,
      queue=queue, queue_labels=queue_labels, temperature=tau, **options)
  np.testing.assert_allclose(value, expected[0], rtol=2e-5, atol=1e-6)
  scale = np.abs(grad_z).max()
  np.testing.assert_allclose(grad, grad_z, rtol=1e-3, atol=2e-4 * scale)
  scale = np.abs(grad_logits).max()
  np.testing.assert_allclose(other_grads["class_logits"], grad_logits,
                             rtol=1e-3, atol=2e-4 * scale)
  if name == "paco":
    np.testing.assert_array_equal(other_grads["keys"], 0.0)
  assert set(metrics) == {"contrastive_acc", "pos_logit", "neg_logit",
                          "class_acc"}
  for key, reference in zip(("contrastive_acc", "pos_logit", "neg_logit",
                             "class_acc"), expected[1:]):
    np.testing.assert_allclose(metrics[key], reference, rtol=1e-5,
                               atol=1e-5)


def test_base_temperature_scales():
  z, labels, keys, queue, queue_labels, class_logits = _inputs(3)
  kwargs = dict(temperature=0.2, keys=keys, queue=queue,
                queue_labels=queue_labels, class_logits=class_logits)
  loss = lambda **extra: jax.jit(lambda z: losses.get("paco")(
      z, labels, **kwargs, **extra))(z)
  plain, scaled = loss(), loss(base_temperature=0.07)
  np.testing.assert_allclose(scaled, plain * 0.2 / 0.07, rtol=1e-6)


def test_without_queue():
  z, labels, keys, _, _, class_logits = _inputs(4)
  expected = _paco_reference(z, labels, keys, np.zeros((0, 4)),
                             np.zeros((0,), np.int32), class_logits, 0.2,
                             alpha=0.05, beta=1.0, gamma=1.0)[0]
  loss = jax.jit(lambda z: losses.get("paco")(
      z, labels, temperature=0.2, keys=keys, queue=None, queue_labels=None,
      class_logits=class_logits))(z)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_clear_errors():
  z, labels, keys, queue, queue_labels, class_logits = _inputs(5, batch=4)
  kwargs = dict(temperature=0.2, keys=keys, queue=queue,
                queue_labels=queue_labels, class_logits=class_logits)
  paco, gpaco = losses.get("paco"), losses.get("gpaco")
  with pytest.raises(ValueError, match="paco needs labels"):
    paco(z, None, **kwargs)
  with pytest.raises(ValueError, match="paco needs queue_labels"):
    paco(z, labels, **dict(kwargs, queue_labels=None))
  with pytest.raises(ValueError, match="paco needs class_logits"):
    paco(z, labels, **dict(kwargs, class_logits=None))
  with pytest.raises(ValueError, match="class_logits must be"):
    paco(z, labels, **dict(kwargs, class_logits=class_logits[:, :1]))
  with pytest.raises(ValueError, match="paco needs keys"):
    paco(z, labels, **dict(kwargs, keys=None))
  with pytest.raises(ValueError, match="class_prior must be"):
    paco(z, labels, class_prior=np.ones(5, np.float32), **kwargs)
  with pytest.raises(ValueError, match="gpaco takes no keys"):
    gpaco(z, labels, **kwargs)
  with pytest.raises(ValueError, match="paco supports only"):
    paco(z, labels, loss_impl="blockwise", **kwargs)
  with pytest.raises(ValueError, match="queue_labels must have shape"):
    paco(z, labels, **dict(kwargs, queue_labels=queue_labels[:2]))
  # The same inputs without the mistakes run (jitted: eager is slow).
  assert np.isfinite(jax.jit(lambda z: gpaco(
      z, labels, **dict(kwargs, keys=None)))(z))
  assert np.isfinite(jax.jit(lambda z: paco(z, labels, **kwargs))(z))
