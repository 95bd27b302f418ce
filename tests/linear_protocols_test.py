"""The papers' linear-evaluation protocols (contrastive/evaluation/
linear_protocols.py): schedules and optimizers as their code has them,
convergence on separable and real features, sharding, end to end.
"""

import json
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import fake_fashion_mnist
from configs import common
from configs import smoke_fashion_mnist
from contrastive import models
from contrastive import sharding
from contrastive.data import fashion_mnist
from contrastive.evaluation import linear
from contrastive.evaluation import linear_protocols

SGD_PROTOCOLS = tuple(linear_protocols.PROTOCOLS)


def _eval_config(protocol, **overrides) -> ml_collections.ConfigDict:
  config = common.base_config().linear_eval
  config.protocol = protocol
  config.update(overrides)
  return config


def _accuracy(protocol, params, x, y) -> float:
  x = linear_protocols.classifier_inputs(protocol, jnp.asarray(x))
  return linear.topk_accuracy(params, np.asarray(x), y, ks=(1,))["top1"]


def _blobs(seed, num_classes=5, dim=16, n=1200):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(num_classes, dim)) * 3.0
  y = rng.integers(0, num_classes, size=n)
  x = (centers[y] + rng.normal(size=(n, dim))).astype(np.float32)
  return x, y.astype(np.int32)


# Protocol definitions.


def test_unknown_protocol_names_the_valid_ones():
  with pytest.raises(ValueError, match="lbfgs.*simclr.*supcon.*moco"):
    linear_protocols.resolve(_eval_config("byol"))
  config = smoke_fashion_mnist.get_config("simclr")
  config.linear_eval.protocol = "simclr_v2"
  # Before the model or the data are touched.
  with pytest.raises(ValueError, match="Unknown linear_eval.protocol"):
    linear.evaluate(config, "/nonexistent", None, None, None)


def test_overrides_replace_the_protocols_values():
  protocol = linear_protocols.resolve(_eval_config("supcon"))
  assert (protocol.epochs, protocol.batch_size, protocol.base_lr) == (
      90, 6144, 0.05)
  assert protocol.peak_lr == pytest.approx(0.05 * 6144 / 256)
  short = linear_protocols.resolve(_eval_config(
      "supcon", epochs=9.0, learning_rate=0.1, train_batch_size=64,
      augment=False))
  assert (short.epochs, short.batch_size, short.base_lr, short.augment) == (
      9.0, 64, 0.1, False)
  # The schedule stretches with the run: 12 of 90 epochs of warm-up.
  assert short.warmup_epochs == pytest.approx(1.2)
  assert short.decay_epochs == pytest.approx((0.05,))


def test_schedules_follow_the_papers():
  steps_per_epoch = 10
  schedule = lambda name: linear_protocols.learning_rate_schedule(
      linear_protocols.PROTOCOLS[name], steps_per_epoch,
      round(linear_protocols.PROTOCOLS[name].epochs * steps_per_epoch))
  # SimCLR: 0.1 x 4096 / 256, no warm-up, cosine to 0 over 90 epochs.
  simclr = schedule("simclr")
  assert float(simclr(0)) == pytest.approx(1.6)
  assert float(simclr(450)) == pytest.approx(0.8, rel=1e-5)
  assert float(simclr(900)) == pytest.approx(0.0, abs=1e-6)
  # MoCo: 30 (not scaled), x 0.1 from epoch 60 and again from epoch 80.
  moco = schedule("moco")
  assert [float(moco(s)) for s in (0, 599, 600, 799, 800, 999)] == (
      pytest.approx([30, 30, 3, 3, 0.3, 0.3]))
  # SupCon TF stage 2: 12 warm-up epochs from 0 to 0.05 x 6144 / 256, then
  # x 0.97 every half epoch (staircase).
  supcon = schedule("supcon")
  assert float(supcon(0)) == 0.0
  assert float(supcon(60)) == pytest.approx(0.6)
  assert [float(supcon(s)) for s in (120, 124, 125, 130)] == pytest.approx(
      [1.2, 1.2, 1.2 * 0.97, 1.2 * 0.97**2])


def test_rmsprop_is_tensorflow_v1s():
  # tf.compat.v1.train.RMSPropOptimizer: ms starts at 1, eps inside the sqrt,
  # the learning rate inside the momentum accumulator.
  rng = np.random.default_rng(0)
  grads = rng.normal(size=(6, 3))
  lrs = [0.5, 0.4, 0.3, 0.2, 0.1, 0.05]
  tx = linear_protocols.OPTIMIZERS["rmsprop_tf"](
      lambda count: jnp.asarray(lrs)[count])
  param = jnp.zeros(3)
  state = tx.init(param)
  ms, mom, expected = np.ones(3), np.zeros(3), np.zeros(3)
  for g, lr in zip(grads, lrs):
    updates, state = tx.update(jnp.asarray(g, jnp.float32), state, param)
    param = param + updates
    ms = 0.9 * ms + 0.1 * g**2
    mom = 0.9 * mom + lr * g / np.sqrt(ms + 1e-3)
    expected -= mom
  np.testing.assert_allclose(param, expected, rtol=1e-5, atol=1e-6)


# Convergence.


@pytest.mark.parametrize("name", (linear_protocols.LBFGS,) + SGD_PROTOCOLS)
def test_separable_blobs_are_learned(name):
  x, y = _blobs(0)
  train, test = slice(0, 1000), slice(1000, None)
  if name == linear_protocols.LBFGS:
    params = linear.fit_logistic_regression(x[train], y[train], 5, steps=100,
                                            l2=1e-4)
    protocol = None
  else:
    protocol = linear_protocols.resolve(_eval_config(
        name, epochs=5.0, train_batch_size=64, augment=False))
    params, summary = linear_protocols.fit_features(
        protocol, x[train], y[train], 5, sharding.make_mesh(), seed=0)
    assert len(summary["train_loss"]) == 5
    assert summary["total_steps"] == 5 * (1000 // 64)
  accuracy = (linear.topk_accuracy(params, x[test], y[test], ks=(1,))["top1"]
              if protocol is None else
              _accuracy(protocol, params, x[test], y[test]))
  assert accuracy >= 0.99


@pytest.fixture(scope="module")
def fashion_mnist_features(num_train=4000, num_test=2000, dim=48):
  """Standardised random projections of real images: (train x, y, test x, y).
  """
  folder = fashion_mnist.source_dir()
  try:
    train = fashion_mnist.read_split(folder, "train")
    test = fashion_mnist.read_split(folder, "test")
  except (OSError, ValueError) as e:
    pytest.skip(f"Fashion-MNIST not readable in {folder}: {e}")
  rng = np.random.default_rng(0)
  projection = rng.normal(size=(28 * 28, dim)) / 28.0

  def features(split, n):
    images, labels = split
    x = images[:n].reshape(n, -1).astype(np.float64) / 255 @ projection
    return x, labels[:n].astype(np.int32)

  train_x, train_y = features(train, num_train)
  test_x, test_y = features(test, num_test)
  mean, std = train_x.mean(0), train_x.std(0)
  return ((train_x - mean) / std, train_y, (test_x - mean) / std, test_y)


def _numpy_logistic_regression(x, y, num_classes, *, l2_w, l2_b):
  """Newton's method in float64 on mean CE + l2/2 |w|^2 + l2_b/2 |b|^2."""
  n, d = x.shape
  xb = np.hstack([x, np.ones((n, 1))])
  reg = np.r_[np.full(d, l2_w), l2_b][:, None]  # Per row of theta.
  onehot = np.eye(num_classes)[y]

  def loss_and_probs(theta):
    logits = xb @ theta
    logits -= logits.max(1, keepdims=True)
    log_z = np.log(np.exp(logits).sum(1))
    loss = np.mean(log_z - logits[np.arange(n), y])
    return (loss + 0.5 * np.sum(reg * theta**2),
            np.exp(logits - log_z[:, None]))

  theta = np.zeros((d + 1, num_classes))
  for _ in range(50):
    loss, p = loss_and_probs(theta)
    grad = xb.T @ (p - onehot) / n + reg * theta
    if np.abs(grad).max() < 1e-9:
      break
    # Hessian over theta.T (class-major): sum_n (diag(p) - p p^T) (x) x x^T.
    size = num_classes * (d + 1)
    hessian = np.zeros((size, size))
    for c in range(num_classes):
      block = slice(c * (d + 1), (c + 1) * (d + 1))
      hessian[block, block] = (xb * p[:, c:c + 1]).T @ xb
    outer = (p[:, :, None] * xb[:, None, :]).reshape(n, size)
    hessian = (hessian - outer.T @ outer) / n + np.diag(
        np.tile(reg[:, 0], num_classes))
    direction = np.linalg.solve(hessian + 1e-10 * np.eye(size),
                                grad.T.reshape(-1)).reshape(num_classes,
                                                            d + 1).T
    t = 1.0
    while (loss_and_probs(theta - t * direction)[0] >
           loss - 0.25 * t * np.sum(grad * direction)) and t > 1e-6:
      t /= 2
    theta -= t * direction
  return {"w": theta[:-1], "b": theta[-1]}


def _numpy_accuracy(params, x, y) -> float:
  return float(np.mean(np.argmax(x @ params["w"] + params["b"], 1) == y))


def test_lbfgs_matches_numpy_logistic_regression_on_fashion_mnist(
    fashion_mnist_features):
  train_x, train_y, test_x, test_y = fashion_mnist_features
  reference = _numpy_logistic_regression(train_x, train_y, 10, l2_w=1e-4,
                                         l2_b=0.0)
  expected = _numpy_accuracy(reference, test_x, test_y)
  params = linear.fit_logistic_regression(
      train_x.astype(np.float32), train_y, 10, steps=200, l2=1e-4)
  got = linear.topk_accuracy(params, test_x.astype(np.float32), test_y,
                             ks=(1,))["top1"]
  assert 0.6 < expected < 0.95  # A real, non-trivial problem.
  assert abs(got - expected) <= 0.01, (got, expected)


def test_simclr_sgd_matches_numpy_logistic_regression_on_fashion_mnist(
    fashion_mnist_features):
  train_x, train_y, test_x, test_y = fashion_mnist_features
  protocol = linear_protocols.resolve(_eval_config(
      "simclr", epochs=20.0, train_batch_size=256, augment=False))
  # SimCLR's weight decay 1e-6 on kernel and bias = the reference's L2.
  reference = _numpy_logistic_regression(
      train_x, train_y, 10, l2_w=protocol.weight_decay,
      l2_b=protocol.weight_decay)
  expected = _numpy_accuracy(reference, test_x, test_y)
  params, _ = linear_protocols.fit_features(
      protocol, train_x.astype(np.float32), train_y, 10, sharding.make_mesh(),
      seed=0)
  got = _accuracy(protocol, params, test_x.astype(np.float32), test_y)
  assert abs(got - expected) <= 0.01, (got, expected)


# Sharding.


@pytest.mark.parametrize("name", SGD_PROTOCOLS)
def test_eight_devices_train_the_same_classifier_as_one(name):
  assert jax.device_count() == 8
  x, y = _blobs(1, n=512)
  protocol = linear_protocols.resolve(_eval_config(
      name, epochs=2.0, train_batch_size=64, augment=False))
  fit = lambda mesh: linear_protocols.fit_features(protocol, x, y, 5, mesh,
                                                   seed=3)
  eight, eight_summary = fit(sharding.make_mesh())
  one, one_summary = fit(sharding.make_mesh(devices=jax.devices()[:1]))
  for key in ("w", "b"):
    np.testing.assert_allclose(eight[key], one[key], rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(eight_summary["train_loss"],
                             one_summary["train_loss"], rtol=1e-4)
  # And the data order is the seed's: another seed gives another classifier.
  other, _ = linear_protocols.fit_features(protocol, x, y, 5,
                                           sharding.make_mesh(), seed=4)
  assert not np.allclose(other["w"], eight["w"], atol=1e-4)


# End to end.


class _Writer:

  def __init__(self):
    self.scalars = []

  def write_scalars(self, step, scalars):
    self.scalars.append((step, dict(scalars)))


def _tiny_run(tmp_path, monkeypatch, **linear_eval):
  source = tmp_path / "source"
  source.mkdir()
  fake_fashion_mnist.write(source, num_train=64, num_test=24)
  monkeypatch.setenv(fashion_mnist.ENV_VAR, str(source))
  config = smoke_fashion_mnist.get_config("simclr")
  config.model.update(depth=10, width=0.125)
  config.model.head.update(hidden_dims=(16,), out_dim=8)
  config.input.data_dir = str(tmp_path / "tfds")
  config.linear_eval.update(batch_size=16, knn_k=(5,), **linear_eval)
  model = models.create(config.model)
  variables = model.init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)),
                         train=False)
  state = types.SimpleNamespace(params=variables["params"],
                                batch_stats=variables["batch_stats"],
                                step=jnp.asarray(7))
  logger = types.SimpleNamespace(writer=_Writer())
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    result = linear.evaluate(config, str(tmp_path), model, state, mesh,
                             logger)
  with open(tmp_path / "linear_eval.json") as f:
    assert json.load(f) == json.loads(json.dumps(result))
  assert {"top1", "top5", "knn5_top1", "train_top1"} <= set(result)
  for key in ("top1", "top5", "knn5_top1", "train_top1"):
    assert 0 <= result[key] <= 1
  assert result["top1"] <= result["top5"]
  assert (result["num_train"], result["num_test"], result["feature_dim"]) == (
      64, 24, 64)
  assert (result["dataset"], result["split"], result["step"]) == (
      "fashion_mnist_idx", "test", 7)
  return result, logger.writer.scalars


@pytest.mark.slow
def test_augmented_protocol_end_to_end(tmp_path, monkeypatch):
  result, scalars = _tiny_run(
      tmp_path, monkeypatch, protocol="simclr", augment=True, epochs=2.0,
      train_batch_size=16, raw_pixel_baseline=False)
  assert result["protocol"] == "simclr"
  hparams = result["hparams"]
  assert (hparams["augment"], hparams["epochs"], hparams["batch_size"],
          hparams["steps_per_epoch"], hparams["total_steps"]) == (
              True, 2.0, 16, 4, 8)
  assert hparams["peak_lr"] == pytest.approx(0.1 * 16 / 256)
  losses = [(step, s) for step, s in scalars
            if "linear_eval/simclr_train_loss" in s]
  assert [step for step, _ in losses] == [1, 2]
  assert hparams["train_loss"] == pytest.approx(
      [s["linear_eval/simclr_train_loss"] for _, s in losses])
  assert all(np.isfinite(hparams["train_loss"]))


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["lbfgs", "moco"])
def test_cached_protocols_and_raw_pixels_end_to_end(tmp_path, monkeypatch,
                                                    protocol):
  result, _ = _tiny_run(
      tmp_path, monkeypatch, protocol=protocol, augment=False, epochs=2.0,
      train_batch_size=16, steps=20, raw_pixel_baseline=True)
  assert result["protocol"] == protocol
  assert result["raw_pixels"]["feature_dim"] == 28 * 28
  assert 0 <= result["raw_pixels"]["top1"] <= 1
