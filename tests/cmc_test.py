"""CMC (Contrastive Multiview Coding) against a float64 numpy transcription
of the paper's two-view InfoNCE, summed over the view graph."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive import losses
from contrastive.losses import cmc
from losses_test import _embeddings
from losses_test import _finite_difference_grad
from moco_test import _assert_matches
from moco_test import _cross_view_infonce
from moco_test import _loss
from moco_test import _run


def _lse(x):
  return x.max() + np.log(np.exp(x - x.max()).sum())


def _graph(views, graph, core_view):
  """Unordered view pairs: all of them, or those with the core view."""
  if graph == "full_graph":
    return [(a, b) for a in range(views) for b in range(a + 1, views)]
  return [(core_view, b) for b in range(views) if b != core_view]


def _cmc_reference(z, temperature, graph="full_graph", core_view=0):
  """sum_{pairs} L(V_a, V_b) + L(V_b, V_a), L(V_a, V_b) = mean_i
  -log exp(z_ia.z_ib/t) / sum_k exp(z_ia.z_kb/t), float64.

  Returns (loss, contrastive_acc, pos_logit, neg_logit), the metrics over
  every (sample, ordered pair).
  """
  z = np.asarray(z, np.float64)
  batch, views, _ = z.shape
  loss, correct, pos, neg = 0.0, [], [], []
  for a, b in _graph(views, graph, core_view):
    for anchor, contrast in ((a, b), (b, a)):
      terms = []
      for i in range(batch):
        s = np.array([z[i, anchor] @ z[k, contrast] / temperature
                      for k in range(batch)])
        terms.append(_lse(s) - s[i])
        correct.append(np.argmax(s) == i)
        pos.append(s[i])
        neg.extend(np.delete(s, i))
      loss += np.mean(terms)
  return loss, np.mean(correct), np.mean(pos), np.mean(neg)


def _z(seed, batch=8, views=3, dim=5):
  return _embeddings(np.random.default_rng(seed), batch, views, dim)


# Compilation dominates on 2 cores: one configuration per device count and
# graph.
@pytest.mark.parametrize("graph,core_view,devices", [
    ("full_graph", 0, 1), ("full_graph", 0, 8), ("core_view", 1, 8),
    ("core_view", 0, 1)])
def test_matches_reference(graph, core_view, devices):
  z = _z(0)
  tau = 0.3
  expected = _cmc_reference(z, tau, graph, core_view)
  grad_ref = _finite_difference_grad(
      lambda x: _cmc_reference(x, tau, graph, core_view)[0], z)
  result = _run("cmc", z, devices, temperature=tau, graph=graph,
                core_view=core_view)
  _assert_matches(result, expected[0], grad_ref, expected[1:])
  # Every view, anchor or contrast side, receives gradient.
  assert (np.abs(result[2][0]).max(axis=(0, 2)) > 0).all()


def test_two_views_graphs_agree_and_match_moco():
  """M = 2: both graphs are L(V_0, V_1) + L(V_1, V_0), twice MoCo's loss
  with keys = z and no queue (MoCo averages the two directions)."""
  z = _z(1, views=2)
  tau = 0.2
  full = _loss("cmc", z, temperature=tau)
  core = _loss("cmc", z, temperature=tau, graph="core_view", core_view=1)
  mocov = _loss("moco", z, temperature=tau, keys=z, queue=None)
  np.testing.assert_allclose(full, core, rtol=1e-6)
  np.testing.assert_allclose(full, 2 * mocov, rtol=1e-6)
  np.testing.assert_allclose(full, 2 * _cross_view_infonce(z, z, tau),
                             rtol=1e-5)
  np.testing.assert_allclose(full, _cmc_reference(z, tau)[0], rtol=1e-5)
  metrics = jax.jit(lambda z: (
      losses.get_with_metrics("cmc")(z, temperature=tau)[1],
      losses.get_with_metrics("moco")(z, temperature=tau, keys=z,
                                      queue=None)[1]))(z)
  for name in ("contrastive_acc", "pos_logit", "neg_logit"):
    np.testing.assert_allclose(metrics[0][name], metrics[1][name], rtol=1e-6)


def test_objective_is_a_sum_over_view_pairs():
  z = _z(2, views=3)
  tau = 0.25
  pair = lambda a, b: _loss("cmc", z[:, [a, b]], temperature=tau)
  np.testing.assert_allclose(
      _loss("cmc", z, temperature=tau),
      pair(0, 1) + pair(0, 2) + pair(1, 2), rtol=1e-5)
  np.testing.assert_allclose(
      _loss("cmc", z, temperature=tau, graph="core_view", core_view=2),
      pair(2, 0) + pair(2, 1), rtol=1e-5)


def test_low_precision_inputs_compute_in_float32():
  z = _z(3)
  fn = jax.jit(lambda z: losses.get("cmc")(z, temperature=0.2))
  low = fn(jnp.asarray(z, jnp.bfloat16))
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(low, fn(z), rtol=2e-2)


def test_view_pairs():
  assert cmc.view_pairs(3) == ((0, 1), (1, 0), (0, 2), (2, 0), (1, 2),
                               (2, 1))
  assert cmc.view_pairs(3, "core_view", 1) == ((1, 0), (0, 1), (1, 2),
                                               (2, 1))


def test_clear_errors():
  z = _z(4, batch=4)
  fn = losses.get("cmc")
  with pytest.raises(ValueError, match="cmc takes no labels"):
    fn(z, np.zeros(4, np.int32), temperature=0.2)
  with pytest.raises(ValueError, match="at least 2 views"):
    fn(z[:, :1], temperature=0.2)
  with pytest.raises(ValueError, match="graph must be one of"):
    fn(z, temperature=0.2, graph="star")
  for core_view in (-1, 3, 1.0, True):
    with pytest.raises(ValueError, match="core_view must be"):
      fn(z, temperature=0.2, graph="core_view", core_view=core_view)
  for temperature in (0.0, -0.1):
    with pytest.raises(ValueError, match="temperature must be > 0"):
      fn(z, temperature=temperature)
  with pytest.raises(ValueError, match="cmc supports only "
                     "loss_impl='gather'"):
    fn(z, temperature=0.2, loss_impl="blockwise")


def test_registry():
  assert "cmc" in losses.names()
  assert losses.get("cmc") is cmc.cmc
  assert losses.get_with_metrics("cmc") is cmc.cmc_with_metrics
  assert losses.extra_inputs("cmc") == ()


# The trainer with CMC's multiview model.


@pytest.mark.slow
def test_train_step_contrasts_the_modality_encoders_on_eight_devices():
  import momentum_train_test as helpers  # pylint: disable=g-import-not-at-top
  from configs import smoke_fashion_mnist  # pylint: disable=g-import-not-at-top
  from contrastive import sharding  # pylint: disable=g-import-not-at-top
  config = smoke_fashion_mnist.get_config("cmc")
  config.model.update(depth=10, width=0.125)
  config.model.head.update(hidden_dims=(32,), out_dim=16)
  rng = np.random.default_rng(0)
  batches = [{"image": rng.uniform(size=(helpers.BATCH, 1,
                                         *helpers.IMAGE_SHAPE)
                                   ).astype(np.float32),
              "label": rng.integers(0, 4, helpers.BATCH).astype(np.int32)}
             for _ in range(2)]
  model, initial, _ = helpers._setup(config, sharding.make_mesh())  # pylint: disable=protected-access
  initial = jax.device_get(initial)
  # The first step's loss is CMC over the two modality embeddings of the
  # initial model (train-mode BN over the batch).
  outputs, _ = model.apply(
      {"params": initial.params, "batch_stats": initial.batch_stats},
      batches[0]["image"][:, 0], train=True, mutable=["batch_stats"])
  assert outputs["embedding"].shape == (helpers.BATCH, 2, 16)
  expected = _loss("cmc", np.asarray(outputs["embedding"]), temperature=0.2)
  one = helpers._run(config, sharding.make_mesh(devices=jax.devices()[:1]), batches)  # pylint: disable=protected-access
  eight = helpers._run(config, sharding.make_mesh(), batches)  # pylint: disable=protected-access
  np.testing.assert_allclose(one[1][0]["loss"], expected, rtol=1e-4)
  for m1, m8 in zip(one[1], eight[1]):
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  assert one[1][1]["loss"] != one[1][0]["loss"]
