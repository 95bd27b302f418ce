"""The in-batch family (SupCon options, DCL/DCLW, epsilon losses, FairKL)
against float64 numpy transcriptions of the papers' equations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive import losses
from contrastive import sharding
from contrastive.losses import fnc
from contrastive.losses import infonce
from contrastive.losses import unbiased
from losses_test import _embeddings
from losses_test import _finite_difference_grad
from streaming_test import _assert_same
from streaming_test import _run


def _reference(z, labels, temperature, *, denominator="all", summation="out",
               epsilon=0.0, positives_cap=-1, contrast_mode="all",
               alignment_weight=None):
  """The family's loss, anchor by anchor, float64.

  Positives: other views with the anchor's label, of which at most
  `positives_cap / views` other samples (the first in batch order);
  negatives: views with another label. Denominator of positive p:
  sum_neg exp(s) + exp(-epsilon) * (sum over all positives | exp(s_ip) |
  nothing). out: mean_p [log den_p - a * s_ip]; in: -log mean_p
  exp(s_ip) / den_p. `alignment_weight[k]` is `a` for sample k's views.
  """
  z = np.asarray(z, np.float64)
  batch, views, dim = z.shape
  labels = np.arange(batch) if labels is None else np.asarray(labels)
  flat = z.reshape(batch * views, dim)
  s = flat @ flat.T / temperature
  n = batch * views
  sample = lambda j: j // views
  anchors = range(n) if contrast_mode == "all" else range(0, n, views)
  per_anchor = []
  for i in anchors:
    k = sample(i)
    others = [t for t in range(batch) if t != k and labels[t] == labels[k]]
    if positives_cap >= 0:
      others = others[:positives_cap // views]
    positives = [j for j in range(n) if j != i and
                 (sample(j) == k or sample(j) in others)]
    negatives = [j for j in range(n) if labels[sample(j)] != labels[k]]
    if not positives:
      continue
    if denominator == "only_negatives" and not negatives:
      continue
    neg = sum(np.exp(s[i, j]) for j in negatives)
    a = 1.0 if alignment_weight is None else alignment_weight[k]
    terms = []
    for p in positives:
      if denominator == "all":
        den = neg + np.exp(-epsilon) * sum(np.exp(s[i, q]) for q in positives)
      elif denominator == "one_positive":
        den = neg + np.exp(-epsilon) * np.exp(s[i, p])
      else:
        den = neg
      terms.append((np.log(den) - a * s[i, p]) if summation == "out"
                   else np.exp(s[i, p]) / den)
    per_anchor.append(np.mean(terms) if summation == "out"
                      else -np.log(np.mean(terms)))
  return np.mean(per_anchor) if per_anchor else 0.0


def _dclw_weights(z, sigma):
  """w_k = 2 - exp(cos_k / sigma) / mean_j exp(cos_j / sigma), float64."""
  z = np.asarray(z, np.float64)
  e = np.exp(np.sum(z[:, 0] * z[:, 1], axis=-1) / sigma)
  return 2.0 - e / e.mean()


# name -> (loss kwargs, reference kwargs, labelled, views).
CASES = {
    "supcon_one_positive_out": (
        dict(denominator_mode="one_positive"),
        dict(denominator="one_positive"), True, 2),
    "supcon_one_positive_in_3_views": (
        dict(denominator_mode="one_positive", variant="in"),
        dict(denominator="one_positive", summation="in"), True, 3),
    "supcon_only_negatives_out": (
        dict(denominator_mode="only_negatives"),
        dict(denominator="only_negatives"), True, 2),
    "supcon_only_negatives_in_one": (
        dict(denominator_mode="only_negatives", variant="in",
             contrast_mode="one"),
        dict(denominator="only_negatives", summation="in",
             contrast_mode="one"), True, 2),
    "supcon_cap_2": (dict(positives_cap=2), dict(positives_cap=2), True, 2),
    "supcon_cap_0_in_one_positive": (
        dict(positives_cap=0, variant="in", denominator_mode="one_positive"),
        dict(positives_cap=0, summation="in", denominator="one_positive"),
        True, 2),
    "supcon_cap_3_views": (dict(positives_cap=3), dict(positives_cap=3),
                           True, 3),
    "dcl": ({}, dict(denominator="only_negatives"), False, 2),
    "dcl_3_views": ({}, dict(denominator="only_negatives"), False, 3),
    "eps_supinfonce": (dict(epsilon=0.5),
                       dict(denominator="one_positive", epsilon=0.5), True, 2),
    "eps_supinfonce_unsupervised": (
        dict(epsilon=0.3), dict(denominator="one_positive", epsilon=0.3),
        False, 3),
    "eps_supcon": (dict(epsilon=0.5), dict(epsilon=0.5), True, 2),
    "eps_supcon_one": (dict(epsilon=1.0, contrast_mode="one"),
                       dict(epsilon=1.0, contrast_mode="one"), True, 3),
}


def _loss_name(case):
  for name in ("eps_supinfonce", "eps_supcon", "dclw", "dcl"):
    if case.startswith(name):
      return name
  return "supcon"


def _inputs(case, seed, batch=8, dim=5):
  _, _, labelled, views = CASES[case]
  rng = np.random.default_rng(seed)
  z = _embeddings(rng, batch, views, dim)
  labels = (rng.integers(0, 3, size=batch).astype(np.int32) if labelled
            else None)
  return z, labels


@pytest.mark.parametrize("case", sorted(CASES))
def test_value_and_gradient_match_reference(case):
  kwargs, ref_kwargs, _, _ = CASES[case]
  z, labels = _inputs(case, seed=len(case))
  fn = functools.partial(losses.get(_loss_name(case)), temperature=0.2,
                         **kwargs)
  expected = _reference(z, labels, 0.2, **ref_kwargs)
  np.testing.assert_allclose(fn(z, labels), expected, rtol=1e-5)
  grad = jax.grad(fn)(z, labels)
  expected_grad = _finite_difference_grad(
      lambda x: _reference(x, labels, 0.2, **ref_kwargs), z)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-3, atol=1e-4)


def test_dclw_matches_reference():
  rng = np.random.default_rng(5)
  z = _embeddings(rng, 8, 2, 5)
  fn = functools.partial(losses.get("dclw"), temperature=0.2, sigma=0.5)
  reference = lambda x: _reference(
      x, None, 0.2, denominator="only_negatives",
      alignment_weight=_dclw_weights(x, 0.5))
  np.testing.assert_allclose(fn(z), reference(z), rtol=1e-5)
  # The weights are differentiated through (as lightly does) ...
  np.testing.assert_allclose(jax.grad(fn)(z),
                             _finite_difference_grad(reference, z),
                             rtol=1e-3, atol=1e-4)
  # ... unless asked not to.
  weights = _dclw_weights(z, 0.5)
  frozen = lambda x: _reference(x, None, 0.2, denominator="only_negatives",
                                alignment_weight=weights)
  np.testing.assert_allclose(
      jax.grad(functools.partial(fn, stop_weight_gradient=True))(z),
      _finite_difference_grad(frozen, z), rtol=1e-3, atol=1e-4)


def test_degenerate_settings_reduce_to_known_losses():
  rng = np.random.default_rng(6)
  z = _embeddings(rng, 12, 2, 6)
  labels = rng.integers(0, 4, size=12).astype(np.int32)
  get = lambda name, *args, **kwargs: float(
      losses.get(name)(*args, temperature=0.1, **kwargs))
  # epsilon = 0: SupInfoNCE is SupCon's one_positive denominator, and
  # epsilon-SupCon is SupCon.
  assert get("eps_supinfonce", z, labels, epsilon=0.0) == pytest.approx(
      get("supcon", z, labels, denominator_mode="one_positive"), rel=1e-6)
  assert get("eps_supcon", z, labels, epsilon=0.0) == pytest.approx(
      get("supcon", z, labels), rel=1e-6)
  # A margin makes the loss larger: positives weigh less in the denominator.
  assert get("eps_supcon", z, labels, epsilon=1.0) < get("supcon", z, labels)
  # Unique labels + only_negatives is DCL; with two views one_positive is
  # SimCLR (each anchor has a single positive).
  unique = np.arange(12, dtype=np.int32)
  assert get("supcon", z, unique, denominator_mode="only_negatives") == (
      pytest.approx(get("dcl", z), rel=1e-6))
  assert get("supcon", z, unique, denominator_mode="one_positive") == (
      pytest.approx(get("simclr", z), rel=1e-6))
  # DCLW with equal positive similarities has weights 1: DCL.
  same = np.repeat(z[:, :1], 2, axis=1)
  assert get("dclw", same) == pytest.approx(get("dcl", same), rel=1e-6)
  # A cap that exceeds every class's size changes nothing.
  assert get("supcon", z, labels, positives_cap=24) == pytest.approx(
      get("supcon", z, labels), rel=1e-6)


SHARDED = {
    "supcon_one_positive": ("supcon", True, 2,
                            dict(denominator_mode="one_positive")),
    "supcon_only_negatives_in": ("supcon", True, 2,
                                 dict(denominator_mode="only_negatives",
                                      variant="in")),
    "supcon_cap": ("supcon", True, 3, dict(positives_cap=3)),
    "dcl": ("dcl", False, 2, {}),
    "dclw": ("dclw", False, 2, {}),
    "eps_supinfonce": ("eps_supinfonce", True, 2, dict(epsilon=0.5)),
    "eps_supcon": ("eps_supcon", True, 2, dict(epsilon=0.5)),
}
STREAMABLE = ("supcon_only_negatives_in", "dcl", "dclw", "eps_supcon")


@pytest.mark.parametrize("case", sorted(SHARDED))
def test_eight_devices_equal_one_and_streamed_equals_gather(case):
  name, labelled, views, kwargs = SHARDED[case]
  rng = np.random.default_rng(len(case))
  z = _embeddings(rng, 32, views, 8)
  labels = rng.integers(0, 5, size=32).astype(np.int32) if labelled else None
  one = _run(name, z, labels, 1, temperature=0.1, **kwargs)
  _assert_same(_run(name, z, labels, 8, temperature=0.1, **kwargs), one)
  if case in STREAMABLE:
    for impl in ("blockwise", "ring"):
      # A block of 5 does not divide the columns: padding is exercised.
      _assert_same(_run(name, z, labels, 8, temperature=0.1, loss_impl=impl,
                        block_size=5, **kwargs), one)


def test_options_that_need_every_pair_refuse_streaming():
  z = _embeddings(np.random.default_rng(0), 8, 2, 4)
  labels = np.arange(8, dtype=np.int32) % 3
  for name, kwargs in (("eps_supinfonce", dict(epsilon=0.1)),
                       ("supcon", dict(denominator_mode="one_positive")),
                       ("supcon", dict(positives_cap=2))):
    with pytest.raises(ValueError, match="loss_impl='gather'"):
      losses.get(name)(z, labels, temperature=0.1, loss_impl="blockwise",
                       **kwargs)


@pytest.mark.parametrize("name,args,kwargs,match", [
    ("supcon", "labels", dict(positives_cap=3), "multiple of the 2 views"),
    ("supcon", "labels", dict(denominator_mode="some"), "one_positive"),
    ("dcl", "labels", {}, "takes no labels"),
    ("dclw", "three_views", {}, "two views"),
    ("eps_supcon", "labels", dict(epsilon=-0.1), "epsilon must be >= 0"),
    ("dclw", "none", dict(sigma=0.0), "sigma must be > 0"),
])
def test_invalid_options(name, args, kwargs, match):
  rng = np.random.default_rng(0)
  z = _embeddings(rng, 6, 3 if args == "three_views" else 2, 4)
  labels = np.arange(6, dtype=np.int32) % 2 if args == "labels" else None
  with pytest.raises(ValueError, match=match):
    losses.get(name)(z, labels, temperature=0.1, **kwargs)


def _fairkl_reference(features, labels, bias, kld):
  """FairKL over pairs i != j: means and (population) deviations per set."""
  f = np.asarray(features, np.float64)
  s = f @ f.T
  sets = {key: [] for key in ("pa", "pc", "na", "nc")}
  for i in range(len(f)):
    for j in range(len(f)):
      if i != j:
        key = ("p" if labels[i] == labels[j] else "n") + (
            "a" if bias[i] == bias[j] else "c")
        sets[key].append(s[i, j])
  mu = {k: np.mean(v) for k, v in sets.items()}
  sd = {k: np.std(v) for k, v in sets.items()}
  return ((mu["pc"] - mu["pa"])**2 + (mu["na"] - mu["nc"])**2
          + kld * ((sd["pa"] - sd["pc"])**2 + (sd["na"] - sd["nc"])**2)
          - mu["pc"] + mu["na"])


def test_fairkl_matches_reference_on_one_and_eight_devices():
  rng = np.random.default_rng(7)
  features = _embeddings(rng, 16, 1, 6)[:, 0]
  labels = rng.integers(0, 3, size=16).astype(np.int32)
  bias = rng.integers(0, 2, size=16).astype(np.int32)
  fn = functools.partial(unbiased.fairkl_regulariser, kld=0.7)
  expected = _fairkl_reference(features, labels, bias, 0.7)
  np.testing.assert_allclose(fn(features, labels, bias), expected, rtol=1e-4)
  expected_grad = _finite_difference_grad(
      lambda x: _fairkl_reference(x, labels, bias, 0.7), features)
  grad = jax.grad(fn)(features, labels, bias)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-3, atol=1e-4)
  mesh = sharding.make_mesh()
  with jax.set_mesh(mesh):
    put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
    value, grad8 = jax.jit(jax.value_and_grad(fn))(
        put(features), put(labels), put(bias))
  np.testing.assert_allclose(value, expected, rtol=1e-4)
  np.testing.assert_allclose(grad8, grad, rtol=1e-4, atol=1e-5)


def test_fairkl_needs_bias_labels():
  features = _embeddings(np.random.default_rng(0), 4, 1, 3)[:, 0]
  with pytest.raises(ValueError, match="bias_labels"):
    unbiased.fairkl_regulariser(features, np.arange(4), None)


def test_config_check_names_each_loss_options():
  from configs import smoke_fashion_mnist  # pylint: disable=g-import-not-at-top
  from contrastive import config_checks  # pylint: disable=g-import-not-at-top
  config = smoke_fashion_mnist.get_config("dclw")
  config_checks.validate(config)
  config.loss.kwargs = dict(epsilon=0.1)
  with pytest.raises(ValueError, match=r"\['epsilon'\].*'dclw'.*'sigma'"):
    config_checks.validate(config)
  # Inputs the trainer supplies are not options.
  config = smoke_fashion_mnist.get_config("eps_supinfonce")
  config.loss.name = "fairkl"
  config.loss.kwargs = dict(epsilon=0.1, lambd=2.0)
  config_checks.validate(config)
  config.loss.kwargs = dict(bias_labels=0)
  with pytest.raises(ValueError, match=r"\['bias_labels'\]"):
    config_checks.validate(config)


def _esupcon_reference(z, prototypes, labels, temperature):
  """ESupCon from the math: every anchor view's contrast set is the other
  views plus the normalised prototypes; positives are same-class views and
  the anchor's class prototype (SupCon L_out over that set), float64."""
  z = np.asarray(z, np.float64)
  w = np.asarray(prototypes, np.float64)
  w = w / np.linalg.norm(w, axis=1, keepdims=True)
  batch, views, dim = z.shape
  flat = z.reshape(-1, dim)
  y = np.repeat(labels, views)
  per_anchor = []
  for i in range(len(flat)):
    others = [(flat[j] @ flat[i] / temperature, y[j] == y[i])
              for j in range(len(flat)) if j != i]
    others += [(w[c] @ flat[i] / temperature, c == y[i])
               for c in range(len(w))]
    log_den = np.log(sum(np.exp(s) for s, _ in others))
    per_anchor.append(np.mean([log_den - s for s, pos in others if pos]))
  return np.mean(per_anchor)


def _esupcon_loss(z, prototypes, labels, **kwargs):
  w = prototypes / jnp.linalg.norm(prototypes, axis=1, keepdims=True)
  return losses.get_with_metrics("esupcon")(
      z, labels, prototype_cosines=jnp.einsum("bvd,kd->bvk", z, w),
      **kwargs)


def test_esupcon_matches_reference_on_one_and_eight_devices():
  rng = np.random.default_rng(8)
  z = _embeddings(rng, 8, 2, 5)
  prototypes = rng.normal(size=(4, 5)).astype(np.float32)
  labels = rng.integers(0, 4, size=8).astype(np.int32)
  fn = lambda z, w: _esupcon_loss(z, w, labels, temperature=0.2)[0]
  expected = _esupcon_reference(z, prototypes, labels, 0.2)
  np.testing.assert_allclose(fn(z, prototypes), expected, rtol=1e-5)
  grad_z, grad_w = jax.grad(fn, argnums=(0, 1))(z, prototypes)
  np.testing.assert_allclose(grad_z, _finite_difference_grad(
      lambda x: _esupcon_reference(x, prototypes, labels, 0.2), z),
                             rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(grad_w, _finite_difference_grad(
      lambda x: _esupcon_reference(z, x, labels, 0.2), prototypes),
                             rtol=1e-3, atol=1e-4)
  # 8 devices, every impl: same value and gradients.
  z = _embeddings(rng, 32, 2, 8)
  prototypes = rng.normal(size=(5, 8)).astype(np.float32)
  labels = rng.integers(0, 5, size=32).astype(np.int32)
  expected = jax.value_and_grad(
      lambda z, w: _esupcon_loss(z, w, labels, temperature=0.1)[0],
      argnums=(0, 1))(z, prototypes)
  mesh = sharding.make_mesh()
  for impl in ("gather", "blockwise", "ring"):
    fn = jax.jit(jax.value_and_grad(
        lambda z, w, y: _esupcon_loss(z, w, y, temperature=0.1,
                                      loss_impl=impl, block_size=5)[0],
        argnums=(0, 1)))
    with jax.set_mesh(mesh):
      put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
      value, (grad_z, grad_w) = fn(put(z), prototypes, put(labels))
    np.testing.assert_allclose(value, expected[0], rtol=1e-5)
    np.testing.assert_allclose(grad_z, expected[1][0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grad_w, expected[1][1], rtol=1e-4, atol=1e-6)


def test_esupcon_reports_prototype_accuracy_and_needs_prototypes():
  rng = np.random.default_rng(9)
  labels = np.array([0, 1, 2, 0], np.int32)
  prototypes = np.eye(3, 4, dtype=np.float32)
  # Each sample's views sit on its class's prototype: accuracy 1.
  z = np.repeat(prototypes[labels][:, None], 2, axis=1)
  _, metrics = _esupcon_loss(z, prototypes, labels, temperature=0.1)
  assert float(metrics["prototype_top1"]) == 1.0
  with pytest.raises(ValueError, match="num_prototypes"):
    losses.get("esupcon")(_embeddings(rng, 4, 2, 4), labels, temperature=0.1,
                          prototype_cosines=None)


def _unicon_reference(z, u, labels, temperature):
  """UniConLoss as the official code computes it, float64: anchors z_i,
  contrast set the universum u_j (j != i), positives same base label."""
  z = np.asarray(z, np.float64).reshape(-1, z.shape[-1])
  u = np.asarray(u, np.float64).reshape(-1, u.shape[-1])
  views = len(z) // len(labels)
  y = np.repeat(labels, views)
  per_anchor = []
  for i in range(len(z)):
    others = [j for j in range(len(u)) if j != i]
    log_den = np.log(sum(np.exp(z[i] @ u[j] / temperature) for j in others))
    positives = [j for j in others if y[j] == y[i]]
    per_anchor.append(np.mean([log_den - z[i] @ u[j] / temperature
                               for j in positives]))
  return np.mean(per_anchor)


def test_unicon_matches_reference_on_one_and_eight_devices():
  rng = np.random.default_rng(10)
  z, u = _embeddings(rng, 8, 2, 5), _embeddings(rng, 8, 2, 5)
  labels = rng.integers(0, 3, size=8).astype(np.int32)
  fn = lambda z, u: losses.get("unicon")(z, labels, temperature=0.2,
                                         universum=u)
  np.testing.assert_allclose(fn(z, u), _unicon_reference(z, u, labels, 0.2),
                             rtol=1e-5)
  grad_z, grad_u = jax.grad(fn, argnums=(0, 1))(z, u)
  np.testing.assert_allclose(grad_z, _finite_difference_grad(
      lambda x: _unicon_reference(x, u, labels, 0.2), z), rtol=1e-3,
                             atol=1e-4)
  np.testing.assert_allclose(grad_u, _finite_difference_grad(
      lambda x: _unicon_reference(z, x, labels, 0.2), u), rtol=1e-3,
                             atol=1e-4)
  z, u = _embeddings(rng, 32, 2, 8), _embeddings(rng, 32, 2, 8)
  labels = rng.integers(0, 5, size=32).astype(np.int32)
  value_and_grad = lambda impl: jax.jit(jax.value_and_grad(
      lambda z, u, y: losses.get("unicon")(
          z, y, temperature=0.1, universum=u, loss_impl=impl, block_size=5),
      argnums=(0, 1)))
  expected = value_and_grad("gather")(z, u, labels)
  mesh = sharding.make_mesh()
  with jax.set_mesh(mesh):
    put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
    for impl in ("gather", "blockwise", "ring"):
      value, grads = value_and_grad(impl)(put(z), put(u), put(labels))
      np.testing.assert_allclose(value, expected[0], rtol=1e-5)
      for got, want in zip(grads, expected[1]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_universum_mixes_each_view_with_another_class(mix):
  from contrastive.losses import unicon  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(11)
  images = rng.uniform(size=(16, 2, 6, 6, 1)).astype(np.float32)
  # Each device's two samples differ in class (a one-class shard has no
  # other-class partner to draw).
  labels = (np.arange(16) % 4).astype(np.int32)
  mesh = sharding.make_mesh()
  with jax.set_mesh(mesh):
    put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
    universum = np.asarray(jax.jit(
        lambda x, y: unicon.make_universum(x, y, jax.random.key(0), mix=mix))(
            put(images), put(labels)))
  flat = images.reshape(-1, 6, 6, 1)
  flat_labels = np.repeat(labels, 2)
  shard = len(flat) // 8  # Partners come from the same device's rows.
  for j, u in enumerate(universum.reshape(-1, 6, 6, 1)):
    if mix == "mixup":
      partner = (u - 0.5 * flat[j]) / 0.5
      own = np.zeros_like(u, bool)
    else:
      own = np.isclose(u, flat[j])
      partner = u
    local = range(j // shard * shard, (j // shard + 1) * shard)
    matches = [k for k in local
               if np.allclose(partner[~own], flat[k][~own], atol=1e-5)]
    assert matches and all(flat_labels[k] != flat_labels[j] for k in matches)
    if mix == "cutmix":
      # A box of half the area (rounded to whole pixels) is the own image.
      assert 16 <= own.sum() <= 18


def _fnc_reference(z, temperature, mode, topk, threshold):
  """FNC from the official objective's description, float64: each sample's
  false negatives are the top-k other-sample views by best cosine with any
  of its views, above the threshold; attraction adds them to the positives,
  elimination drops them from the denominator. Returns (loss, fn count)."""
  z = np.asarray(z, np.float64)
  batch, views, dim = z.shape
  flat = z.reshape(-1, dim)
  per_anchor, found = [], 0
  for k in range(batch):
    others = [j for j in range(len(flat)) if j // views != k]
    score = {j: max(z[k, v] @ flat[j] for v in range(views)) for j in others}
    ranked = sorted(others, key=lambda j: -score[j])[:topk]
    false = {j for j in ranked if score[j] > threshold}
    for v in range(views):
      i = k * views + v
      found += len(false)
      s = flat @ flat[i] / temperature
      positives = [k * views + w for w in range(views) if w != v]
      denominator = [j for j in range(len(flat)) if j != i]
      if mode == "attract":
        positives += sorted(false)
      else:
        denominator = [j for j in denominator if j not in false]
      log_den = np.log(sum(np.exp(s[j]) for j in denominator))
      per_anchor.append(log_den - np.mean([s[p] for p in positives]))
  return np.mean(per_anchor), found / (batch * views)


@pytest.mark.parametrize("name,mode,views", [
    ("fnc", "attract", 2), ("fnc", "attract", 4), ("fnc", "eliminate", 3),
    ("fn_removal", "eliminate", 2)])
def test_false_negative_losses_match_reference(name, mode, views):
  rng = np.random.default_rng(views)
  # Few dimensions: cosines are high, so the detector finds some.
  z = _embeddings(rng, 8, views, 3)
  kwargs = dict(temperature=0.2, fn_topk=3, fn_threshold=0.5)
  if name == "fnc":
    kwargs["fn_mode"] = mode
  expected, found = _fnc_reference(z, 0.2, mode, 3, 0.5)
  assert found > 0
  fn = functools.partial(losses.get_with_metrics(name), **kwargs)
  loss, metrics = fn(z)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["false_negatives_per_anchor"], found,
                             rtol=1e-6)
  grad = jax.grad(lambda x: fn(x)[0])(z)
  np.testing.assert_allclose(grad, _finite_difference_grad(
      lambda x: _fnc_reference(x, 0.2, mode, 3, 0.5)[0], z), rtol=1e-3,
                             atol=1e-4)
  # A threshold no cosine exceeds finds nothing: SimCLR over every view.
  np.testing.assert_allclose(
      losses.get(name)(z, **{**kwargs, "fn_threshold": 1.5}),
      losses.get("simclr")(z, temperature=0.2), rtol=1e-6)
  # Sharded over 8 devices: the same detection, value and gradient.
  z = _embeddings(rng, 16, views, 3)
  expected = _run(name, z, None, 1, **kwargs)
  _assert_same(_run(name, z, None, 8, **kwargs), expected)


def test_detector_for_is_the_detector_each_loss_runs():
  # What the false-negative benchmark builds from a run's config.loss.kwargs.
  assert fnc.detector_for("fnc") == infonce.FalseNegatives("attract", 10, 0.7)
  assert fnc.detector_for("fn_removal", fn_topk=3, fn_threshold=0.5) == (
      infonce.FalseNegatives("eliminate", 3, 0.5))
  assert fnc.detector_for("fnc", fn_mode="eliminate").mode == "eliminate"
  with pytest.raises(ValueError, match="fn_removal always eliminates"):
    fnc.detector_for("fn_removal", fn_mode="attract")
  with pytest.raises(ValueError, match="only fnc and fn_removal"):
    fnc.detector_for("simclr")


def _bregman_reference(z, phi, temperature, tau_b, lambd):
  """NT-Xent(z) + lambd * the InfoNCE of similarities -D(x_i, x_j) / tau_b,
  D(x, y) = phi_{k*(x)}(x) - phi_{k*(y)}(x) (literally, not simplified)."""
  phi = np.asarray(phi, np.float64).reshape(-1, phi.shape[-1])
  n = len(phi)
  views = n // z.shape[0]
  k_star = np.argmax(phi, axis=1)
  terms = []
  for i in range(n):
    d = np.array([phi[i, k_star[i]] - phi[i, k_star[j]] for j in range(n)])
    s = -d / tau_b
    log_den = np.log(sum(np.exp(s[j]) for j in range(n) if j != i))
    positives = [j for j in range(n) if j != i and j // views == i // views]
    terms.append(np.mean([log_den - s[p] for p in positives]))
  nt_xent = _reference(z, None, temperature)
  return nt_xent + lambd * np.mean(terms)


def test_bregman_matches_reference_on_one_and_eight_devices():
  rng = np.random.default_rng(12)
  z = _embeddings(rng, 8, 2, 5)
  phi = rng.normal(size=(8, 2, 4)).astype(np.float32)
  kwargs = dict(temperature=0.2, bregman_temperature=0.5, lambd=0.7)
  fn = lambda z, phi: losses.get("bregman")(z, bregman_phi=phi, **kwargs)
  reference = lambda z, phi: _bregman_reference(z, phi, 0.2, 0.5, 0.7)
  np.testing.assert_allclose(fn(z, phi), reference(z, phi), rtol=1e-5)
  grad_z, grad_phi = jax.grad(fn, argnums=(0, 1))(z, phi)
  np.testing.assert_allclose(grad_z, _finite_difference_grad(
      lambda x: reference(x, phi), z), rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(grad_phi, _finite_difference_grad(
      lambda x: reference(z, x), phi), rtol=1e-3, atol=1e-4)
  z = _embeddings(rng, 32, 2, 8)
  phi = rng.normal(size=(32, 2, 6)).astype(np.float32)
  value_and_grad = lambda impl: jax.jit(jax.value_and_grad(
      lambda z, phi: losses.get("bregman")(
          z, bregman_phi=phi, loss_impl=impl, block_size=5, **kwargs),
      argnums=(0, 1)))
  expected = value_and_grad("gather")(z, phi)
  mesh = sharding.make_mesh()
  with jax.set_mesh(mesh):
    put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
    for impl in ("gather", "blockwise", "ring"):
      value, grads = value_and_grad(impl)(put(z), put(phi))
      np.testing.assert_allclose(value, expected[0], rtol=1e-5)
      for got, want in zip(grads, expected[1]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_bregman_divergence_of_an_affine_max_is_the_classical_one():
  from contrastive.losses import bregman  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(13)
  a, b = rng.normal(size=(5, 3)), rng.normal(size=5)
  x, y = rng.normal(size=(4, 3)), rng.normal(size=(6, 3))
  psi = lambda u: np.max(u @ a.T + b, axis=-1)
  grad_psi = lambda u: a[np.argmax(u @ a.T + b, axis=-1)]
  classical = (psi(x)[:, None] - psi(y)[None, :]
               - np.einsum("md,nmd->nm", grad_psi(y),
                           x[:, None, :] - y[None, :, :]))
  got = bregman.bregman_divergence(jnp.asarray(x @ a.T + b),
                                   jnp.asarray(y @ a.T + b))
  np.testing.assert_allclose(got, classical, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(got) >= -1e-6)
