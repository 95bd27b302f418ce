"""InterCLR against a float64 numpy transcription: MoCo v2 (from
`moco_test`) plus MarginNCE over draws from a memory bank."""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive import losses
from contrastive import sharding
from contrastive.losses import interclr
from contrastive.losses import moco
from losses_test import _embeddings
from losses_test import _finite_difference_grad
from moco_test import _assert_matches
from moco_test import _lse
from moco_test import _moco_reference

BATCH, DIM, BANK = 8, 6, 40
POOL, NEGATIVES = 20, 4
# Rows 0..35: clusters 0..3 (9 rows each); row 36: a singleton cluster 4;
# rows 37..39: not clustered yet (-1).
CLUSTERS = np.concatenate([np.repeat(np.arange(4), 9), [4, -1, -1, -1]]
                          ).astype(np.int32)


def _case(seed, views=2):
  """z, keys, queue, bank, index: sample 0 on the singleton row, sample 1
  on an unclustered row, the others on distinct clustered rows."""
  rng = np.random.default_rng(seed)
  z = _embeddings(rng, BATCH, views, DIM)
  keys = _embeddings(rng, BATCH, views, DIM)
  queue = _embeddings(rng, 6, 1, DIM)[:, 0]
  bank = _embeddings(rng, BANK, 1, DIM)[:, 0]
  index = np.concatenate([[36, 38], rng.permutation(36)[:BATCH - 2]]
                         ).astype(np.int32)
  return z, keys, queue, bank, index


@functools.cache
def _draws_fn(num_negatives, semi_hard_pool):
  return jax.jit(functools.partial(interclr.inter_draws,
                                   num_negatives=num_negatives,
                                   semi_hard_pool=semi_hard_pool))


def _draws(z, bank, clusters, index, rng, num_negatives=NEGATIVES,
           semi_hard_pool=POOL):
  """The draws of every global query (i, v), id i * views + v, as the loss
  makes them."""
  batch, views, dim = z.shape
  draws = _draws_fn(num_negatives, semi_hard_pool)(
      z.reshape(-1, dim), bank, clusters, np.repeat(index, views),
      moco.anchor_rngs(rng, jnp.arange(batch * views)))
  return jax.device_get(draws)


def _check_draws(z, bank, clusters, index, draws, num_negatives,
                 semi_hard_pool):
  """Checks the draws against the definition, query by query."""
  z, bank = np.asarray(z, np.float64), np.asarray(bank, np.float64)
  views = z.shape[1]
  for n, q in enumerate(z.reshape(-1, z.shape[2])):
    own = index[n // views]
    c = clusters[own]
    scores = bank @ q
    order = np.argsort(-scores)
    # No near-tie at the pool's boundary (float32 vs float64 ranking).
    assert scores[order[semi_hard_pool - 1]] - scores[order[semi_hard_pool]] \
        > 1e-5
    pool = set(order[:semi_hard_pool].tolist())
    eligible = [r for r in pool if clusters[r] != c and clusters[r] >= 0]
    others = [r for r in range(len(bank)) if clusters[r] == c and r != own]
    expected_valid = (c >= 0 and bool(others)
                      and len(eligible) >= num_negatives)
    assert draws.valid[n] == expected_valid, n
    if not expected_valid:
      continue
    assert draws.positive[n] in others
    negatives = draws.negatives[n].tolist()
    assert len(set(negatives)) == num_negatives
    assert set(negatives) <= set(eligible)


def _inter_reference(z, bank, draws, margin, tau):
  """MarginNCE, query by query: s = [q.p - m, q.n_1..K] / tau,
  -log softmax(s)_0, mean over the valid queries.

  Returns (loss, inter_acc, inter_valid_fraction)."""
  z, bank = np.asarray(z, np.float64), np.asarray(bank, np.float64)
  per_query, correct = [], []
  for n, q in enumerate(z.reshape(-1, z.shape[2])):
    if not draws.valid[n]:
      continue
    s = np.concatenate([[bank[draws.positive[n]] @ q - margin],
                        bank[draws.negatives[n]] @ q]) / tau
    per_query.append(_lse(s) - s[0])
    correct.append(np.argmax(s) == 0)
  if not per_query:
    return 0.0, 0.0, 0.0
  return (np.mean(per_query), np.mean(correct),
          len(per_query) / draws.valid.size)


def _run(z, devices, *, keys, index, **kwargs):
  """(loss, metrics, (d/dz, {"keys": d/dkeys})) of interclr on `devices`.

  z, keys and index are sharded on the batch; numpy arrays in `kwargs`
  (queue, bank, clusters) are replicated; the rest are constants.
  """
  fn = losses.get_with_metrics("interclr")
  arrays = {k: v for k, v in kwargs.items() if isinstance(v, np.ndarray)}
  constants = {k: v for k, v in kwargs.items() if k not in arrays}

  def loss(z, keys, index, arrays):
    return fn(z, keys=keys, index=index, **arrays, **constants)

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  mesh = sharding.make_mesh(devices=jax.devices()[:devices])
  with jax.set_mesh(mesh):
    put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
    replicate = lambda x: jax.device_put(x, sharding.replicated(mesh))
    (value, metrics), (grad_z, grad_keys) = step(
        put(z), put(keys), put(index), jax.tree.map(replicate, arrays))
  assert value.dtype == jnp.float32 and value.shape == ()
  return (float(value), jax.device_get(metrics),
          (jax.device_get(grad_z), {"keys": jax.device_get(grad_keys)}))


def test_draws_follow_the_definition():
  z, _, _, bank, index = _case(0)
  rng = jax.random.key(7)
  draws = _draws(z, bank, CLUSTERS, index, rng)
  assert draws.positive.shape == (2 * BATCH,)
  assert draws.negatives.shape == (2 * BATCH, NEGATIVES)
  _check_draws(z, bank, CLUSTERS, index, draws, NEGATIVES, POOL)
  # Singleton cluster (sample 0) and unclustered row (sample 1): invalid;
  # every other query has >= 8 eligible rows in a pool of 20.
  np.testing.assert_array_equal(draws.valid, np.arange(2 * BATCH) >= 4)
  # A tight pool (9 of 12): valid only where at most 3 of the query's 12
  # nearest rows are excluded; `_check_draws` counts them.
  tight = _draws(z, bank, CLUSTERS, index, rng, num_negatives=9,
                 semi_hard_pool=12)
  _check_draws(z, bank, CLUSTERS, index, tight, 9, 12)
  assert 0 < tight.valid[4:].sum() < 12


def test_draws_are_uniform_and_sharding_free():
  """One query drawn with many keys: every same-cluster row (but its own)
  is a positive, every eligible pool row a negative, about equally often."""
  z, _, _, bank, index = _case(0)
  q, own = z[2, 0], index[2]
  copies = 400
  draws = jax.device_get(_draws_fn(NEGATIVES, POOL)(
      np.tile(q, (copies, 1)), bank, CLUSTERS, np.full(copies, own),
      moco.anchor_rngs(jax.random.key(1), jnp.arange(copies))))
  assert draws.valid.all()
  c = CLUSTERS[own]
  others = [r for r in range(36) if CLUSTERS[r] == c and r != own]
  counts = np.bincount(draws.positive, minlength=BANK)
  assert set(np.flatnonzero(counts)) == set(others)
  assert counts[others].min() > copies / len(others) / 2
  pool = np.argsort(-(bank @ q))[:POOL]
  eligible = [r for r in pool if CLUSTERS[r] not in (c, -1)]
  counts = np.bincount(draws.negatives.ravel(), minlength=BANK)
  assert set(np.flatnonzero(counts)) == set(eligible)
  expected = copies * NEGATIVES / len(eligible)
  assert expected / 2 < counts[eligible].min()
  assert counts[eligible].max() < expected * 2
  # The key of query n is fold_in(rng, n): a query's draws do not depend on
  # the others in the call (so not on the sharding).
  alone = jax.device_get(_draws_fn(NEGATIVES, POOL)(
      q[None], bank, CLUSTERS, np.array([own]),
      moco.anchor_rngs(jax.random.key(1), jnp.array([5]))))
  assert alone.positive[0] == draws.positive[5]
  np.testing.assert_array_equal(alone.negatives[0], draws.negatives[5])


@pytest.mark.parametrize("views,devices,options", [
    (2, 1, dict(temperature=0.2)),
    (3, 8, dict(temperature=0.2, intra_weight=0.6, inter_weight=0.4,
                margin=0.1, inter_temperature=0.3)),
])
def test_interclr_matches_reference(views, devices, options):
  z, keys, queue, bank, index = _case(views, views=views)
  rng = jax.random.key(views)
  draws = _draws(z, bank, CLUSTERS, index, rng)
  _check_draws(z, bank, CLUSTERS, index, draws, NEGATIVES, POOL)
  tau = options["temperature"]
  w_intra = options.get("intra_weight", 0.75)
  w_inter = options.get("inter_weight", 0.25)
  margin = options.get("margin", -0.5)
  tau_inter = options.get("inter_temperature", tau)

  def reference(x):
    return (w_intra * _moco_reference(x, keys, queue, tau)[0]
            + w_inter * _inter_reference(x, bank, draws, margin,
                                         tau_inter)[0])

  intra = _moco_reference(z, keys, queue, tau)
  inter = _inter_reference(z, bank, draws, margin, tau_inter)
  # The draws are held fixed while z moves, as in the loss's gradient.
  grad_ref = _finite_difference_grad(reference, z)
  result = _run(z, devices, keys=keys, index=index, queue=queue, rng=rng,
                memory_bank=bank, bank_clusters=CLUSTERS,
                num_negatives=NEGATIVES, semi_hard_pool=POOL, **options)
  _assert_matches(result, reference(z), grad_ref, intra[1:])
  metrics = result[1]
  np.testing.assert_allclose(metrics["loss_intra"], intra[0], rtol=2e-5)
  np.testing.assert_allclose(metrics["loss_inter"], inter[0], rtol=2e-5)
  np.testing.assert_allclose(metrics["inter_acc"], inter[1], rtol=1e-6)
  np.testing.assert_allclose(metrics["inter_valid_fraction"], inter[2],
                             rtol=1e-6)
  assert 0 < inter[2] < 1


def _loss(z, **kwargs):
  """interclr on one device, jitted, with (loss, metrics)."""
  fn = losses.get_with_metrics("interclr")
  return jax.device_get(jax.jit(lambda z: fn(z, **kwargs))(z))


def test_margin_is_subtracted_from_the_positive_cosine():
  """m = -0.5 adds 0.5 to every positive cosine: a lower loss than m = 0,
  a higher positive-logit share; only the inter term moves."""
  z, keys, queue, bank, index = _case(4)
  fn = losses.get_with_metrics("interclr")
  step = jax.jit(lambda m: fn(
      z, temperature=0.2, keys=keys, queue=queue, rng=jax.random.key(0),
      memory_bank=bank, bank_clusters=CLUSTERS, index=index, margin=m,
      num_negatives=NEGATIVES, semi_hard_pool=POOL))
  inters = [float(step(m)[1]["loss_inter"]) for m in (-0.5, 0.0, 0.5)]
  assert inters[0] < inters[1] < inters[2]
  draws = _draws(z, bank, CLUSTERS, index, jax.random.key(0))
  np.testing.assert_allclose(
      inters[0], _inter_reference(z, bank, draws, -0.5, 0.2)[0], rtol=2e-5)


def test_inter_weight_zero_and_unclustered_bank_are_scaled_moco():
  z, keys, queue, bank, index = _case(5)
  common = dict(temperature=0.2, keys=keys, queue=queue,
                rng=jax.random.key(0), memory_bank=bank, index=index,
                num_negatives=NEGATIVES, semi_hard_pool=POOL)
  moco_loss, moco_metrics = jax.device_get(jax.jit(
      lambda z: losses.get_with_metrics("moco")(
          z, temperature=0.2, keys=keys, queue=queue))(z))
  loss, metrics = _loss(z, bank_clusters=CLUSTERS, inter_weight=0.0,
                        **common)
  np.testing.assert_allclose(loss, 0.75 * moco_loss, rtol=1e-6)
  assert metrics["loss_inter"] > 0
  for name, value in moco_metrics.items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-6)
  unclustered = np.full(BANK, -1, np.int32)
  loss, metrics = _loss(z, bank_clusters=unclustered, **common)
  np.testing.assert_allclose(loss, 0.75 * moco_loss, rtol=1e-6)
  assert metrics["inter_valid_fraction"] == 0
  assert metrics["loss_inter"] == 0 and metrics["inter_acc"] == 0
  # No NaN leaks from the invalid queries into the gradient.
  grad = jax.jit(jax.grad(lambda z: losses.get("interclr")(
      z, bank_clusters=unclustered, **common)))(z)
  moco_grad = jax.jit(jax.grad(lambda z: losses.get("moco")(
      z, temperature=0.2, keys=keys, queue=queue)))(z)
  np.testing.assert_allclose(grad, 0.75 * moco_grad, rtol=1e-5, atol=1e-7)


def test_clear_errors():
  z, keys, queue, bank, index = _case(6)
  fn = losses.get("interclr")
  common = dict(temperature=0.2, keys=keys, queue=queue,
                rng=jax.random.key(0), memory_bank=bank,
                bank_clusters=CLUSTERS, index=index,
                num_negatives=NEGATIVES, semi_hard_pool=POOL)

  def call(labels=None, **changes):
    return fn(z, labels, **{**common, **changes})

  with pytest.raises(ValueError, match="interclr takes no labels"):
    call(labels=np.zeros(BATCH, np.int32))
  with pytest.raises(ValueError, match="supports only loss_impl='gather'"):
    call(loss_impl="blockwise")
  with pytest.raises(ValueError, match="interclr needs keys"):
    call(keys=None)
  with pytest.raises(ValueError, match="interclr needs rng"):
    call(rng=None)
  with pytest.raises(ValueError, match="interclr needs memory_bank"):
    call(index=None)
  with pytest.raises(ValueError, match="inter_temperature must be > 0"):
    call(inter_temperature=0.0)
  with pytest.raises(ValueError, match=r"memory_bank must be float\[N, 6\]"):
    call(memory_bank=bank[:, :4])
  with pytest.raises(ValueError, match=r"bank_clusters must be int\[40\]"):
    call(bank_clusters=CLUSTERS[:-1])
  with pytest.raises(ValueError, match=r"index must be int\[8\]"):
    call(index=index[:4])
  for negatives, pool in ((0, 5), (6, 5), (4, 41)):
    with pytest.raises(ValueError, match="1 <= num_negatives"):
      call(num_negatives=negatives, semi_hard_pool=pool)
  with pytest.raises(ValueError, match="1 <= num_negatives"):
    interclr.inter_draws(z[:, 0], bank, CLUSTERS, index,
                         moco.anchor_rngs(jax.random.key(0),
                                          jnp.arange(BATCH)),
                         num_negatives=4, semi_hard_pool=41)


def test_registry_and_defaults():
  assert "interclr" in losses.names()
  assert losses.get("interclr") is interclr.interclr
  assert losses.get_with_metrics("interclr") is interclr.interclr_with_metrics
  assert losses.extra_inputs("interclr") == (
      "keys", "queue", "rng", "memory_bank", "bank_clusters", "index")
  assert set(losses.extra_inputs("interclr")) <= set(losses.EXTRA_INPUTS)
  for fn in (interclr.interclr, interclr.interclr_with_metrics):
    defaults = {k: p.default for k, p in
                inspect.signature(fn).parameters.items()}
    assert (defaults["intra_weight"], defaults["inter_weight"],
            defaults["margin"], defaults["inter_temperature"],
            defaults["num_negatives"], defaults["semi_hard_pool"],
            defaults["loss_impl"]) == (0.75, 0.25, -0.5, None, 16384,
                                       128000, "gather")
