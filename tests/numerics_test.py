"""Numerics: losses stay finite at their edges; non-finite steps are caught.

Loss regressions: bf16 embeddings at tau = 0.05, anchors without positives,
identical embeddings, a very large batch. Then the trainer's guard: a
non-finite step stops the run before a checkpoint ("raise") or is skipped
("skip").
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import fake_fashion_mnist
from configs import smoke_fashion_mnist
from contrastive import losses
from contrastive import nonfinite
from contrastive import state as state_lib
from contrastive import train
from contrastive.data import fashion_mnist


def _normalized(rng, batch, views, dim, dtype=jnp.float32):
  z = rng.normal(size=(batch, views, dim)).astype(np.float32)
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  return jnp.asarray(z, dtype)


def _loss_and_grad(name, z, labels=None, **kwargs):
  fn = functools.partial(losses.get(name), temperature=kwargs.pop(
      "temperature"), **kwargs)
  return jax.value_and_grad(lambda x: fn(x, labels))(z)


def _assert_finite(*arrays):
  for array in arrays:
    assert np.all(np.isfinite(np.asarray(array, np.float32))), array


@pytest.mark.parametrize("name", ["simclr", "supcon"])
def test_bf16_embeddings_at_low_temperature(name):
  rng = np.random.default_rng(0)
  z32 = _normalized(rng, 64, 2, 32)
  labels = (jnp.asarray(rng.integers(0, 4, 64), jnp.int32)
            if name == "supcon" else None)
  loss16, grad16 = _loss_and_grad(name, z32.astype(jnp.bfloat16), labels,
                                  temperature=0.05)
  loss32, _ = _loss_and_grad(name, z32, labels, temperature=0.05)
  assert loss16.dtype == jnp.float32
  _assert_finite(loss16, grad16)
  # bf16 keeps ~3 significant digits of each similarity; 1/tau = 20 scales
  # the error, so agreement is to a few percent, not to float32 precision.
  np.testing.assert_allclose(loss16, loss32, rtol=0.05)


@pytest.mark.parametrize("variant", ["out", "in"])
def test_anchors_without_positives(variant):
  rng = np.random.default_rng(1)
  # One view and unique labels: no anchor has a positive at all.
  z = _normalized(rng, 8, 1, 16)
  loss, grad = _loss_and_grad("supcon", z, jnp.arange(8, dtype=jnp.int32),
                              temperature=0.1, variant=variant)
  _assert_finite(loss, grad)
  assert float(loss) == 0.0
  np.testing.assert_array_equal(grad, 0.0)
  # Some anchors without positives: they are left out of the mean.
  labels = jnp.asarray([0, 0, 1, 2, 3, 4, 5, 6], jnp.int32)
  loss, grad = _loss_and_grad("supcon", z, labels, temperature=0.1,
                              variant=variant)
  _assert_finite(loss, grad)
  assert float(loss) > 0


@pytest.mark.parametrize("name", ["simclr", "supcon"])
def test_identical_embeddings(name):
  z = jnp.ones((16, 2, 8), jnp.float32) / jnp.sqrt(8.0)
  labels = jnp.zeros(16, jnp.int32) if name == "supcon" else None
  loss, grad = _loss_and_grad(name, z, labels, temperature=0.05)
  _assert_finite(loss, grad)
  # Every logit equal: each positive has probability 1 / (2 * 16 - 1).
  np.testing.assert_allclose(loss, np.log(31.0), rtol=1e-5)


@pytest.mark.slow
def test_very_large_batch():
  rng = np.random.default_rng(2)
  z = _normalized(rng, 4096, 2, 64)
  loss, grad = _loss_and_grad("simclr", z, temperature=0.05)
  _assert_finite(loss, grad)
  # Random unit vectors in 64-d: logits ~ N(0, sigma^2), sigma = 1 / (tau *
  # 8), so the loss is near log(#others) + sigma^2 / 2 (lognormal mean); a
  # float32 sum over 8191 terms must not drift from it.
  sigma = 1 / (0.05 * 8)
  assert abs(float(loss) - (np.log(2 * 4096 - 1) + sigma**2 / 2)) < 0.5


# The trainer's guard.


def _toy_step(state, batch):
  """Adds the batch to the params: non-finite batches poison them."""
  params = jax.tree.map(lambda p: p + batch, state.params)
  loss = jnp.sum(batch)
  metrics = {"loss": loss, "grad_norm": jnp.abs(loss),
             "param_norm": jnp.sum(params["w"])}
  return state.replace(step=state.step + 1, params=params), metrics


def _toy_state():
  return state_lib.TrainState(step=jnp.zeros((), jnp.int32),
                              params={"w": jnp.ones(3)}, batch_stats={},
                              opt_state=())


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_guard_counts_and_reports_the_first_bad_step(policy):
  step = jax.jit(nonfinite.guard(_toy_step, policy))
  state, tally = _toy_state(), nonfinite.initial_tally()
  for value in (1.0, np.nan, 2.0, np.inf):
    state, tally, _ = step(state, tally, jnp.full(3, value))
  assert int(state.step) == 4
  if policy == "raise":
    with pytest.raises(FloatingPointError, match=r"at step 2 \(3 step"):
      nonfinite.check(tally, policy)
  else:
    assert nonfinite.check(tally, policy) == 2
    # The bad steps left the state as it was: 1 + 1 + 2.
    np.testing.assert_array_equal(state.params["w"], [4.0, 4.0, 4.0])


@pytest.fixture
def nan_loss_config(tmp_path, monkeypatch):
  source = tmp_path / "source"
  source.mkdir()
  fake_fashion_mnist.write(source, num_train=64, num_test=16)
  monkeypatch.setenv(fashion_mnist.ENV_VAR, str(source))
  real = train.losses.get_with_metrics

  def nan_loss(name):
    def fn(*args, **kwargs):
      loss, metrics = real(name)(*args, **kwargs)
      return loss * jnp.nan, metrics
    return fn

  monkeypatch.setattr(train.losses, "get_with_metrics", nan_loss)
  config = smoke_fashion_mnist.get_config("simclr")
  config.model.update(depth=10, width=0.125)
  config.model.head.update(hidden_dims=(32,), out_dim=16)
  config.input.update(data_dir=str(tmp_path / "tfds"), batch_size=16)
  config.total_steps = 3
  config.log_every_steps = 2
  config.checkpoint_every_steps = 1
  config.linear_eval.enabled = False
  return config


@pytest.mark.slow
def test_nan_loss_stops_before_any_checkpoint(nan_loss_config, tmp_path):
  workdir = str(tmp_path / "run")
  with pytest.raises(FloatingPointError, match="at step 1 "):
    train.train_and_evaluate(nan_loss_config, workdir)
  assert not os.listdir(os.path.join(workdir, "checkpoints"))


@pytest.mark.slow
def test_nan_loss_skipped_keeps_the_state_finite(nan_loss_config, tmp_path):
  nan_loss_config.nonfinite = "skip"
  workdir = str(tmp_path / "run")
  result = train.train_and_evaluate(nan_loss_config, workdir)
  assert result["step"] == 3
  assert result["train"]["skipped_steps"] == 3
  # Metrics describe the attempted step; the saved state is the kept one.
  with ocp.StandardCheckpointer() as checkpointer:
    saved = checkpointer.restore(os.path.join(workdir, "checkpoints", "3",
                                              "default"))
  assert int(saved["step"]) == 3
  for leaf in jax.tree.leaves(saved):
    _assert_finite(leaf)
