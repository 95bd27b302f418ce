"""Losses against a float64 numpy transcription of the papers' equations."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive import losses
from contrastive import sharding


def _embeddings(rng, batch, views, dim):
  z = rng.normal(size=(batch, views, dim))
  return (z / np.linalg.norm(z, axis=-1, keepdims=True)).astype(np.float32)


def _reference(z, labels, temperature, variant="out", contrast_mode="all",
               base_temperature=None):
  """SupCon Eq. 2 / 3 of Khosla et al. (2020), anchor by anchor, float64.

  Returns (loss, contrastive_acc, pos_logit, neg_logit).
  """
  z = np.asarray(z, np.float64)
  batch, views, dim = z.shape
  if labels is None:
    labels = np.arange(batch)
  flat = z.reshape(batch * views, dim)
  y = np.repeat(np.asarray(labels), views)
  s = flat @ flat.T / temperature
  n = batch * views
  anchors = range(n) if contrast_mode == "all" else range(0, n, views)
  per_anchor, correct, pos, neg = [], [], [], []
  for i in anchors:
    others = [a for a in range(n) if a != i]
    positives = [p for p in others if y[p] == y[i]]
    pos += [s[i, p] for p in positives]
    neg += [s[i, a] for a in others if y[a] != y[i]]
    if not positives:
      continue
    denominator = sum(np.exp(s[i, a]) for a in others)
    if variant == "out":
      per_anchor.append(-np.mean(
          [np.log(np.exp(s[i, p]) / denominator) for p in positives]))
    else:
      per_anchor.append(-np.log(
          np.mean([np.exp(s[i, p]) for p in positives]) / denominator))
    best = others[int(np.argmax([s[i, a] for a in others]))]
    correct.append(y[best] == y[i])
  loss = np.mean(per_anchor) if per_anchor else 0.0
  if base_temperature is not None:
    loss *= temperature / base_temperature
  return loss, _mean(correct), _mean(pos), _mean(neg)


def _mean(values):
  return np.mean(values) if values else 0.0


def _finite_difference_grad(f, z, eps=1e-6):
  z = np.asarray(z, np.float64)
  grad = np.zeros_like(z)
  for index in np.ndindex(z.shape):
    step = np.zeros_like(z)
    step[index] = eps
    grad[index] = (f(z + step) - f(z - step)) / (2 * eps)
  return grad


def _assert_metrics(metrics, expected):
  _, acc, pos, neg = expected
  assert set(metrics) == {"contrastive_acc", "pos_logit", "neg_logit"}
  np.testing.assert_allclose(metrics["contrastive_acc"], acc, rtol=1e-6)
  np.testing.assert_allclose(metrics["pos_logit"], pos, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(metrics["neg_logit"], neg, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("views", [2, 3])
@pytest.mark.parametrize("contrast_mode", ["all", "one"])
@pytest.mark.parametrize("variant", ["out", "in"])
def test_supcon_matches_reference(variant, contrast_mode, views):
  rng = np.random.default_rng(views)
  z = _embeddings(rng, 10, views, 6)
  labels = rng.integers(0, 3, size=10).astype(np.int32)
  kwargs = dict(temperature=0.1, variant=variant, contrast_mode=contrast_mode)
  expected = _reference(z, labels, **kwargs)
  loss, metrics = losses.get_with_metrics("supcon")(z, labels, **kwargs)
  assert loss.dtype == jnp.float32 and loss.shape == ()
  np.testing.assert_allclose(loss, expected[0], rtol=1e-5)
  _assert_metrics(metrics, expected)
  np.testing.assert_allclose(losses.get("supcon")(z, labels, **kwargs),
                             loss, rtol=1e-6)


@pytest.mark.parametrize("variant,contrast_mode",
                         [("out", "all"), ("in", "all"), ("out", "one"),
                          ("in", "one")])
def test_supcon_gradient_matches_finite_differences(variant, contrast_mode):
  rng = np.random.default_rng(1)
  z = _embeddings(rng, 6, 2, 5)
  labels = np.array([0, 1, 0, 2, 1, 0], np.int32)
  kwargs = dict(temperature=0.2, variant=variant, contrast_mode=contrast_mode)
  grad = jax.grad(functools.partial(losses.get("supcon"), **kwargs))(
      z, labels)
  expected = _finite_difference_grad(
      lambda x: _reference(x, labels, **kwargs)[0], z)
  np.testing.assert_allclose(grad, expected, rtol=1e-3, atol=1e-4)


def test_simclr_matches_reference_and_gradient():
  rng = np.random.default_rng(2)
  z = _embeddings(rng, 6, 2, 5)
  loss, metrics = losses.get_with_metrics("simclr")(z, temperature=0.5)
  expected = _reference(z, None, 0.5)
  np.testing.assert_allclose(loss, expected[0], rtol=1e-5)
  _assert_metrics(metrics, expected)
  grad = jax.grad(functools.partial(losses.get("simclr"), temperature=0.5))(z)
  np.testing.assert_allclose(
      grad, _finite_difference_grad(lambda x: _reference(x, None, 0.5)[0], z),
      rtol=1e-3, atol=1e-4)


def test_simclr_equals_supcon_with_unique_labels():
  z = _embeddings(np.random.default_rng(3), 8, 2, 4)
  simclr = losses.get("simclr")(z, temperature=0.1)
  np.testing.assert_allclose(
      losses.get("supcon")(z, np.arange(8, dtype=np.int32)[::-1],
                           temperature=0.1), simclr, rtol=1e-6)
  np.testing.assert_allclose(losses.get("supcon")(z, temperature=0.1), simclr,
                             rtol=1e-6)


def test_simclr_rejects_labels():
  z = _embeddings(np.random.default_rng(0), 4, 2, 3)
  with pytest.raises(ValueError, match="supcon"):
    losses.get("simclr")(z, np.arange(4), temperature=0.1)


def test_base_temperature_rescales():
  rng = np.random.default_rng(4)
  z = _embeddings(rng, 8, 2, 4)
  labels = rng.integers(0, 3, size=8).astype(np.int32)
  supcon = losses.get("supcon")
  plain = supcon(z, labels, temperature=0.1)
  scaled = supcon(z, labels, temperature=0.1, base_temperature=0.07)
  np.testing.assert_allclose(scaled, plain * 0.1 / 0.07, rtol=1e-6)
  np.testing.assert_allclose(
      scaled, _reference(z, labels, 0.1, base_temperature=0.07)[0], rtol=1e-5)
  np.testing.assert_allclose(
      supcon(z, labels, temperature=0.1, base_temperature=0.1), plain,
      rtol=1e-6)


@pytest.mark.parametrize("variant", ["out", "in"])
def test_anchors_without_positives_are_excluded(variant):
  rng = np.random.default_rng(5)
  z = _embeddings(rng, 8, 1, 4)
  # With one view only samples sharing a label have positives.
  labels = np.array([0, 0, 1, 2, 3, 3, 3, 4], np.int32)
  loss, metrics = losses.get_with_metrics("supcon")(
      z, labels, temperature=0.1, variant=variant)
  expected = _reference(z, labels, 0.1, variant)
  np.testing.assert_allclose(loss, expected[0], rtol=1e-5)
  _assert_metrics(metrics, expected)


def test_no_positives_gives_zero_loss_and_gradient():
  z = _embeddings(np.random.default_rng(6), 8, 1, 4)
  for variant in ("out", "in"):
    for name, labels in (("simclr", None), ("supcon", np.arange(8))):
      kwargs = {} if name == "simclr" else {"variant": variant}
      fn = functools.partial(losses.get(name), temperature=0.05, **kwargs)
      loss, grad = jax.value_and_grad(fn)(z, labels)
      assert float(loss) == 0.0
      np.testing.assert_array_equal(grad, np.zeros_like(z))


def test_l_in_is_at_most_l_out():
  # Jensen: -log(mean(exp(x))) <= mean(-x), anchor by anchor.
  rng = np.random.default_rng(7)
  supcon = losses.get("supcon")
  for _ in range(5):
    z = _embeddings(rng, 12, 2, 4)
    labels = rng.integers(0, 3, size=12).astype(np.int32)
    assert (supcon(z, labels, temperature=0.1, variant="in")
            <= supcon(z, labels, temperature=0.1, variant="out") + 1e-6)


def test_bfloat16_inputs_are_computed_in_float32():
  rng = np.random.default_rng(8)
  z = jnp.asarray(_embeddings(rng, 16, 2, 8), jnp.bfloat16)
  labels = rng.integers(0, 4, size=16).astype(np.int32)
  loss = losses.get("supcon")(z, labels, temperature=0.05)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(
      loss, _reference(np.asarray(z, np.float32), labels, 0.05)[0], rtol=1e-5)


def test_accuracy_on_separated_samples():
  # Both views of sample i equal e_i: positives score 1/tau, the rest 0.
  z = np.repeat(np.eye(6, dtype=np.float32)[:, None], 2, axis=1)
  _, metrics = losses.get_with_metrics("simclr")(z, temperature=0.5)
  assert float(metrics["contrastive_acc"]) == 1.0
  np.testing.assert_allclose(metrics["pos_logit"], 2.0, rtol=1e-6)
  np.testing.assert_allclose(metrics["neg_logit"], 0.0, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(temperature=0.1, base_temperature=-1.0), "base_temperature"),
    (dict(temperature=0.1, variant="mean"), r"\('out', 'in'\)"),
    (dict(temperature=0.1, contrast_mode="two"), r"\('all', 'one'\)"),
])
def test_invalid_options(kwargs, match):
  z = _embeddings(np.random.default_rng(0), 4, 2, 3)
  with pytest.raises(ValueError, match=match):
    losses.get("supcon")(z, np.arange(4), **kwargs)


def test_invalid_shapes():
  z = _embeddings(np.random.default_rng(0), 4, 2, 3)
  supcon = losses.get("supcon")
  with pytest.raises(ValueError, match=r"\[batch, views, dim\]"):
    supcon(z.reshape(8, 3), temperature=0.1)
  with pytest.raises(ValueError, match=r"labels must have shape \[batch\]"):
    supcon(z, np.arange(8), temperature=0.1)
  with pytest.raises(ValueError, match="at least 2"):
    supcon(z[:1, :1], temperature=0.1)


def test_registry():
  assert {"simclr", "supcon"} <= set(losses.names())
  with pytest.raises(ValueError, match="simclr.*supcon"):
    losses.get("nt_xent")
  with pytest.raises(ValueError, match="registered"):
    losses.get_with_metrics("nt_xent")


def _value_and_grad(name, **kwargs):
  fn = functools.partial(losses.get_with_metrics(name), **kwargs)
  return jax.jit(jax.value_and_grad(fn, has_aux=True))


@pytest.mark.parametrize("name,views,kwargs", [
    ("simclr", 2, {}),
    ("supcon", 2, dict(variant="out", contrast_mode="all",
                       base_temperature=0.07)),
    ("supcon", 3, dict(variant="in", contrast_mode="one")),
])
def test_eight_devices_equal_one(name, views, kwargs):
  rng = np.random.default_rng(9)
  z = _embeddings(rng, 16, views, 8)
  labels = (None if name == "simclr"
            else rng.integers(0, 3, size=16).astype(np.int32))
  step = _value_and_grad(name, temperature=0.1, **kwargs)
  (loss1, metrics1), grad1 = step(z, labels)
  mesh = sharding.make_mesh()
  assert mesh.shape[sharding.DATA_AXIS] == 8
  with jax.set_mesh(mesh):
    put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
    (loss8, metrics8), grad8 = step(
        put(z), None if labels is None else put(labels))
  assert grad8.sharding.is_equivalent_to(sharding.batch_sharding(mesh), 3)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  for key in metrics1:
    np.testing.assert_allclose(metrics8[key], metrics1[key], rtol=1e-5,
                               atol=1e-6)
  grad1, grad8 = np.asarray(grad1), np.asarray(grad8)
  assert np.abs(grad1).max() > 0
  np.testing.assert_allclose(grad8, grad1, rtol=1e-5,
                             atol=1e-5 * np.abs(grad1).max())
  # And the value is the paper's.
  np.testing.assert_allclose(
      loss1, _reference(z, labels, 0.1, **kwargs)[0], rtol=1e-5)


def test_sharded_logits_are_local_rows_only():
  """Each device holds [its anchors, all views] logits, never the square."""
  batch, views, dim = 256, 2, 16
  total, local = batch * views, batch * views // 8
  z = jax.ShapeDtypeStruct((batch, views, dim), jnp.float32)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  step = _value_and_grad("supcon", temperature=0.1)
  square = re.compile(rf"f32\[{total},{total}\]")
  # Control: the detector does see the square matrix on one device.
  assert square.search(step.lower(z, labels).compile().as_text())
  mesh = sharding.make_mesh()
  with jax.set_mesh(mesh):
    z = jax.ShapeDtypeStruct(z.shape, z.dtype,
                             sharding=sharding.batch_sharding(mesh))
    labels = jax.ShapeDtypeStruct(labels.shape, labels.dtype,
                                  sharding=sharding.batch_sharding(mesh))
    hlo = step.lower(z, labels).compile().as_text()
  assert not square.search(hlo)
  assert re.search(rf"f32\[{local},{total}\]", hlo)
