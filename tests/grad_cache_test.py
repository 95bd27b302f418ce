"""GradCache steps equal the plain gradient of the same objective."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke_fashion_mnist
from contrastive import grad_cache
from contrastive import losses
from contrastive import models
from contrastive import optim
from contrastive import sharding
from contrastive import state as state_lib
from contrastive import train

IMAGE_SHAPE = (12, 12, 1)
BATCH, VIEWS = 32, 2


def _setup(method="supcon", loss_impl="gather"):
  config = smoke_fashion_mnist.get_config(method)
  config.model.update(depth=10, width=0.125)
  config.model.head.hidden_dims = (32,)
  config.model.head.out_dim = 16
  config.loss.loss_impl = loss_impl
  # Plain SGD: the update is -lr * gradient, so parameters compare gradients.
  config.optim.name = "sgd"
  config.optim.momentum = 0.0
  config.optim.weight_decay = 0.0
  model = models.create(config.model)
  schedule = lambda _: 0.5
  tx = optim.create(config.optim, schedule)
  rng = np.random.default_rng(0)
  batch = {
      "image": rng.uniform(size=(BATCH, VIEWS, *IMAGE_SHAPE)).astype(
          np.float32),
      "label": rng.integers(0, 4, size=BATCH).astype(np.int32),
  }
  return config, model, tx, schedule, batch


def _step(config, model, tx, schedule, batch, chunks, devices=8):
  mesh = sharding.make_mesh(devices=jax.devices()[:devices])
  state = state_lib.create_train_state(model, tx, jax.random.key(0),
                                       IMAGE_SHAPE, mesh)
  step = jax.jit(functools.partial(
      train.train_step, model=model, tx=tx,
      loss_fn=losses.get_with_metrics(config.loss.name),
      loss_config=config.loss, schedule=schedule,
      grad_cache_chunks=chunks))
  with jax.set_mesh(mesh):
    state, metrics = step(state, sharding.make_global_batch(mesh, batch))
  return jax.device_get(state), jax.device_get(metrics)


def _ghost_batch_reference(config, model, batch, chunks, devices=8):
  """The objective GradCache computes, by plain autodiff on one device.

  Chunk c holds rows [c*m, (c+1)*m) of each device's share of the batch;
  BN normalises each chunk with its own statistics, running averages are
  updated chunk after chunk.
  """
  state = state_lib.create_train_state(
      model, optim.create(config.optim, lambda _: 0.0), jax.random.key(0),
      IMAGE_SHAPE, sharding.make_mesh(devices=jax.devices()[:1]))
  local = BATCH // devices
  m = local // chunks
  images = jnp.asarray(batch["image"])
  labels = jnp.asarray(batch["label"])

  def objective(params):
    batch_stats = state.batch_stats
    z = jnp.zeros((BATCH, VIEWS, config.model.head.out_dim))
    for c in range(chunks):
      rows = np.concatenate([np.arange(d * local + c * m,
                                       d * local + (c + 1) * m)
                             for d in range(devices)])
      outputs, updated = model.apply(
          {"params": params, "batch_stats": batch_stats},
          images[rows].reshape(len(rows) * VIEWS, *IMAGE_SHAPE),
          train=True, mutable=["batch_stats"])
      batch_stats = updated["batch_stats"]
      z = z.at[rows].set(outputs["embedding"].reshape(len(rows), VIEWS, -1))
    loss = losses.get(config.loss.name)(
        z, labels, temperature=config.loss.temperature)
    return loss, batch_stats

  (loss, batch_stats), grads = jax.value_and_grad(objective, has_aux=True)(
      state.params)
  return float(loss), grads, batch_stats, state.params


def _assert_trees_close(got, expected, rtol=1e-4, atol=1e-6):
  for (path, e), g in zip(jax.tree.leaves_with_path(expected),
                          jax.tree.leaves(got)):
    np.testing.assert_allclose(g, e, rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_one_chunk_is_the_plain_step():
  setup = _setup()
  plain_state, plain_metrics = _step(*setup, chunks=0)
  cached_state, cached_metrics = _step(*setup, chunks=1)
  np.testing.assert_allclose(cached_metrics["loss"], plain_metrics["loss"],
                             rtol=1e-6)
  _assert_trees_close(cached_state.params, plain_state.params, rtol=1e-5)
  _assert_trees_close(cached_state.batch_stats, plain_state.batch_stats,
                      rtol=1e-5)


@pytest.mark.parametrize("chunks,loss_impl", [
    (2, "gather"), pytest.param(4, "ring", marks=pytest.mark.slow)])
@pytest.mark.slow
def test_chunked_step_equals_ghost_batch_objective(chunks, loss_impl):
  config, model, tx, schedule, batch = _setup(loss_impl=loss_impl)
  state, metrics = _step(config, model, tx, schedule, batch, chunks)
  loss, grads, batch_stats, params0 = _ghost_batch_reference(
      config, model, batch, chunks)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"],
                             float(jax.tree.reduce(
                                 lambda a, g: a + jnp.sum(g**2), grads, 0.0))
                             ** 0.5, rtol=1e-4)
  expected_params = jax.tree.map(lambda p, g: p - 0.5 * g, params0, grads)
  _assert_trees_close(state.params, expected_params, rtol=1e-4, atol=1e-6)
  _assert_trees_close(state.batch_stats, batch_stats, rtol=1e-4)
  # Control: the chunking is visible (per-chunk BN is not the plain step).
  plain_state, _ = _step(config, model, tx, schedule, batch, 0)
  assert not all(np.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(
      jax.tree.leaves(plain_state.params), jax.tree.leaves(state.params)))


def test_chunks_must_divide_the_local_batch():
  with pytest.raises(ValueError, match="grad_cache_chunks=3 must divide the "
                     "per-device batch 4"):
    grad_cache.check_chunks(32, 8, 3)


@pytest.mark.optimized_xla
@pytest.mark.slow
def test_activation_memory_falls_with_chunks():
  """Compiled per-device temp memory falls with the number of chunks."""
  config, model, tx, schedule, _ = _setup()
  mesh = sharding.make_mesh()
  abstract_state = state_lib.abstract_train_state(model, tx, (32, 32, 1),
                                                  mesh)
  batch = {
      "image": jax.ShapeDtypeStruct((256, VIEWS, 32, 32, 1), jnp.float32,
                                    sharding=sharding.batch_sharding(mesh)),
      "label": jax.ShapeDtypeStruct((256,), jnp.int32,
                                    sharding=sharding.batch_sharding(mesh)),
  }

  def temp(chunks):
    step = jax.jit(functools.partial(
        train.train_step, model=model, tx=tx,
        loss_fn=losses.get_with_metrics(config.loss.name),
        loss_config=config.loss, schedule=schedule,
        grad_cache_chunks=chunks))
    with jax.set_mesh(mesh):
      return step.lower(abstract_state, batch).compile().memory_analysis(
      ).temp_size_in_bytes

  plain, four_chunks = temp(0), temp(4)
  assert four_chunks < 0.7 * plain
