"""IFND's elimination loss against a float64 numpy transcription of its
equation, on one and eight devices."""

import functools

import jax
import numpy as np
import pytest

from contrastive import losses
from contrastive import sharding
from losses_test import _embeddings
from losses_test import _finite_difference_grad

TAU = 0.2
# Samples 0, 3, 5 share a pseudo-label, and 2, 7; the others are unique.
PSEUDO = np.array([10, 1, 11, 10, 4, 10, 6, 11], np.int32)


def _reference(z, pseudo_labels, temperature):
  """Chen et al. Eq. 3 anchor by anchor, float64: positives are the anchor's
  own other views; views of other samples with its pseudo-label leave the
  denominator; every other view is a negative. With more views, the mean
  over the own other views (L_out).

  Returns (loss, contrastive_acc, pos_logit, neg_logit, fn_per_anchor); the
  metrics as SupCon's over the pseudo-label masks (a best-scoring view with
  the anchor's pseudo-label is a hit, `pos_logit` averages every pair with
  the same pseudo-label, `neg_logit` the pairs with another).
  """
  z = np.asarray(z, np.float64)
  batch, views, dim = z.shape
  flat = z.reshape(batch * views, dim)
  y = np.repeat(np.asarray(pseudo_labels), views)
  s = flat @ flat.T / temperature
  n = batch * views
  per_anchor, correct, pos, neg, eliminated = [], [], [], [], []
  for i in range(n):
    own = [j for j in range(n) if j != i and j // views == i // views]
    false_negatives = [j for j in range(n)
                       if j // views != i // views and y[j] == y[i]]
    negatives = [j for j in range(n) if y[j] != y[i]]
    eliminated.append(len(false_negatives))
    negative_sum = sum(np.exp(s[i, k]) for k in negatives)
    own_sum = sum(np.exp(s[i, p]) for p in own)
    per_anchor.append(np.mean(
        [-np.log(np.exp(s[i, p]) / (own_sum + negative_sum)) for p in own]))
    others = [a for a in range(n) if a != i]
    best = others[int(np.argmax([s[i, a] for a in others]))]
    correct.append(y[best] == y[i])
    pos += [s[i, p] for p in own + false_negatives]
    neg += [s[i, k] for k in negatives]
  return (np.mean(per_anchor), np.mean(correct), np.mean(pos), np.mean(neg),
          np.mean(eliminated))


def _run(z, pseudo_labels, devices, **kwargs):
  """(loss, metrics, grad) jitted over `devices` devices, batch-sharded."""
  fn = functools.partial(losses.get_with_metrics("ifnd"), temperature=TAU,
                         **kwargs)
  step = jax.jit(jax.value_and_grad(
      lambda z, p: fn(z, pseudo_labels=p), has_aux=True))
  mesh = sharding.make_mesh(devices=jax.devices()[:devices])
  with jax.set_mesh(mesh):
    put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
    (loss, metrics), grad = step(put(z), put(pseudo_labels))
  return float(loss), jax.device_get(metrics), np.asarray(grad)


@pytest.mark.parametrize("views", [2, 3])
def test_matches_reference_on_one_and_eight_devices(views):
  z = _embeddings(np.random.default_rng(views), 8, views, 5)
  loss, acc, pos, neg, found = _reference(z, PSEUDO, TAU)
  # Samples 0, 3, 5 have 2 others with their id, 2 and 7 one: 8 other
  # samples over 8, times the views.
  assert found == pytest.approx(views * 8 / 8)
  expected_grad = _finite_difference_grad(
      lambda x: _reference(x, PSEUDO, TAU)[0], z)
  for devices in (1, 8):
    got_loss, metrics, grad = _run(z, PSEUDO, devices)
    np.testing.assert_allclose(got_loss, loss, rtol=1e-5)
    assert set(metrics) == {"contrastive_acc", "pos_logit", "neg_logit",
                            "false_negatives_per_anchor"}
    np.testing.assert_allclose(metrics["contrastive_acc"], acc, rtol=1e-6)
    np.testing.assert_allclose(metrics["pos_logit"], pos, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(metrics["neg_logit"], neg, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(metrics["false_negatives_per_anchor"], found,
                               rtol=1e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-3, atol=1e-4)
  # Unjitted, without a mesh, plain `ifnd` gives the same value.
  np.testing.assert_allclose(
      losses.get("ifnd")(z, temperature=TAU, pseudo_labels=PSEUDO), loss,
      rtol=1e-5)


def test_false_negative_count_sees_the_global_batch_on_eight_devices():
  # 16 samples, 2 per device; a pseudo-class spans devices 0, 3 and 7.
  pseudo = np.arange(16, dtype=np.int32) + 100
  pseudo[[0, 7, 15]] = 5
  pseudo[[4, 5]] = 6
  z = _embeddings(np.random.default_rng(3), 16, 2, 4)
  expected = 2 * (3 * 2 + 2 * 1) / 16
  for devices in (1, 8):
    _, metrics, _ = _run(z, pseudo, devices)
    np.testing.assert_allclose(metrics["false_negatives_per_anchor"],
                               expected, rtol=1e-6)
  np.testing.assert_allclose(_run(z, pseudo, 8)[0],
                             _reference(z, pseudo, TAU)[0], rtol=1e-5)


def test_unique_ids_are_simclr_and_shared_ids_are_not():
  z = _embeddings(np.random.default_rng(7), 8, 2, 5)
  simclr = float(losses.get("simclr")(z, temperature=TAU))
  unique = np.arange(8, dtype=np.int32)[::-1].copy()
  loss, metrics = losses.get_with_metrics("ifnd")(z, temperature=TAU,
                                                  pseudo_labels=unique)
  assert float(loss) == pytest.approx(simclr, rel=1e-6)
  assert float(metrics["false_negatives_per_anchor"]) == 0.0
  _, simclr_metrics = losses.get_with_metrics("simclr")(z, temperature=TAU)
  for key, value in simclr_metrics.items():
    np.testing.assert_allclose(metrics[key], value, rtol=1e-6)
  shared = float(losses.get("ifnd")(z, temperature=TAU, pseudo_labels=PSEUDO))
  assert abs(shared - simclr) > 1e-3
  # Eliminating only removes denominator terms: the loss can only drop.
  assert shared < simclr


def test_one_pseudo_class_leaves_only_the_own_views():
  """Every sample with the same id: each anchor's denominator holds only its
  own other view, so with two views every term is -log 1 = 0."""
  z = _embeddings(np.random.default_rng(11), 8, 2, 5)
  same = np.full(8, 4, np.int32)
  fn = lambda x: losses.get("ifnd")(x, temperature=TAU, pseudo_labels=same)
  assert float(fn(z)) == pytest.approx(0.0, abs=1e-6)
  np.testing.assert_allclose(jax.grad(fn)(z), 0.0, atol=1e-6)
  _, metrics = losses.get_with_metrics("ifnd")(z, temperature=TAU,
                                               pseudo_labels=same)
  assert float(metrics["false_negatives_per_anchor"]) == pytest.approx(14.0)


def test_moving_an_eliminated_sample_leaves_its_partner_alone():
  """Samples 0 and 1 share an id. Moving sample 1 changes the library's
  summed loss by exactly the change of the other anchors' terms (samples
  1..5, from the reference): sample 0's anchors do not see sample 1."""
  rng = np.random.default_rng(12)
  z = _embeddings(rng, 6, 2, 4)
  pseudo = np.array([3, 3, 7, 8, 9, 10], np.int32)
  moved = z.copy()
  moved[1] = _embeddings(rng, 1, 2, 4)[0]
  ifnd = lambda x: float(losses.get("ifnd")(x, temperature=TAU,
                                            pseudo_labels=pseudo))
  # The anchors of samples 2..5 see sample 1 as a negative: from the
  # reference, their summed change is the whole change of the summed loss.
  def per_anchor_sum(x, samples):
    x = np.asarray(x, np.float64)
    flat = x.reshape(12, 4)
    y = np.repeat(pseudo, 2)
    total = 0.0
    for i in [2 * k + v for k in samples for v in (0, 1)]:
      s = flat @ flat[i] / TAU
      den = sum(np.exp(s[k]) for k in range(12)
                if k != i and (y[k] != y[i] or k // 2 == i // 2))
      total += np.log(den) - s[i ^ 1]
    return total
  change = (ifnd(moved) - ifnd(z)) * 12
  expected = (per_anchor_sum(moved, [1, 2, 3, 4, 5])
              - per_anchor_sum(z, [1, 2, 3, 4, 5]))
  np.testing.assert_allclose(change, expected, rtol=1e-4, atol=1e-5)
  assert per_anchor_sum(moved, [0]) == pytest.approx(per_anchor_sum(z, [0]),
                                                     rel=1e-12)


@pytest.mark.parametrize("kwargs,match", [
    (dict(labels="labels"), "use_labels=False"),
    (dict(pseudo_labels=None), "needs pseudo_labels"),
    (dict(pseudo_labels=np.zeros((6, 2), np.int32)), r"shape \[batch\]"),
    (dict(pseudo_labels=np.zeros(5, np.int32)), r"shape \[batch\]"),
    (dict(pseudo_labels=np.zeros(6, np.float32)), "integer ids"),
    (dict(loss_impl="blockwise"), "loss_impl='gather'"),
    (dict(loss_impl="ring"), "loss_impl='gather'"),
    (dict(temperature=0.0), "temperature must be > 0"),
])
def test_invalid_inputs(kwargs, match):
  z = _embeddings(np.random.default_rng(0), 6, 2, 4)
  call = dict(temperature=TAU, pseudo_labels=np.arange(6, dtype=np.int32))
  call.update(kwargs)
  labels = call.pop("labels", None)
  if labels is not None:
    labels = np.arange(6, dtype=np.int32)
  with pytest.raises(ValueError, match=match):
    losses.get("ifnd")(z, labels, **call)


def test_registered_with_its_extra_input():
  assert "ifnd" in losses.names()
  assert losses.extra_inputs("ifnd") == ("pseudo_labels",)
  assert "pseudo_labels" in losses.EXTRA_INPUTS
