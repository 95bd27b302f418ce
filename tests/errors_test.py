"""Every bad input fails before any work is lost, with a one-line fix.

Each test feeds one mistake and asserts the message names it and says what
to do. None trains: the checks run before the first step.
"""

import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest

import fake_fashion_mnist
from configs import smoke_fashion_mnist
from contrastive import checkpoint
from contrastive import config_checks
from contrastive import run_dir
from contrastive import state as state_lib
from contrastive import train
from contrastive import training_loop
from contrastive.data import fashion_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  source = tmp_path_factory.mktemp("fashion_mnist_src")
  fake_fashion_mnist.write(source, num_train=64, num_test=16)
  return str(source), str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def config(data, monkeypatch):
  monkeypatch.setenv(fashion_mnist.ENV_VAR, data[0])
  config = smoke_fashion_mnist.get_config("simclr")
  config.model.update(depth=10, width=0.125)
  config.input.update(data_dir=data[1], batch_size=16)
  config.total_steps = 2
  config.linear_eval.enabled = False
  return config


def _one_line(error) -> str:
  message = str(error.value)
  assert "\n" not in message, message
  return message


def _main(*args):
  return subprocess.run(
      [sys.executable, "-m", "contrastive.main",
       "--config=configs/smoke_fashion_mnist.py:simclr", *args], cwd=REPO,
      capture_output=True, text=True, timeout=300, check=False,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})


# Config keys and types (refused by the locked config on the command line).


@pytest.mark.slow
def test_unknown_config_key(tmp_path):
  proc = _main(f"--workdir={tmp_path}", "--config.optim.lrr=0.1")
  assert proc.returncode != 0
  last_line = proc.stderr.strip().splitlines()[-1]
  assert last_line.startswith(
      "FATAL Config override error: unknown config key 'lrr'.")
  assert 'Did you mean "lr"' in last_line


@pytest.mark.slow
def test_wrong_config_type(tmp_path):
  proc = _main(f"--workdir={tmp_path}", "--config.total_steps=ten")
  assert proc.returncode != 0
  assert "total_steps" in proc.stderr and "ten" in proc.stderr
  assert not os.listdir(tmp_path)  # Nothing started.


# Batch, data, workdir.


def test_batch_not_divisible_by_devices(config, tmp_path):
  config.input.batch_size = 12
  with pytest.raises(ValueError) as error:
    train.train_and_evaluate(config, str(tmp_path))
  message = _one_line(error)
  assert "Global batch 12" in message
  assert "per host 12" in message and "per device 1.5" in message
  assert "multiple of 8" in message


def test_dataset_not_prepared(config, tmp_path):
  config.input.update(dataset="imagenet2012", data_dir=str(tmp_path / "none"))
  with pytest.raises(FileNotFoundError) as error:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert "python -m contrastive.data.prepare imagenet2012" in str(error.value)


def test_wrong_split_name(config, tmp_path):
  config.input.train_split = "validation"
  with pytest.raises(ValueError) as error:
    train.train_and_evaluate(config, str(tmp_path))
  message = _one_line(error)
  assert "Invalid split 'validation'" in message
  assert "Available splits: ['test', 'train']" in message


def test_workdir_not_writable(config, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(PermissionError) as error:
    train.train_and_evaluate(config, str(blocker / "run"))
  message = _one_line(error)
  assert str(blocker / "run") in message and "--workdir" in message


# Checkpoints and configs of another run.


def _state(kernel_shape):
  params = {"dense": {"kernel": jnp.ones(kernel_shape), "bias": jnp.zeros(3)}}
  return state_lib.TrainState(step=jnp.asarray(1, jnp.int32), params=params,
                              batch_stats={},
                              opt_state=optax.sgd(0.1).init(params))


def test_checkpoint_of_another_model_names_mismatched_keys(tmp_path):
  manager = checkpoint.create_manager(str(tmp_path), keep=2)
  checkpoint.save(manager, _state((4, 3)))
  manager.wait_until_finished()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          _state((5, 3)))
  with pytest.raises(checkpoint.IncompatibleCheckpointError) as error:
    checkpoint.restore_latest(manager, abstract)
  message = _one_line(error)
  assert "params/dense/kernel: checkpoint (4, 3) vs model (5, 3)" in message
  assert "params/dense/bias" not in message
  assert "new --workdir" in message
  assert manager.all_steps() == [1]  # Refused, not treated as corrupt.
  manager.close()


def test_workdir_of_another_config_refuses_unless_forced(config, tmp_path):
  workdir = str(tmp_path)
  run_dir.check_config(workdir, config, has_checkpoint=False)
  changed = config.copy_and_resolve_references()
  changed.loss.temperature = 0.7
  changed.log_every_steps = 7  # Ignored: does not change the run.
  changed.total_steps = 50  # Ignored: extending a run is allowed.
  with pytest.raises(run_dir.ConfigMismatchError) as error:
    run_dir.check_config(workdir, changed, has_checkpoint=True)
  message = _one_line(error)
  assert "loss.temperature: 0.2 -> 0.7" in message
  assert "log_every_steps" not in message and "total_steps" not in message
  assert "--config.resume=force" in message
  changed.resume = "force"
  run_dir.check_config(workdir, changed, has_checkpoint=True)
  changed.resume = "auto"  # The record now holds the forced config.
  run_dir.check_config(workdir, changed, has_checkpoint=True)


def test_resuming_with_a_new_length_says_the_schedule_jumps(config, tmp_path,
                                                           caplog):
  workdir = str(tmp_path)
  run_dir.check_config(workdir, config, has_checkpoint=False)
  with caplog.at_level(logging.WARNING):
    run_dir.check_config(workdir, config, has_checkpoint=True)
  assert not caplog.records  # Same length: nothing to say.
  longer = config.copy_and_resolve_references()
  longer.total_steps = 50
  with caplog.at_level(logging.WARNING):
    run_dir.check_config(workdir, longer, has_checkpoint=True)
  [record] = caplog.records
  message = record.getMessage()
  assert "(2, " in message and "(50, " in message
  assert "learning rate jumps" in message and "new --workdir" in message


@pytest.mark.parametrize("warmup_epochs, total_steps, warmup, warned", [
    (10, 5, 5, True),  # All warm-up: clipped, and said so.
    (1, 4, 4, True),  # A warm-up as long as the run, too.
    (0.5, 4, 2, False),
])
def test_warmup_longer_than_the_run_is_clipped_and_said(
    config, caplog, warmup_epochs, total_steps, warmup, warned):
  config.optim.warmup_epochs = warmup_epochs
  config.total_steps = total_steps
  with caplog.at_level(logging.WARNING):
    steps = training_loop.steps_for(config, num_train_examples=64)
  assert steps == (total_steps, warmup, 4)  # 64 images / batch 16.
  messages = [r.getMessage() for r in caplog.records]
  if warned:
    [message] = messages
    assert f"warm-up (optim.warmup_epochs={warmup_epochs}" in message
    assert "the whole run is warm-up" in message
  else:
    assert not messages


def test_config_mismatch_stops_train_and_evaluate_before_restoring(
    config, tmp_path):
  workdir = str(tmp_path)
  run_dir.check_config(workdir, config, has_checkpoint=False)
  manager = checkpoint.create_manager(workdir, keep=2)
  checkpoint.save(manager, _state((4, 3)))
  manager.close()
  config.model.width = 0.25
  with pytest.raises(run_dir.ConfigMismatchError, match="model.width"):
    train.train_and_evaluate(config, workdir)


# Loss and policy options.


@pytest.mark.parametrize("key, value, expected", [
    ("loss.temperature", 0.0, "config.loss.temperature must be a number > 0"),
    ("loss.temperature", -0.1, "config.loss.temperature must be a number > 0"),
    ("loss.name", "infonce", "config.loss.name='infonce' is not one of"),
    ("loss.kwargs", {"variant": "both"},
     "config.loss.kwargs.variant='both' is not one of ('out', 'in')"),
    ("loss.kwargs", {"contrast_mode": "some"},
     "config.loss.kwargs.contrast_mode='some' is not one of"),
    ("loss.kwargs", {"base_temperature": 0.0},
     "config.loss.kwargs.base_temperature must be a number > 0"),
    ("loss.kwargs", {"varient": "out"}, "option(s) ['varient']"),
    ("nonfinite", "ignore", "config.nonfinite='ignore' is not one of"),
    ("resume", "yes", "config.resume='yes' is not one of"),
    ("checkpoint_every_steps", 0, "checkpoint_every_steps must be an integer"),
])
def test_invalid_option(config, key, value, expected):
  if key == "loss.kwargs":
    config.loss.name = "supcon"
    config.loss.use_labels = True
  *parents, leaf = key.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  with node.ignore_type():
    node[leaf] = value
  with pytest.raises(ValueError) as error:
    config_checks.validate(config)
  assert expected in _one_line(error)
