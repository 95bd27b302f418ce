"""A train step on 8 devices equals the same global batch on 1 device."""

import functools

import jax
import numpy as np
import pytest

from configs import smoke_fashion_mnist
from contrastive import losses
from contrastive import models
from contrastive import optim
from contrastive import sharding
from contrastive import state as state_lib
from contrastive import train

IMAGE_SHAPE = (12, 12, 1)


def _config(method):
  if method == "fairkl":
    config = smoke_fashion_mnist.get_config("eps_supinfonce")
    config.loss.name = "fairkl"
    config.loss.kwargs = dict(epsilon=0.25, lambd=1.0, kld=1.0)
  else:
    config = smoke_fashion_mnist.get_config(method)
  config.model.update(depth=10, width=0.125)
  config.model.head.hidden_dims = (32,)
  config.model.head.out_dim = 16
  return config


def _run_steps(config, mesh, batches, num_steps=2):
  model = models.create(config.model)
  schedule = optim.learning_rate_schedule(config.optim, 16, 10, 2)
  tx = optim.create(config.optim, schedule)
  state = state_lib.create_train_state(model, tx, jax.random.key(0),
                                       IMAGE_SHAPE, mesh)
  step = jax.jit(functools.partial(
      train.train_step, model=model, tx=tx,
      loss_fn=losses.get_with_metrics(config.loss.name),
      loss_config=config.loss, schedule=schedule))
  metrics = []
  with jax.set_mesh(mesh):
    for batch in batches[:num_steps]:
      state, m = step(state, sharding.make_global_batch(mesh, batch))
      metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics


# One case per way the step meets the global batch (all-gather, ring,
# blockwise) and per input the step threads through for one loss (bias
# labels: FairKL; prototypes in the model: ESupCon). That each loss is the
# same on 8 devices as on 1, value and gradient, is proven loss by loss in
# losses_test.py, infonce_family_test.py and ifnd_test.py; what the step
# adds (global BN, the gradient's sum over devices, the input plumbing) does
# not depend on the loss.
@pytest.mark.parametrize("method,loss_impl", [
    ("simclr", "gather"), ("supcon", "ring"), ("fairkl", "gather"),
    ("esupcon", "ring"), ("bregman", "blockwise")])
@pytest.mark.slow
def test_eight_devices_equal_one(method, loss_impl):
  rng = np.random.default_rng(0)
  batches = [{
      "image": rng.uniform(size=(16, 2, *IMAGE_SHAPE)).astype(np.float32),
      "label": rng.integers(0, 4, size=16).astype(np.int32),
      # Only the FairKL loss reads it; the others must ignore it.
      "bias_label": rng.integers(0, 3, size=16).astype(np.int32),
  } for _ in range(2)]
  config = _config(method)
  one = sharding.make_mesh(devices=jax.devices()[:1])
  eight = sharding.make_mesh()
  assert eight.size == 8
  state1, metrics1 = _run_steps(config, one, batches)
  # The streamed implementations on 8 devices against the gathered one on 1.
  config.loss.loss_impl = loss_impl
  state8, metrics8 = _run_steps(config, eight, batches)
  for m1, m8 in zip(metrics1, metrics8):
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    if method == "fairkl":
      np.testing.assert_allclose(m8["fairkl"], m1["fairkl"], rtol=1e-4,
                                 atol=1e-6)
  # The step changed the parameters and BN statistics, identically.
  assert int(state8.step) == 2
  flat1 = jax.tree.leaves_with_path(state1.params)
  flat8 = jax.tree.leaves(state8.params)
  for (path, p1), p8 in zip(flat1, flat8):
    np.testing.assert_allclose(p8, p1, rtol=1e-4, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))
  for s1, s8 in zip(jax.tree.leaves(state1.batch_stats),
                    jax.tree.leaves(state8.batch_stats)):
    np.testing.assert_allclose(s8, s1, rtol=1e-4, atol=1e-5)
  initial = state_lib.create_train_state(
      models.create(config.model),
      optim.create(config.optim, lambda _: 0.0), jax.random.key(0),
      IMAGE_SHAPE, one)
  moved = [not np.allclose(a, b) for a, b in
           zip(jax.tree.leaves(initial.batch_stats),
               jax.tree.leaves(state8.batch_stats))]
  assert all(moved)


def test_bias_label_loss_without_bias_labels_says_what_to_do():
  config = _config("fairkl")
  batch = {"image": np.zeros((8, 2, *IMAGE_SHAPE), np.float32),
           "label": np.arange(8, dtype=np.int32) % 2}
  with pytest.raises(ValueError, match="biased_fashion_mnist"):
    _run_steps(config, sharding.make_mesh(devices=jax.devices()[:1]),
               [batch], num_steps=1)


@pytest.mark.slow
def test_unicon_step_embeds_the_universum_and_trains():
  """UniCon's step makes universum images on each device and embeds them in
  a second pass; the step is deterministic and moves the parameters."""
  rng = np.random.default_rng(1)
  batches = [{
      "image": rng.uniform(size=(16, 2, *IMAGE_SHAPE)).astype(np.float32),
      "label": (np.arange(16) % 4).astype(np.int32),
  } for _ in range(2)]
  config = _config("unicon")
  mesh = sharding.make_mesh()
  # Two steps: the first has learning rate 0 (warm-up).
  state_a, metrics_a = _run_steps(config, mesh, batches)
  _, metrics_b = _run_steps(config, mesh, batches)
  assert all(np.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics_a)
  assert [m["loss"] for m in metrics_a] == [m["loss"] for m in metrics_b]
  initial = state_lib.create_train_state(
      models.create(config.model),
      optim.create(config.optim, lambda _: 0.0), jax.random.key(0),
      IMAGE_SHAPE, mesh)
  assert any(not np.allclose(a, b) for a, b in zip(
      jax.tree.leaves(initial.params), jax.tree.leaves(state_a.params)))
  config.grad_cache_chunks = 2
  with pytest.raises(ValueError, match="GradCache"):
    jax.eval_shape(functools.partial(
        train.train_step, model=models.create(config.model),
        tx=optim.create(config.optim, lambda _: 0.0),
        loss_fn=losses.get_with_metrics("unicon"), loss_config=config.loss,
        schedule=lambda _: 0.0, grad_cache_chunks=2), initial, batches[0])
