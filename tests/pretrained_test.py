"""`pretrained.load`: config, model and encoder variables from a workdir."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fake_fashion_mnist
from configs import smoke_fashion_mnist
from contrastive import checkpoint
from contrastive import models
from contrastive import pretrained
from contrastive import run_dir
from contrastive import state as state_lib
from contrastive import train
from contrastive.data import fashion_mnist

IMAGE_SHAPE = (28, 28, 1)


def tiny_config(data_dir: str | None = None):
  """The smoke config, shrunk to train 2 steps on the fake Fashion-MNIST."""
  config = smoke_fashion_mnist.get_config("simclr")
  config.model.update(depth=10, width=0.125)
  config.model.head.update(hidden_dims=(32,), out_dim=16)
  config.input.update(data_dir=data_dir, batch_size=16, shuffle_buffer=96)
  config.total_steps = 2
  config.log_every_steps = 1
  config.linear_eval.update(enabled=False, batch_size=16)
  return config


def train_tiny_run(workdir: str, fake_source: str, data_dir: str,
                   **overrides) -> dict:
  """Trains `tiny_config` into `workdir`; returns the checkpointed params.

  `fake_source` holds `fake_fashion_mnist` files (FASHION_MNIST_DIR must
  name it); the return value is what the last `checkpoint.save` was given.
  """
  config = tiny_config(data_dir)
  config.update(overrides)
  saved = {}
  real_save = checkpoint.save

  def recording_save(manager, state, **kwargs):
    saved.update(jax.device_get({"params": state.params,
                                 "batch_stats": state.batch_stats}))
    real_save(manager, state, **kwargs)

  old_source = os.environ.get(fashion_mnist.ENV_VAR)
  os.environ[fashion_mnist.ENV_VAR] = fake_source
  checkpoint.save = recording_save
  try:
    train.train_and_evaluate(config, workdir)
  finally:
    checkpoint.save = real_save
    if old_source is None:
      del os.environ[fashion_mnist.ENV_VAR]
    else:
      os.environ[fashion_mnist.ENV_VAR] = old_source
  return saved


def _assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert isinstance(a, np.ndarray)
    np.testing.assert_array_equal(a, np.asarray(e))


def _save_state(workdir, config, state):
  run_dir.ensure_writable(workdir)
  run_dir.check_config(workdir, config, has_checkpoint=False)
  manager = checkpoint.create_manager(workdir, keep=3)
  checkpoint.save(manager, state, force=True)
  manager.wait_until_finished()
  manager.close()


def _state(model, params, batch_stats, step: int):
  tx = optax.sgd(0.1, momentum=0.9)
  return state_lib.TrainState(
      step=jnp.asarray(step, jnp.int32), params=params,
      batch_stats=batch_stats, opt_state=tx.init(params))


def _init(model, seed: int, method=None):
  """Variables of the model's shapes, random values (no slow real init)."""
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((2, *IMAGE_SHAPE)), False, method=method))
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: rng.normal(size=x.shape).astype(x.dtype), shapes)


def _contrastive_state(model, step: int):
  variables = _init(model, step)
  return _state(model, variables["params"], variables["batch_stats"], step)


def test_loads_the_latest_contrastive_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config()
  model = models.create(config.model)
  _save_state(workdir, config, _contrastive_state(model, 1))
  new = _contrastive_state(model, 5)
  _save_state(workdir, config, new)

  loaded_config, loaded_model, variables = pretrained.load(workdir)

  assert loaded_config.model.width == 0.125
  assert list(loaded_config.model.head.hidden_dims) == [32]
  assert loaded_model == model
  assert sorted(variables) == ["batch_stats", "params"]
  _assert_trees_equal(variables["params"], jax.device_get(new.params))
  _assert_trees_equal(variables["batch_stats"],
                      jax.device_get(new.batch_stats))
  features = loaded_model.apply(variables, jnp.ones((3, *IMAGE_SHAPE)),
                                method=loaded_model.features)
  assert features.shape == (3, 64)


def test_supervised_checkpoint_gives_the_encoder(tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config()
  config.trainer = "supervised"
  model = models.create(config.model)
  encoder = _init(model, 0,
                  method=lambda m, x, train: m.encoder(x, train=train))
  params = {"encoder": encoder["params"],
            "classifier": {"kernel": jnp.ones((64, 10)),
                           "bias": jnp.zeros((10,))}}
  _save_state(workdir, config,
              _state(model, params, encoder["batch_stats"], 3))

  _, loaded_model, variables = pretrained.load(workdir)

  _assert_trees_equal(variables["params"],
                      jax.device_get(encoder["params"]))
  _assert_trees_equal(variables["batch_stats"],
                      jax.device_get(encoder["batch_stats"]))
  features = loaded_model.apply(variables, jnp.ones((2, *IMAGE_SHAPE)),
                                method=loaded_model.features)
  assert features.shape == (2, 64)


def test_directory_without_config_fails_clearly(tmp_path):
  with pytest.raises(ValueError, match="no config.json"):
    pretrained.load(str(tmp_path))


def test_workdir_without_checkpoint_fails_clearly(tmp_path):
  run_dir.check_config(str(tmp_path), tiny_config(), has_checkpoint=False)
  with pytest.raises(ValueError, match="No checkpoint in .*checkpoints"):
    pretrained.load(str(tmp_path))
  os.makedirs(tmp_path / "checkpoints")  # Created, never saved into.
  with pytest.raises(ValueError, match="No checkpoint"):
    pretrained.load(str(tmp_path))


@pytest.mark.slow
def test_loads_the_final_state_of_a_training_run(tmp_path):
  source = tmp_path / "fashion_mnist_src"
  source.mkdir()
  fake_fashion_mnist.write(source, num_train=96, num_test=40)
  workdir = str(tmp_path / "run")
  final = train_tiny_run(workdir, str(source), str(tmp_path / "tfds"))

  config, model, variables = pretrained.load(workdir)

  assert config.trainer == "contrastive"
  assert config.total_steps == 2
  _assert_trees_equal(variables, final)
  features = model.apply(variables, np.ones((4, *IMAGE_SHAPE), np.float32),
                         method=model.features)
  assert features.shape == (4, 64)
  assert np.all(np.isfinite(features))


def test_damaged_checkpoint_fails_clearly(tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config()
  _save_state(workdir, config,
              _contrastive_state(models.create(config.model), 1))
  item = tmp_path / "run" / "checkpoints" / "1" / "default"
  for name in os.listdir(item):  # Every file cut to nothing.
    if os.path.isfile(item / name):
      (item / name).write_bytes(b"")
  with pytest.raises(ValueError, match="Checkpoint .*1.* damaged"):
    pretrained.load(workdir)
