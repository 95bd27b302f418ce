"""contrastive/supervised.py: the CE baseline and fine-tuning trainer."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import fake_fashion_mnist
from configs import ce_fashion_mnist
from configs import finetune_fashion_mnist
from configs import finetune_imagenet
from configs import smoke_fashion_mnist
from contrastive import main
from contrastive import models
from contrastive import optim
from contrastive import preemption
from contrastive import sharding
from contrastive import supervised
from contrastive import train
from contrastive import throughput
from contrastive.data import fashion_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
# Metrics that measure time, not the computation.
_TIMING_KEYS = ("train_time_sec", *throughput.TIMING_METRICS)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """(FASHION_MNIST_DIR, TFDS data_dir) with 64 fake training images."""
  source = tmp_path_factory.mktemp("fashion_mnist_src")
  fake_fashion_mnist.write(source, num_train=64, num_test=16)
  return str(source), str(tmp_path_factory.mktemp("tfds"))


def _tiny(config, data_dir):
  config.model.update(depth=10, width=0.125)
  config.model.head.update(hidden_dims=(32,), out_dim=16)
  config.input.update(data_dir=data_dir, batch_size=16, shuffle_buffer=64)
  config.total_steps = 4
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.linear_eval.update(enabled=False, batch_size=16, steps=20)
  return config


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _final_arrays(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step), "default")
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(path)
  return jax.tree_util.tree_flatten_with_path(jax.device_get(restored))[0]


def test_configs_load_and_match_the_smoke_run():
  smoke = smoke_fashion_mnist.get_config("supcon")
  ce = ce_fashion_mnist.get_config()
  assert ce.trainer == "supervised" and ce.input.views == 1
  for key in ("depth", "width", "cifar_stem"):
    assert ce.model[key] == smoke.model[key]
  assert (ce.input.batch_size, ce.input.image_size, ce.total_epochs,
          ce.optim.name) == (smoke.input.batch_size, smoke.input.image_size,
                             smoke.total_epochs, smoke.optim.name)
  assert ce.linear_eval.enabled and not ce.linear_eval.raw_pixel_baseline
  assert ce.input.augment.color_jitter_prob == 0.0
  splits = {arg: finetune_fashion_mnist.get_config(arg).input.train_split
            for arg in ("1pct", "10pct", "100pct")}
  assert splits == {"1pct": "train[:1%]", "10pct": "train[:10%]",
                    "100pct": "train"}
  imagenet = finetune_imagenet.get_config("10pct")
  assert imagenet.input.dataset == "imagenet2012_subset/10pct"
  assert (imagenet.optim.name, imagenet.optim.nesterov,
          imagenet.optim.weight_decay) == ("sgd", True, 0.0)
  assert finetune_imagenet.get_config().input.dataset.endswith("/1pct")
  with pytest.raises(ValueError, match="Variant"):
    finetune_fashion_mnist.get_config("5pct")


def test_main_dispatches_on_trainer_and_rejects_unknown_names():
  assert main.get_trainer("supervised") is supervised.train_and_evaluate
  assert main.get_trainer("contrastive") is train.train_and_evaluate
  with pytest.raises(ValueError, match="'supcon'.*contrastive.*supervised"):
    main.get_trainer("supcon")


def test_rejects_more_than_one_view(tmp_path):
  config = ce_fashion_mnist.get_config()
  config.input.views = 2
  with pytest.raises(ValueError, match="views=1"):
    supervised.train_and_evaluate(config, str(tmp_path))


def _one_step(config, mesh, batch, image_shape):
  """(params before, params after, batch_stats after, metrics) of one step."""
  model = models.create(config.model)
  schedule = optim.learning_rate_schedule(config.optim, 16, 10, 0)
  tx = optim.create(config.optim, schedule)
  state = supervised.create_train_state(model, tx, jax.random.key(0),
                                        image_shape, NUM_CLASSES, mesh)
  before = jax.device_get(state.params)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  step = jax.jit(
      functools.partial(supervised.train_step, model=model, tx=tx,
                        schedule=schedule, label_smoothing=0.1),
      in_shardings=(shardings, sharding.batch_sharding(mesh)),
      out_shardings=(shardings, sharding.replicated(mesh)))
  with jax.set_mesh(mesh):
    state, metrics = step(state, sharding.make_global_batch(mesh, batch))
  return before, *jax.device_get((state.params, state.batch_stats, metrics))


@pytest.mark.slow
def test_step_on_8_devices_equals_1_device():
  config = _tiny(ce_fashion_mnist.get_config(), None)
  # Small images keep the two compilations short; BN statistics over the
  # global batch are what differs between 1 and 8 devices if anything does.
  image_shape = (8, 8, 1)
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(size=(16, 1, *image_shape)).astype(np.float32),
           "label": rng.integers(0, NUM_CLASSES, 16).astype(np.int32)}
  assert len(jax.devices()) == 8
  one = _one_step(config, sharding.make_mesh(devices=jax.devices()[:1]),
                  batch, image_shape)
  eight = _one_step(config, sharding.make_mesh(), batch, image_shape)
  # The step moved the parameters (else equality would prove nothing).
  assert not np.allclose(one[1][supervised.CLASSIFIER]["kernel"],
                         one[0][supervised.CLASSIFIER]["kernel"])
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_overfits_a_tiny_subset(data, tmp_path, monkeypatch):
  monkeypatch.setenv(fashion_mnist.ENV_VAR, data[0])
  config = _tiny(ce_fashion_mnist.get_config(), data[1])
  config.input.update(train_split="train[:32]", batch_size=32)
  # No augmentation: the same 32 images every step.
  config.input.augment.update(crop_area_min=1.0, crop_aspect_min=1.0,
                              crop_aspect_max=1.0, flip=False)
  config.optim.update(name="adamw", lr=1e-2, lr_scaling="none",
                      weight_decay=0.0, warmup_epochs=0.0)
  config.total_steps = 60
  config.log_every_steps = 20
  config.checkpoint_every_steps = 100
  workdir = str(tmp_path / "run")
  result = supervised.train_and_evaluate(config, workdir)
  rows = _rows(workdir)
  assert [r["step"] for r in rows] == [20, 40, 60]
  for key in ("loss", "train_top1", "learning_rate", "grad_norm",
              "images_per_sec", "images_per_sec_per_device", "epoch",
              "train_time_sec"):
    assert key in rows[-1], key
  assert 0 < rows[0]["train_time_sec"] < rows[-1]["train_time_sec"]
  assert rows[0]["loss"] > rows[-1]["loss"]
  assert rows[-1]["train_top1"] == 1.0
  assert rows[-1]["loss"] < 0.05
  classifier = result["classifier"]
  assert classifier["num_test"] == 16
  assert 0.0 <= classifier["top1"] <= classifier["top5"] <= 1.0
  with open(os.path.join(workdir, "classifier_eval.json")) as f:
    assert json.load(f)["top1"] == classifier["top1"]


def _contrastive_workdir(data, tmp_path):
  """A pretraining workdir holding one checkpoint (step 0, seed 3): what a
  finished run leaves, without compiling a contrastive step."""
  config = _tiny(smoke_fashion_mnist.get_config("supcon"), data[1])
  config.seed = 3
  config.total_steps = 0
  workdir = str(tmp_path / "pretrain")
  train.train_and_evaluate(config, workdir)
  return config, workdir


@pytest.mark.slow
def test_finetuning_starts_from_the_pretrained_encoder(data, tmp_path,
                                                        monkeypatch):
  pytest.importorskip("contrastive.pretrained")
  monkeypatch.setenv(fashion_mnist.ENV_VAR, data[0])
  _, pretrain_dir = _contrastive_workdir(data, tmp_path)
  # What the pretraining run saved, read back without contrastive.pretrained.
  path = os.path.join(pretrain_dir, "checkpoints", "0", "default")
  with ocp.StandardCheckpointer() as checkpointer:
    saved = jax.device_get(checkpointer.restore(path))
  mesh = sharding.make_mesh()

  config = _tiny(ce_fashion_mnist.get_config(), data[1])
  config.supervised.init_from = pretrain_dir
  model = models.create(config.model)
  tx = optim.create(config.optim, lambda _: 0.0)
  encoder = supervised.encoder_variables_of(config, model, IMAGE_SHAPE)
  state = supervised.create_train_state(model, tx, jax.random.key(0),
                                        IMAGE_SHAPE, NUM_CLASSES, mesh,
                                        encoder)
  got = jax.device_get(state.params[supervised.ENCODER])
  want = {"encoder": saved["params"]["encoder"]}
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  want_stats = {"encoder": saved["batch_stats"]["encoder"]}
  for a, b in zip(jax.tree.leaves(state.batch_stats),
                  jax.tree.leaves(want_stats)):
    np.testing.assert_array_equal(a, b)
  classifier = jax.device_get(state.params[supervised.CLASSIFIER])
  assert classifier["kernel"].shape == (8 * 8, NUM_CLASSES)
  assert not np.any(classifier["kernel"]) and not np.any(classifier["bias"])
  # Seed 3 vs seed 0: a fresh init would not have matched.
  scratch = supervised.create_train_state(model, tx, jax.random.key(0),
                                          IMAGE_SHAPE, NUM_CLASSES, mesh)
  assert not all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(scratch.params[supervised.ENCODER]),
      jax.tree.leaves(got)))

  config.model.depth = 34
  with pytest.raises(ValueError, match="model.depth: pretrained 10 vs 34"):
    supervised.encoder_variables_of(config, models.create(config.model),
                                    IMAGE_SHAPE)


class _StopAfterTwo(preemption.Watcher):
  """SIGTERM as if received during step 2."""

  def reached(self, step):
    return step >= 2


@pytest.mark.slow
def test_resumes_after_preemption_as_the_uninterrupted_run(data, tmp_path,
                                                           monkeypatch):
  monkeypatch.setenv(fashion_mnist.ENV_VAR, data[0])
  config = _tiny(ce_fashion_mnist.get_config(), data[1])
  reference = str(tmp_path / "reference")
  assert supervised.train_and_evaluate(config, reference)["step"] == 4

  workdir = str(tmp_path / "run")
  with monkeypatch.context() as patch:
    patch.setattr(preemption, "Watcher", _StopAfterTwo)
    result = supervised.train_and_evaluate(config, workdir)
  assert result["preempted"] and result["step"] == 2
  assert "classifier" not in result
  result = supervised.train_and_evaluate(config, workdir)
  assert not result["preempted"] and result["step"] == 4

  expected = {row["step"]: row for row in _rows(reference)}
  rows = _rows(workdir)
  assert [row["step"] for row in rows] == [1, 2, 3, 4]
  for row in rows:
    for key, value in row.items():
      if key not in _TIMING_KEYS:
        np.testing.assert_equal(value, expected[row["step"]][key], key)
  for (path, a), (_, b) in zip(_final_arrays(workdir, 4),
                               _final_arrays(reference, 4)):
    assert a.tobytes() == b.tobytes(), jax.tree_util.keystr(path)


@pytest.mark.slow
def test_command_line_prints_classifier_and_linear_eval(data, tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "contrastive.main",
       "--config=configs/ce_fashion_mnist.py", f"--workdir={tmp_path / 'run'}",
       f"--config.input.data_dir={data[1]}", "--config.total_steps=2",
       "--config.input.batch_size=16", "--config.model.depth=10",
       "--config.model.width=0.125",
       "--config.linear_eval.steps=10", "--config.linear_eval.batch_size=16"],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
      env={**os.environ, fashion_mnist.ENV_VAR: data[0],
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert ("Classifier after 2 steps on fashion_mnist_idx test (16 images): "
          "top-1" in proc.stdout)
  assert "| frozen encoder (64-d) after 2 steps |" in proc.stdout
  assert proc.stdout.strip().splitlines()[-1].startswith(
      "Time budget: set-up "), proc.stdout[-500:]
  for phase in ("training", "evaluation", "total"):
    assert f", {phase} " in proc.stdout.strip().splitlines()[-1]
