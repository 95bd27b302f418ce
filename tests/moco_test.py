"""Momentum-encoder / queue losses against float64 numpy transcriptions of
the papers' equations: MoCo, MoCHi, SCE, ReLIC, RényiCL."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive import losses
from contrastive import sharding
from contrastive.losses import moco
from losses_test import _embeddings
from losses_test import _finite_difference_grad


def _pairs(views, symmetric=True):
  """(query view, key view): every view against key views 0 and 1."""
  key_views = range(min(views, 2)) if symmetric else (0,)
  return [(v, u) for v in range(views) for u in key_views if u != v]


def _lse(x):
  return x.max() + np.log(np.exp(x - x.max()).sum())


def _columns(keys, queue, u, queue_valid=None):
  """Key of view u of every sample (sample i at row i), then the queue."""
  if queue_valid is not None:
    queue = queue[np.asarray(queue_valid)]
  return np.concatenate([keys[:, u], queue.reshape(-1, keys.shape[2])])


def _moco_reference(z, keys, queue, temperature, queue_valid=None,
                    extra_negatives=None):
  """Mean over (i, v, u) of -log exp(q.k+/t) / sum_c exp(q.c/t), float64.

  `extra_negatives[(i, v, u)]`: [s, dim] more negative columns (MoCHi).
  Returns (loss, contrastive_acc, pos_logit, neg_logit).
  """
  z, keys, queue = (np.asarray(x, np.float64) for x in (z, keys, queue))
  batch, views, _ = z.shape
  per_anchor, correct, pos, neg = [], [], [], []
  for i in range(batch):
    for v, u in _pairs(views):
      columns = _columns(keys, queue, u, queue_valid)
      if extra_negatives is not None:
        columns = np.concatenate([columns, extra_negatives[(i, v, u)]])
      s = columns @ z[i, v] / temperature
      per_anchor.append(_lse(s) - s[i])
      correct.append(np.argmax(s) == i)
      pos.append(s[i])
      neg.extend(np.delete(s, i))
  return np.mean(per_anchor), np.mean(correct), np.mean(pos), np.mean(neg)


def _cross_view_infonce(z, keys, temperature):
  """2 views, no queue: SimCLR-style cross-view InfoNCE in matrix form."""
  z, keys = np.asarray(z, np.float64), np.asarray(keys, np.float64)
  total = []
  for v, u in ((0, 1), (1, 0)):
    logits = z[:, v] @ keys[:, u].T / temperature
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    total.append(-np.diag(log_softmax))
  return np.mean(np.concatenate(total))


def _sce_reference(z, keys, queue, temperature, coefficient, temperature_m,
                   symmetric=True):
  """Denize et al.: w = norm1(l onehot + (1 - l) softmax_{c != k}(k.c /
  t_m)), L = -sum_c w_c log softmax_c(q.c / t), mean over pairs."""
  z, keys, queue = (np.asarray(x, np.float64) for x in (z, keys, queue))
  batch, views, _ = z.shape
  per_anchor = []
  for i in range(batch):
    for v, u in _pairs(views, symmetric):
      columns = _columns(keys, queue, u)
      s = columns @ z[i, v] / temperature
      log_q = s - _lse(s)
      r = np.delete(columns @ keys[i, u] / temperature_m, i)
      sharpened = np.exp(r - _lse(r))
      w = np.zeros(len(columns))
      w[i] = coefficient
      w[np.arange(len(columns)) != i] += (1 - coefficient) * sharpened
      w /= w.sum()
      per_anchor.append(-(w * log_q).sum())
  return np.mean(per_anchor)


def _relic_reference(z, keys, queue, temperature, alpha, frozen_z=None):
  """InfoNCE + alpha KL(p^{ab}_i || p^{ba}_i), p^{ba} from `frozen_z`
  (the stop-gradient side: finite differences move z only)."""
  z, keys, queue = (np.asarray(x, np.float64) for x in (z, keys, queue))
  frozen_z = z if frozen_z is None else np.asarray(frozen_z, np.float64)
  batch, views, _ = z.shape
  pairs = _pairs(views)

  def log_p(embeddings, i, a, b):
    s = _columns(keys, queue, b) @ embeddings[i, a] / temperature
    return s - _lse(s)

  per_anchor = []
  for i in range(batch):
    for a, b in pairs:
      lp = log_p(z, i, a, b)
      term = -lp[i]
      if (b, a) in pairs:
        term += alpha * (np.exp(lp) * (lp - log_p(frozen_z, i, b, a))).sum()
      per_anchor.append(term)
  return np.mean(per_anchor)


def _renyicl_reference(z, keys, queue, temperature, gamma, alpha,
                       frozen_z=None):
  """Sum over key views t of the skew-Rényi surrogate over the global pairs
  (Lee & Shin; weights exp((gamma-1) f), exp(gamma f) from `frozen_z`)."""
  z, keys, queue = (np.asarray(x, np.float64) for x in (z, keys, queue))
  frozen_z = z if frozen_z is None else np.asarray(frozen_z, np.float64)
  batch, views, _ = z.shape
  total = 0.0
  for t in (0, 1):
    pos_f, pos_f0, neg_f, neg_f0 = [], [], [], []
    for i in range(batch):
      for v, u in _pairs(views):
        if u != t:
          continue
        columns = _columns(keys, queue, u)
        f = columns @ z[i, v] / temperature
        f0 = columns @ frozen_z[i, v] / temperature
        pos_f.append(f[i])
        pos_f0.append(f0[i])
        neg_f.extend(np.delete(f, i))
        neg_f0.extend(np.delete(f0, i))
    pos_f, pos_f0, neg_f, neg_f0 = map(np.array,
                                       (pos_f, pos_f0, neg_f, neg_f0))
    w1 = np.exp((gamma - 1) * pos_f0)
    pos_w2, neg_w2 = np.exp(gamma * pos_f0), np.exp(gamma * neg_f0)
    total += (-(pos_f * w1).mean() / w1.mean()
              + (alpha * (pos_f * pos_w2).mean()
                 + (1 - alpha) * (neg_f * neg_w2).mean())
              / (alpha * pos_w2.mean() + (1 - alpha) * neg_w2.mean()))
  return total


def _inputs(seed, batch=16, views=2, dim=4, queue_size=6):
  rng = np.random.default_rng(seed)
  z = _embeddings(rng, batch, views, dim)
  keys = _embeddings(rng, batch, views, dim)
  queue = _embeddings(rng, queue_size, 1, dim)[:, 0]
  return z, keys, queue


def _run(name, z, devices, *, labels=None, batch_inputs=None, **kwargs):
  """(loss, metrics, grads) of loss `name` on `devices` devices.

  `batch_inputs` (e.g. keys) are sharded on the batch like z; numpy
  arrays in `kwargs` (the queue) are replicated; the rest are constants.
  grads: (d/dz, d/d batch_inputs).
  """
  fn = losses.get_with_metrics(name)
  arrays = {k: v for k, v in kwargs.items() if isinstance(v, np.ndarray)}
  constants = {k: v for k, v in kwargs.items() if k not in arrays}

  def loss(z, batch_inputs, arrays, labels):
    return fn(z, labels, **batch_inputs, **arrays, **constants)

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  mesh = sharding.make_mesh(devices=jax.devices()[:devices])
  with jax.set_mesh(mesh):
    put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
    replicate = lambda x: jax.device_put(x, sharding.replicated(mesh))
    (value, metrics), grads = step(
        put(z), jax.tree.map(put, batch_inputs or {}),
        jax.tree.map(replicate, arrays),
        None if labels is None else put(labels))
  assert value.dtype == jnp.float32 and value.shape == ()
  return float(value), jax.device_get(metrics), jax.device_get(grads)


def _loss(name, z, labels=None, **kwargs):
  """The loss on one device, jitted (eager dispatch is slow)."""
  return float(jax.jit(lambda z: losses.get(name)(z, labels, **kwargs))(z))


def _assert_matches(result, loss_ref, grad_ref, metrics_ref=None):
  value, metrics, (grad, other_grads) = result
  np.testing.assert_allclose(value, loss_ref, rtol=2e-5, atol=1e-6)
  scale = np.abs(grad_ref).max()
  assert scale > 0
  np.testing.assert_allclose(grad, grad_ref, rtol=1e-3, atol=2e-4 * scale)
  # The momentum keys take no gradient.
  for key_grad in jax.tree.leaves(other_grads):
    np.testing.assert_array_equal(key_grad, 0.0)
  assert {"contrastive_acc", "pos_logit", "neg_logit"} <= set(metrics)
  for value in metrics.values():
    assert value.dtype == np.float32 and value.shape == ()
  if metrics_ref is not None:
    acc, pos, neg = metrics_ref
    np.testing.assert_allclose(metrics["contrastive_acc"], acc, rtol=1e-6)
    np.testing.assert_allclose(metrics["pos_logit"], pos, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(metrics["neg_logit"], neg, rtol=1e-5,
                               atol=1e-5)


# Each reference test runs one configuration on 1 device and a richer one
# sharded over 8 (compilation dominates the run time on 2 cores).
@pytest.mark.parametrize("views,devices", [(2, 1), (3, 8)])
def test_moco_matches_reference(views, devices):
  z, keys, queue = _inputs(views, views=views)
  tau = 0.2
  expected = _moco_reference(z, keys, queue, tau)
  grad_ref = _finite_difference_grad(
      lambda x: _moco_reference(x, keys, queue, tau)[0], z)
  result = _run("moco", z, devices, batch_inputs={"keys": keys},
                queue=queue, temperature=tau)
  _assert_matches(result, expected[0], grad_ref, expected[1:])


@pytest.mark.parametrize("devices", [8])
def test_moco_masked_queue_entries(devices):
  z, keys, queue = _inputs(5)
  valid = np.array([True, False, True, True, False, True])
  expected = _moco_reference(z, keys, queue, 0.2, queue_valid=valid)
  grad_ref = _finite_difference_grad(
      lambda x: _moco_reference(x, keys, queue, 0.2, queue_valid=valid)[0], z)
  result = _run("moco", z, devices, batch_inputs={"keys": keys},
                queue=queue, queue_valid=valid, temperature=0.2)
  _assert_matches(result, expected[0], grad_ref, expected[1:])


@pytest.mark.parametrize("empty", ["none", "zero_rows", "all_masked"])
def test_moco_without_queue_is_cross_view_infonce(empty):
  z, keys, queue = _inputs(6)
  queue_kwargs = {
      "none": dict(queue=None),
      "zero_rows": dict(queue=np.zeros((0, 4), np.float32)),
      "all_masked": dict(queue=queue, queue_valid=np.zeros(6, bool)),
  }[empty]
  expected = _cross_view_infonce(z, keys, 0.3)
  loss = _loss("moco", z, temperature=0.3, keys=keys, **queue_kwargs)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_keys_of_the_key_views_only():
  """With more views, keys of views 0 and 1 are enough (the small crops
  never go through the momentum encoder)."""
  z, keys, queue = _inputs(4, views=3)
  full = _loss("moco", z, temperature=0.2, keys=keys, queue=queue)
  two = _loss("moco", z, temperature=0.2, keys=keys[:, :2], queue=queue)
  assert full == two
  with pytest.raises(ValueError, match="just the first 2"):
    _loss("moco", z, temperature=0.2, keys=keys[:, :1], queue=queue)


MOCHI = dict(num_hard=4, num_mix=3, num_query_mix=2)


@functools.cache
def _mochi_helper():
  return jax.jit(functools.partial(moco.mochi_synthetic_negatives, **MOCHI))


def _mochi_draws(z, queue, rng, queue_valid=None):
  """The helper's draws for every global anchor, as the loss makes them."""
  batch, views, dim = z.shape
  pairs = _pairs(views)
  anchor_ids = np.array([[(i * views + v) * views + u for v, u in pairs]
                         for i in range(batch)])
  queries = np.stack([[z[i, v] for v, _ in pairs] for i in range(batch)])
  if queue_valid is None:
    queue_valid = np.ones(len(queue), bool)
  synthetic = _mochi_helper()(
      queries.reshape(-1, dim), queue,
      moco.anchor_rngs(rng, jnp.asarray(anchor_ids)), queue_valid=queue_valid)
  return pairs, jax.device_get(synthetic)


def _numpy_synthetic(z, queue, pairs, draws, num_hard):
  """MoCHi's mixes rebuilt in float64 from the drawn indices and weights,
  checking that every source is among the numpy top-N of its query."""
  z, queue = np.asarray(z, np.float64), np.asarray(queue, np.float64)
  extra = {}
  n = 0
  for i in range(z.shape[0]):
    for v, u in pairs:
      q = z[i, v]
      hardest = np.argsort(-(queue @ q))[:num_hard]
      assert set(draws.hard_indices[n].tolist()) == set(hardest.tolist())
      first, second = draws.first[n], draws.second[n]
      coefficient = draws.coefficient[n].astype(np.float64)
      assert set(second.tolist()) <= set(hardest.tolist())
      mixes = []
      for a, b, c in zip(first, second, coefficient):
        if a >= 0:
          assert a in hardest and 0 <= c <= 1
          mixes.append(c * queue[a] + (1 - c) * queue[b])
        else:
          assert 0 <= c < 0.5
          mixes.append(c * q + (1 - c) * queue[b])
      mixes = np.array(mixes)
      extra[(i, v, u)] = mixes / np.linalg.norm(mixes, axis=1, keepdims=True)
      n += 1
  return extra


@functools.cache
def _mochi_case():
  """Inputs, draws and the reference's value and gradient, once."""
  z, keys, _ = _inputs(8)
  queue = _embeddings(np.random.default_rng(8), 10, 1, 4)[:, 0]
  rng = jax.random.key(3)
  pairs, draws = _mochi_draws(z, queue, rng)
  extra = _numpy_synthetic(z, queue, pairs, draws, MOCHI["num_hard"])
  expected = _moco_reference(z, keys, queue, 0.2, extra_negatives=extra)
  # The synthetic points are constants: fixed at z while z moves.
  grad_ref = _finite_difference_grad(
      lambda x: _moco_reference(x, keys, queue, 0.2,
                                extra_negatives=extra)[0], z)
  return z, keys, queue, rng, pairs, draws, extra, expected, grad_ref


def test_mochi_synthetic_negatives_are_unit_and_from_the_hardest():
  z, _, queue, rng, pairs, draws, extra, _, _ = _mochi_case()
  count = MOCHI["num_mix"] + MOCHI["num_query_mix"]
  assert draws.negatives.shape == (len(z) * len(pairs), count, 4)
  np.testing.assert_allclose(np.linalg.norm(draws.negatives, axis=-1), 1.0,
                             rtol=1e-5)
  assert draws.valid.all()
  # `_numpy_synthetic` checked the hardest-N sets and the mixing weights.
  rebuilt = np.stack([extra[(i, v, u)] for i in range(len(z))
                      for v, u in pairs])
  np.testing.assert_allclose(draws.negatives, rebuilt, rtol=1e-5, atol=1e-6)
  # Masked queue rows are never among the hardest (7 valid rows >= N).
  valid = np.ones(len(queue), bool)
  valid[np.argsort(-(queue @ z[0, 0]))[:3]] = False
  _, masked = _mochi_draws(z, queue, rng, queue_valid=valid)
  assert valid[masked.hard_indices].all()
  assert masked.valid.all()


@pytest.mark.parametrize("devices", [1, 8])
def test_mochi_matches_reference(devices):
  z, keys, queue, rng, _, _, _, expected, grad_ref = _mochi_case()
  result = _run("mochi", z, devices, batch_inputs={"keys": keys},
                queue=queue, temperature=0.2, rng=rng, **MOCHI)
  _assert_matches(result, expected[0], grad_ref, expected[1:])


def test_mochi_without_synthetic_negatives_is_moco():
  z, keys, queue = _inputs(9)
  expected = _loss("moco", z, temperature=0.2, keys=keys, queue=queue)
  loss = _loss("mochi", z, temperature=0.2, keys=keys, queue=queue,
               rng=jax.random.key(0), num_hard=3, num_mix=0, num_query_mix=0)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


@pytest.mark.parametrize("devices", [1, 8])
def test_mochi_mixes_from_its_start_step_on(devices):
  z, keys, queue, rng, _, _, _, expected, _ = _mochi_case()
  moco_loss = _moco_reference(z, keys, queue, 0.2)[0]
  for step, reference, mixing in ((4, moco_loss, 0.0), (5, expected[0], 1.0),
                                  (6, expected[0], 1.0)):
    value, metrics, _ = _run(
        "mochi", z, devices, batch_inputs={"keys": keys}, queue=queue,
        temperature=0.2, rng=rng, mix_from_step=5,
        step=np.asarray(step, np.int32), **MOCHI)
    np.testing.assert_allclose(value, reference, rtol=2e-5)
    assert metrics["mochi_mixing"] == mixing


@pytest.mark.parametrize("symmetric,devices", [(False, 1), (True, 8)])
def test_sce_matches_reference(symmetric, devices):
  z, keys, queue = _inputs(10, views=3 if symmetric else 2)
  options = dict(temperature=0.1, coefficient=0.5, temperature_m=0.07)
  reference = functools.partial(_sce_reference, keys=keys, queue=queue,
                                symmetric=symmetric, **options)
  expected = reference(z)
  grad_ref = _finite_difference_grad(reference, z)
  result = _run("sce", z, devices, batch_inputs={"keys": keys}, queue=queue,
                symmetric=symmetric, **options)
  _assert_matches(result, expected, grad_ref)


def test_sce_with_lambda_one_is_moco():
  z, keys, queue = _inputs(11)
  expected = _loss("moco", z, temperature=0.1, keys=keys, queue=queue)
  loss = _loss("sce", z, temperature=0.1, keys=keys, queue=queue,
               coefficient=1.0)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


@pytest.mark.parametrize("views,devices", [(2, 1), (3, 8)])
def test_relic_matches_reference(views, devices):
  z, keys, queue = _inputs(12, views=views)
  expected = _relic_reference(z, keys, queue, 0.2, 0.7)
  grad_ref = _finite_difference_grad(
      lambda x: _relic_reference(x, keys, queue, 0.2, 0.7, frozen_z=z), z)
  result = _run("relic", z, devices, batch_inputs={"keys": keys},
                queue=queue, temperature=0.2, alpha=0.7)
  _assert_matches(result, expected, grad_ref)
  assert result[1]["kl"] > 0


def test_relic_with_alpha_zero_is_moco():
  z, keys, queue = _inputs(13)
  expected = _loss("moco", z, temperature=0.2, keys=keys, queue=queue)
  loss = _loss("relic", z, temperature=0.2, keys=keys, queue=queue,
               alpha=0.0)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


@pytest.mark.parametrize("views,with_queue,gamma,alpha,devices", [
    (2, False, 2.0, 1 / 65536, 1), (3, True, 1.5, 0.3, 8),
    (2, True, 1.0, 0.1, 8)])
def test_renyicl_matches_reference(views, with_queue, gamma, alpha, devices):
  z, keys, queue = _inputs(14, views=views)
  if not with_queue:
    queue = np.zeros((0, 4), np.float32)
  tau = 0.3
  expected = _renyicl_reference(z, keys, queue, tau, gamma, alpha)
  grad_ref = _finite_difference_grad(
      lambda x: _renyicl_reference(x, keys, queue, tau, gamma, alpha,
                                   frozen_z=z), z)
  result = _run("renyicl", z, devices, batch_inputs={"keys": keys},
                queue=queue, temperature=tau, gamma=gamma, alpha=alpha)
  _assert_matches(result, expected, grad_ref,
                  _moco_reference(z, keys, queue, tau)[1:])


def test_defaults_follow_methods_md():
  import inspect  # pylint: disable=g-import-not-at-top
  defaults = lambda fn: {k: p.default for k, p in
                         inspect.signature(fn).parameters.items()}
  assert defaults(moco.renyicl)["gamma"] == 2.0
  assert defaults(moco.renyicl)["alpha"] == 1 / 65536
  assert defaults(moco.sce)["coefficient"] == 0.5
  assert defaults(moco.sce)["temperature_m"] == 0.07
  assert (defaults(moco.mochi)["num_hard"], defaults(moco.mochi)["num_mix"],
          defaults(moco.mochi)["num_query_mix"]) == (1024, 512, 256)


@pytest.mark.parametrize("name", ["moco", "mochi", "sce", "relic",
                                  "renyicl"])
def test_clear_errors(name):
  z, keys, queue = _inputs(15, batch=4)
  fn = losses.get(name)
  extra = {"rng": jax.random.key(0), "num_hard": 2} if name == "mochi" else {}
  with pytest.raises(ValueError, match=f"{name} takes no labels"):
    fn(z, np.zeros(4, np.int32), temperature=0.2, keys=keys, queue=queue,
       **extra)
  with pytest.raises(ValueError, match=f"{name} supports only "
                     "loss_impl='gather'"):
    fn(z, temperature=0.2, keys=keys, queue=queue, loss_impl="ring", **extra)
  with pytest.raises(ValueError, match=f"{name} needs keys"):
    fn(z, temperature=0.2, keys=None, queue=queue, **extra)
  with pytest.raises(ValueError, match="at least 2 views"):
    fn(z[:, :1], temperature=0.2, keys=keys[:, :1], queue=queue, **extra)
  with pytest.raises(ValueError, match="queue must be"):
    fn(z, temperature=0.2, keys=keys, queue=queue[:, :3], **extra)


def test_mochi_errors():
  z, keys, queue = _inputs(16, batch=4)
  with pytest.raises(ValueError, match="num_hard"):
    _loss("mochi", z, temperature=0.2, keys=keys, queue=queue,
          rng=jax.random.key(0), num_hard=7)
  with pytest.raises(ValueError, match="needs step"):
    _loss("mochi", z, temperature=0.2, keys=keys, queue=queue,
          rng=jax.random.key(0), num_hard=2, mix_from_step=3)
  with pytest.raises(ValueError, match="needs rng"):
    _loss("mochi", z, temperature=0.2, keys=keys, queue=queue, rng=None,
          num_hard=2)
