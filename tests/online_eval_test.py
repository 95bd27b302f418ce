"""The online probe never moves the encoder; periodic evaluation is logged."""

import functools
import json
import os
import time

import jax
import numpy as np
import pytest

import fake_fashion_mnist
from configs import smoke_fashion_mnist
from contrastive import losses
from contrastive import models
from contrastive import optim
from contrastive import sharding
from contrastive import state as state_lib
from contrastive import train
from contrastive.data import fashion_mnist
from contrastive.evaluation import online

IMAGE_SHAPE = (12, 12, 1)
NUM_CLASSES = 4


def _config(method="supcon"):
  config = smoke_fashion_mnist.get_config(method)
  config.model.update(depth=10, width=0.125)
  config.model.head.hidden_dims = (32,)
  config.model.head.out_dim = 16
  return config


def _batch(seed=0, size=16):
  rng = np.random.default_rng(seed)
  return {
      "image": rng.uniform(size=(size, 2, *IMAGE_SHAPE)).astype(np.float32),
      "label": rng.integers(0, NUM_CLASSES, size=size).astype(np.int32),
  }


def _one_step(config, mesh, *, probe: bool, grad_cache_chunks=0,
              probe_lr=0.5):
  model = models.create(config.model)
  schedule = optim.learning_rate_schedule(config.optim, 16, 10, 2)
  tx = optim.create(config.optim, schedule)
  probe_tx = online.probe_optimizer(probe_lr, 10) if probe else None
  state = state_lib.create_train_state(
      model, tx, jax.random.key(0), IMAGE_SHAPE, mesh, probe_tx=probe_tx,
      num_classes=NUM_CLASSES)
  step = jax.jit(functools.partial(
      train.train_step, model=model, tx=tx,
      loss_fn=losses.get_with_metrics(config.loss.name),
      loss_config=config.loss, schedule=schedule,
      grad_cache_chunks=grad_cache_chunks, probe_tx=probe_tx))
  with jax.set_mesh(mesh):
    new_state, metrics = step(state, sharding.make_global_batch(mesh,
                                                                _batch()))
  return jax.device_get(state), jax.device_get(new_state), jax.device_get(
      metrics)


def _assert_trees_equal(a, b, **tolerance):
  for (path, x), y in zip(jax.tree.leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, err_msg=jax.tree_util.keystr(path),
                               **tolerance)


@pytest.mark.slow
def test_probe_does_not_change_the_encoder_step():
  config = _config()
  mesh = sharding.make_mesh()
  _, without, metrics_without = _one_step(config, mesh, probe=False)
  before, with_probe, metrics_with = _one_step(config, mesh, probe=True)
  # The encoder, its BN statistics and its optimizer: bit-identical.
  _assert_trees_equal(with_probe.params, without.params, rtol=0, atol=0)
  _assert_trees_equal(with_probe.batch_stats, without.batch_stats, rtol=0,
                      atol=0)
  _assert_trees_equal(with_probe.opt_state, without.opt_state, rtol=0,
                      atol=0)
  assert metrics_with["grad_norm"] == metrics_without["grad_norm"]
  assert without.probe_params == {}
  # The probe itself took a step from zero, on all 16 x 2 views.
  assert not np.allclose(with_probe.probe_params["kernel"], 0)
  np.testing.assert_array_equal(before.probe_params["kernel"], 0)
  # Zero-initialised probe: uniform logits, loss log(C) at the first step.
  np.testing.assert_allclose(metrics_with["probe_loss"], np.log(NUM_CLASSES),
                             rtol=1e-6)


def test_probe_step_matches_numpy_softmax_regression_gradient():
  rng = np.random.default_rng(1)
  features = (rng.normal(size=(32, 6)) * 5 + 3).astype(np.float32)
  labels = rng.integers(0, 3, size=32).astype(np.int32)
  params = online.probe_init(6, 3)
  params.update(kernel=rng.normal(size=(6, 3)).astype(np.float32) * 0.1,
                bias=rng.normal(size=3).astype(np.float32) * 0.1)
  lr = 0.3
  tx = online.probe_optimizer(lr, total_steps=1000)
  new_params, _, metrics = online.probe_step(
      params, online.probe_optimizer_init(tx, params), features, labels, tx)
  # Independent: softmax regression on batch-standardised features, float64.
  x = features.astype(np.float64)
  x = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
  logits = x @ params["kernel"] + params["bias"]
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  onehot = np.eye(3)[labels]
  loss = -np.mean(np.log(p[np.arange(32), labels]))
  grad_kernel = x.T @ (p - onehot) / 32
  grad_bias = (p - onehot).mean(0)
  np.testing.assert_allclose(metrics["probe_loss"], loss, rtol=1e-5)
  # First SGD step with momentum: params - lr(0) * grad.
  np.testing.assert_allclose(new_params["kernel"],
                             params["kernel"] - lr * grad_kernel, atol=1e-5)
  np.testing.assert_allclose(new_params["bias"],
                             params["bias"] - lr * grad_bias, atol=1e-6)
  # Running statistics move 10% of the way to the batch's.
  np.testing.assert_allclose(new_params["feature_mean"],
                             0.1 * features.mean(0), rtol=1e-5)
  np.testing.assert_allclose(new_params["feature_var"],
                             0.9 + 0.1 * features.var(0), rtol=1e-5)


def test_probe_learns_separable_features():
  rng = np.random.default_rng(2)
  centres = rng.normal(size=(5, 16)) * 4
  labels = rng.integers(0, 5, size=512).astype(np.int32)
  features = (centres[labels] + rng.normal(size=(512, 16))).astype(np.float32)
  tx = online.probe_optimizer(0.1, total_steps=200)
  params = online.probe_init(16, 5)
  opt_state = online.probe_optimizer_init(tx, params)
  step = jax.jit(functools.partial(online.probe_step, tx=tx))
  for i in range(200):
    rows = slice((i % 8) * 64, (i % 8 + 1) * 64)
    params, opt_state, _ = step(params, opt_state, features[rows],
                                labels[rows])
  predicted = np.argmax(np.asarray(online.probe_logits(params, features)), 1)
  assert np.mean(predicted == labels) >= 0.99


@pytest.mark.slow
def test_probe_with_grad_cache_equals_plain_step():
  config = _config("simclr")
  mesh = sharding.make_mesh()
  _, plain, metrics_plain = _one_step(config, mesh, probe=True)
  _, cached, metrics_cached = _one_step(config, mesh, probe=True,
                                        grad_cache_chunks=1)
  _assert_trees_equal(cached.probe_params, plain.probe_params, rtol=1e-5,
                      atol=1e-6)
  np.testing.assert_allclose(metrics_cached["probe_train_top1"],
                             metrics_plain["probe_train_top1"])
  # Two chunks: BN per chunk changes the features slightly, not the probe's
  # bookkeeping: every view still trains it.
  _, chunked, metrics_chunked = _one_step(config, mesh, probe=True,
                                          grad_cache_chunks=2)
  assert np.isfinite(metrics_chunked["probe_loss"])
  assert not np.allclose(chunked.probe_params["kernel"], 0)


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
  folder = tmp_path_factory.mktemp("fashion_mnist_src")
  fake_fashion_mnist.write(folder, num_train=96, num_test=40)
  return str(folder)


@pytest.mark.slow
def test_periodic_evaluation_is_logged(fake_data, tmp_path, monkeypatch):
  monkeypatch.setenv(fashion_mnist.ENV_VAR, fake_data)
  workdir = str(tmp_path / "run")
  config = _config("simclr")
  config.input.update(data_dir=str(tmp_path / "tfds"), batch_size=16,
                      shuffle_buffer=96)
  config.total_steps = 5
  config.log_every_steps = 1
  config.online_eval.update(every_steps=2, knn_k=5)
  config.linear_eval.update(batch_size=16, steps=20, knn_k=(5,),
                            raw_pixel_baseline=False)
  start = time.perf_counter()
  result = train.train_and_evaluate(config, workdir)
  wall = time.perf_counter() - start
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  evaluated = [r["step"] for r in rows if "online/knn_top1" in r]
  assert evaluated == [2, 4, 5]  # Every 2 steps and at the end.
  for row in rows:
    assert 0 <= row["probe_train_top1"] <= 1
  times = [r["train_time_sec"] for r in rows]
  assert times == sorted(times) and times[0] >= 0
  # Evaluation time is not counted as training time.
  eval_seconds = sum(r["online/eval_seconds"] for r in rows
                     if "online/eval_seconds" in r)
  assert times[-1] + eval_seconds < wall
  last = rows[-1]
  assert 0 <= last["online/probe_top1"] <= 1
  # The final periodic kNN sees the same frozen features as the offline
  # evaluation, so it equals its kNN score at the same k.
  assert last["online/knn_top1"] == pytest.approx(
      result["linear_eval"]["knn5_top1"])


@pytest.mark.slow
def test_zero_steps_evaluates_the_random_initialisation(fake_data, tmp_path,
                                                         monkeypatch):
  monkeypatch.setenv(fashion_mnist.ENV_VAR, fake_data)
  config = _config("simclr")
  config.input.update(data_dir=str(tmp_path / "tfds"), batch_size=16,
                      shuffle_buffer=96)
  config.total_steps = 0
  config.linear_eval.update(batch_size=16, steps=20, knn_k=(5,),
                            raw_pixel_baseline=False)
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert result["step"] == 0
  assert 0 <= result["linear_eval"]["top1"] <= 1

