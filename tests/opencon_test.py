"""OpenCon against a float64 numpy transcription of the official loss
(`deeplearning-wisc/opencon`, models/OpenSupCon.py), anchor by anchor."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive import losses
from contrastive import sharding
from contrastive.losses import opencon
from losses_test import _embeddings
from losses_test import _finite_difference_grad

NUM_SEEN, K = 3, 6
DEFAULTS = dict(supcon_temperature=0.1, semicon_temperature=0.7,
                w_simclr=1.0, w_supcon=0.2, w_semicon=0.1, w_ent=0.05,
                id_thresh=70.0, labeled_ratio=0.5)


def _choices(z, open_labels, prototypes, id_thresh=70.0):
  """The official discrete choices: (pseudo-labels, novel flags, margins)."""
  z0 = np.asarray(z, np.float64)[:, 0]
  c = z0 @ np.asarray(prototypes, np.float64).T * 10
  balanced = (c - c.mean(1, keepdims=True)) / c.std(1, ddof=1, keepdims=True)
  pseudo = balanced.argmax(1)
  score = balanced[:, :NUM_SEEN].max(1)
  labelled = open_labels >= 0
  if labelled.any():
    cut = np.percentile(score[labelled], 100 - id_thresh)
  else:
    cut = -np.inf
  novel = ~labelled & (score < cut)
  top2 = np.sort(c, 1)[:, -2:]
  margins = (top2[:, 1] - top2[:, 0]).min() / 10, (
      np.abs(score[~labelled] - cut).min() if labelled.any() and (
          ~labelled).any() else np.inf)
  return pseudo, novel, margins


def _set_loss(z, members, classes, tau):
  """Mean over the views of `members` of SupCon L_out within the set."""
  batch, views, _ = z.shape
  index = [(i, v) for i in range(batch) if members[i] for v in range(views)]
  per_anchor = []
  for a in index:
    others = [b for b in index if b != a]
    s = np.array([z[a] @ z[b] for b in others]) / tau
    positive = np.array([classes[b[0]] == classes[a[0]] for b in others])
    log_prob = s - np.log(np.exp(s).sum())
    per_anchor.append(-log_prob[positive].mean())
  return np.mean(per_anchor) if per_anchor else 0.0


def _reference(z, open_labels, prototypes, tau_simclr, choices=None, *,
               supcon_temperature, semicon_temperature, w_simclr, w_supcon,
               w_semicon, w_ent, id_thresh, labeled_ratio):
  """(loss, components dict, simclr metrics) with the choices held fixed."""
  z = np.asarray(z, np.float64)
  prototypes = np.asarray(prototypes, np.float64)
  if choices is None:
    choices = _choices(z, open_labels, prototypes, id_thresh)
  pseudo, novel, _ = choices
  batch = len(z)
  labelled = open_labels >= 0
  simclr = _set_loss(z, ~labelled, np.arange(batch), tau_simclr)
  supcon = _set_loss(z, labelled, open_labels, supcon_temperature)
  proto = _set_loss(z, novel, pseudo, semicon_temperature)
  if (~labelled).any():
    logits = 10 * z[~labelled, 0] @ prototypes.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    pbar = np.maximum((p / p.sum(1, keepdims=True)).mean(0), 1e-5)
    q = np.where(np.arange(K) < NUM_SEEN, 1 - labeled_ratio, 1.0)
    q = q / q.sum()
    entropy = -(pbar * np.log(pbar / q)).sum()
  else:
    entropy = 0.0
  loss = (w_simclr * simclr + w_supcon * supcon + w_semicon * proto
          - w_ent * entropy)
  # SimCLR metrics: anchors the views of U, columns the other views of U.
  views = z.shape[1]
  index = [(i, v) for i in range(batch) if not labelled[i]
           for v in range(views)]
  correct, pos, neg = [], [], []
  for a in index:
    others = [b for b in index if b != a]
    s = np.array([z[a] @ z[b] for b in others]) / tau_simclr
    positive = np.array([b[0] == a[0] for b in others])
    correct.append(positive[np.argmax(s)])
    pos.extend(s[positive])
    neg.extend(s[~positive])
  mean = lambda x: np.mean(x) if len(x) else 0.0
  n_unlabelled = (~labelled).sum()
  metrics = {
      "loss_simclr": simclr, "loss_supcon": supcon, "loss_proto": proto,
      "entropy": entropy,
      "novel_fraction": novel.sum() / n_unlabelled if n_unlabelled else 0.0,
      "contrastive_acc": mean(correct), "pos_logit": mean(pos),
      "neg_logit": mean(neg)}
  return loss, metrics


def _inputs(seed, batch=16, views=2, dim=6, unlabelled=9):
  rng = np.random.default_rng(seed)
  z = _embeddings(rng, batch, views, dim)
  prototypes = _embeddings(rng, K, 1, dim)[:, 0]
  open_labels = rng.integers(0, NUM_SEEN, size=batch).astype(np.int32)
  open_labels[rng.permutation(batch)[:unlabelled]] = -1
  return z, open_labels, prototypes


# Seed 21: 5 of the 9 unlabelled images are flagged novel, with pseudo-labels
# both seen and novel, and no near-ties (checked in the test).
SEED = 21


@functools.lru_cache(maxsize=None)
def _expected(tau):
  z, open_labels, prototypes = _inputs(SEED)
  choices = _choices(z, open_labels, prototypes)
  expected = _reference(z, open_labels, prototypes, tau, choices, **DEFAULTS)
  grad = _finite_difference_grad(lambda x: _reference(
      x, open_labels, prototypes, tau, choices, **DEFAULTS)[0], z)
  return choices, expected, grad


def _run(z, open_labels, prototypes, devices, **kwargs):
  """(loss, metrics, d/dz) on `devices` devices: z and open_labels sharded
  on the batch, the prototypes replicated."""
  fn = losses.get_with_metrics("opencon")
  step = jax.jit(jax.value_and_grad(
      lambda z, open_labels, prototypes: fn(
          z, open_labels=open_labels, prototypes=prototypes, **kwargs),
      has_aux=True))
  mesh = sharding.make_mesh(devices=jax.devices()[:devices])
  with jax.set_mesh(mesh):
    put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
    (value, metrics), grad = step(
        put(z), put(open_labels),
        jax.device_put(prototypes, sharding.replicated(mesh)))
  assert grad.sharding.is_equivalent_to(sharding.batch_sharding(mesh), 3)
  assert value.dtype == jnp.float32 and value.shape == ()
  return float(value), jax.device_get(metrics), np.asarray(grad)


@pytest.mark.parametrize("devices", [1, 8])
def test_matches_reference(devices):
  z, open_labels, prototypes = _inputs(SEED)
  tau = 0.4
  (pseudo, novel, margins), (loss_ref, metrics_ref), grad_ref = _expected(tau)
  # The discrete choices are far from ties, so finite differences hold.
  assert min(margins) > 1e-3, margins
  assert 2 <= novel.sum() < (open_labels < 0).sum()
  assert len(set(pseudo[novel])) > 1
  value, metrics, grad = _run(z, open_labels, prototypes, devices,
                              temperature=tau, num_seen=NUM_SEEN)
  np.testing.assert_allclose(value, loss_ref, rtol=2e-5, atol=1e-6)
  assert set(metrics) == set(metrics_ref)
  for key, reference in metrics_ref.items():
    assert metrics[key].dtype == np.float32 and metrics[key].shape == ()
    np.testing.assert_allclose(metrics[key], reference, rtol=2e-5, atol=1e-5,
                               err_msg=key)
  scale = np.abs(grad_ref).max()
  assert scale > 0
  np.testing.assert_allclose(grad, grad_ref, rtol=1e-3, atol=2e-4 * scale)


def _loss(z, open_labels, prototypes, **kwargs):
  fn = losses.get_with_metrics("opencon")
  kwargs = dict(dict(temperature=0.4, num_seen=NUM_SEEN), **kwargs)
  return jax.jit(lambda z: fn(z, open_labels=open_labels,
                              prototypes=prototypes, **kwargs))(z)


def test_all_labelled_is_weighted_supcon():
  z, open_labels, prototypes = _inputs(SEED, unlabelled=0)
  loss, metrics = _loss(z, open_labels, prototypes)
  for key in ("loss_simclr", "loss_proto", "entropy", "novel_fraction",
              "contrastive_acc"):
    assert float(metrics[key]) == 0.0, key
  supcon = losses.get("supcon")(z, open_labels, temperature=0.1)
  np.testing.assert_allclose(metrics["loss_supcon"], supcon, rtol=1e-5)
  np.testing.assert_allclose(loss, 0.2 * supcon, rtol=1e-5)


def test_simclr_only_on_unlabelled_and_temperature_mapping():
  z, open_labels, prototypes = _inputs(SEED)
  unlabelled = open_labels < 0
  only_simclr = dict(w_supcon=0.0, w_semicon=0.0, w_ent=0.0)
  simclr = losses.get("simclr")
  loss, _ = _loss(z, open_labels, prototypes, **only_simclr)
  np.testing.assert_allclose(
      loss, simclr(z[unlabelled], temperature=0.4), rtol=1e-5)
  # simclr_temperature overrides the framework's temperature.
  loss, _ = _loss(z, open_labels, prototypes, simclr_temperature=0.2,
                  **only_simclr)
  np.testing.assert_allclose(
      loss, simclr(z[unlabelled], temperature=0.2), rtol=1e-5)
  # No labelled image at all: plain SimCLR, nothing flagged novel.
  everyone = np.full_like(open_labels, -1)
  loss, metrics = _loss(z, everyone, prototypes, **only_simclr)
  np.testing.assert_allclose(loss, simclr(z, temperature=0.4), rtol=1e-5)
  assert float(metrics["novel_fraction"]) == 0.0
  assert float(metrics["loss_supcon"]) == 0.0


def test_traced_weights():
  z, open_labels, prototypes = _inputs(SEED)
  fn = losses.get("opencon")
  loss = jax.jit(lambda z, w: fn(
      z, temperature=0.4, open_labels=open_labels, prototypes=prototypes,
      num_seen=NUM_SEEN, w_semicon=w))
  _, (loss_ref, metrics_ref), _ = _expected(0.4)
  np.testing.assert_allclose(
      loss(z, jnp.float32(0.0)),
      loss_ref - 0.1 * metrics_ref["loss_proto"], rtol=2e-5)


def _update_reference(prototypes, z, open_labels, momentum=0.9):
  protos = np.asarray(prototypes, np.float64).copy()
  z0 = np.asarray(z, np.float64)[:, 0]
  pseudo = (z0 @ protos.T).argmax(1)
  for i in range(len(z0)):
    if open_labels[i] >= 0:
      row = open_labels[i]
    elif pseudo[i] >= NUM_SEEN:
      row = pseudo[i]
    else:
      continue
    mixed = momentum * protos[row] + (1 - momentum) * z0[i]
    protos[row] = mixed / np.linalg.norm(mixed)
  return protos


def test_update_prototypes():
  z, open_labels, prototypes = _inputs(SEED)
  expected = _update_reference(prototypes, z, open_labels)
  # Some novel prototype moved, some prototype did not.
  moved = np.abs(expected - prototypes).max(1) > 1e-6
  assert moved[NUM_SEEN:].any() and not moved.all()
  update = jax.jit(functools.partial(opencon.update_prototypes,
                                     num_seen=NUM_SEEN, momentum=0.9))
  one = update(prototypes, z, open_labels)
  np.testing.assert_allclose(one, expected, rtol=1e-5, atol=1e-6)
  mesh = sharding.make_mesh()
  with jax.set_mesh(mesh):
    put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
    eight = update(jax.device_put(prototypes, sharding.replicated(mesh)),
                   put(z), put(open_labels))
  np.testing.assert_allclose(eight, one, rtol=1e-6, atol=1e-7)


def test_errors_and_registry():
  assert "opencon" in losses.names()
  assert losses.extra_inputs("opencon") == ("open_labels", "prototypes")
  assert {"open_labels", "prototypes"} <= set(losses.EXTRA_INPUTS)
  z, open_labels, prototypes = _inputs(SEED, batch=4, unlabelled=2)
  fn = losses.get("opencon")
  kwargs = dict(temperature=0.4, open_labels=open_labels,
                prototypes=prototypes, num_seen=NUM_SEEN)
  for change, match in [
      (dict(labels=np.arange(4)), "takes no labels"),
      (dict(open_labels=None), "needs open_labels"),
      (dict(open_labels=open_labels[:2]), "open_labels must have shape"),
      (dict(prototypes=None), "needs prototypes"),
      (dict(prototypes=prototypes[:, :3]), "prototypes must be"),
      (dict(num_seen=K), "num_seen must be"),
      (dict(num_seen=0), "num_seen must be"),
      (dict(loss_impl="ring"), "only loss_impl='gather'"),
      (dict(semicon_temperature=0.0), "semicon_temperature must be > 0"),
      (dict(id_thresh=120.0), "id_thresh"),
  ]:
    args = dict(kwargs, **change)
    labels = args.pop("labels", None)
    with pytest.raises(ValueError, match=match):
      fn(z, labels, **args)
  with pytest.raises(ValueError, match="at least 2 views"):
    fn(z[:, :1], **kwargs)
  with pytest.raises(ValueError, match="num_seen must be"):
    opencon.update_prototypes(prototypes, z, open_labels, num_seen=K)
  protos = opencon.initial_prototypes(jax.random.key(0), K, 6)
  np.testing.assert_allclose(np.linalg.norm(protos, axis=1), 1.0, rtol=1e-6)
