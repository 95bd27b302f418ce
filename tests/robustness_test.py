"""FGSM / PGD attacks and the robustness command (`evaluation/robustness`)."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fake_fashion_mnist
import pretrained_test
from contrastive.data import fashion_mnist
from contrastive.evaluation import robustness

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (4, 4, 2)  # Tiny [H, W, C] images.
NUM_CLASSES = 5


def _linear_model(seed: int = 0):
  """(logits_fn, w, b) of logits = flatten(x) @ w + b, with numpy w, b."""
  rng = np.random.default_rng(seed)
  dim = int(np.prod(SHAPE))
  w = rng.normal(size=(dim, NUM_CLASSES)).astype(np.float32)
  b = rng.normal(size=(NUM_CLASSES,)).astype(np.float32)

  def logits_fn(x):
    return jnp.dot(x.reshape(x.shape[0], -1), w,
                   precision=jax.lax.Precision.HIGHEST) + b
  return logits_fn, w, b


def _mlp_model(seed: int = 0):
  """A 2-layer tanh MLP: non-linear, so PGD has something to climb."""
  rng = np.random.default_rng(seed)
  dim = int(np.prod(SHAPE))
  w1 = rng.normal(size=(dim, 16)).astype(np.float32) / np.sqrt(dim)
  w2 = rng.normal(size=(16, NUM_CLASSES)).astype(np.float32)

  def logits_fn(x):
    hidden = jnp.tanh(jnp.dot(x.reshape(x.shape[0], -1), w1,
                              precision=jax.lax.Precision.HIGHEST))
    return jnp.dot(hidden, w2, precision=jax.lax.Precision.HIGHEST)
  return logits_fn


def _data(batch: int = 8, seed: int = 1):
  rng = np.random.default_rng(seed)
  images = rng.uniform(size=(batch, *SHAPE)).astype(np.float32)
  # Some pixels on the range's edges, where the clip binds.
  images[:, 0, 0, :] = 0.0
  images[:, 1, 1, :] = 1.0
  labels = rng.integers(0, NUM_CLASSES, batch).astype(np.int32)
  return jnp.asarray(images), jnp.asarray(labels)


def _mean_ce(logits_fn, images, labels) -> float:
  logits = logits_fn(images)
  return float(jnp.mean(jax.nn.logsumexp(logits, -1)
                        - jnp.take_along_axis(logits, labels[:, None],
                                              -1)[:, 0]))


def test_pgd_loss_climbs_monotonically_from_the_clean_point():
  logits_fn = _mlp_model()
  images, labels = _data()
  attack = jax.jit(functools.partial(
      robustness.pgd, logits_fn, epsilon=0.1, step_size=0.002, steps=20,
      return_losses=True))

  adversarial, losses = attack(images, labels)

  assert losses.shape == (21,)
  losses = np.asarray(losses)
  clean = _mean_ce(logits_fn, images, labels)
  np.testing.assert_allclose(losses[0], clean, rtol=1e-5)
  assert np.all(np.diff(losses) >= -1e-5), losses
  assert losses[-1] > clean + 0.01
  np.testing.assert_allclose(losses[-1], _mean_ce(logits_fn, adversarial,
                                                  labels), rtol=1e-5)


@pytest.mark.parametrize("attack", ["fgsm", "pgd", "pgd_random_start"])
@pytest.mark.parametrize("clip", [(0.0, 1.0), (0.2, 0.9)])
def test_adversarial_images_stay_in_the_ball_and_the_clip_range(attack,
                                                                 clip):
  logits_fn = _mlp_model()
  images, labels = _data()
  images = jnp.clip(images, *clip)  # Clean images lie in the valid range.
  epsilon = 0.05
  if attack == "fgsm":
    adversarial = robustness.fgsm(logits_fn, images, labels, epsilon=epsilon,
                                  clip=clip)
  else:
    key = jax.random.key(0) if attack == "pgd_random_start" else None
    # A step larger than epsilon: without projection it would leave the ball.
    adversarial = robustness.pgd(logits_fn, images, labels, epsilon=epsilon,
                                 step_size=0.04, steps=5, key=key, clip=clip)

  delta = np.abs(np.asarray(adversarial) - np.asarray(images))
  assert delta.max() <= epsilon + 1e-6
  assert delta.max() > epsilon / 2  # The attack did move the images.
  assert np.asarray(adversarial).min() >= clip[0]
  assert np.asarray(adversarial).max() <= clip[1]
  assert adversarial.shape == images.shape
  assert adversarial.dtype == images.dtype


def test_pgd_random_start_depends_on_the_key():
  logits_fn = _mlp_model()
  images, labels = _data()
  run = functools.partial(robustness.pgd, logits_fn, images, labels,
                          epsilon=0.05, step_size=0.001, steps=1)
  first = run(key=jax.random.key(0))
  np.testing.assert_array_equal(first, run(key=jax.random.key(0)))
  assert not np.array_equal(first, run(key=jax.random.key(1)))


def test_fgsm_is_one_pgd_step_of_size_epsilon():
  logits_fn = _mlp_model()
  images, labels = _data()
  for epsilon in (0.01, 0.1, 0.5):
    fgsm = robustness.fgsm(logits_fn, images, labels, epsilon=epsilon)
    pgd = robustness.pgd(logits_fn, images, labels, epsilon=epsilon,
                         step_size=epsilon, steps=1)
    np.testing.assert_array_equal(fgsm, pgd)


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_zero_epsilon_leaves_the_images_and_accuracy_unchanged(attack):
  logits_fn = _mlp_model()
  images, labels = _data(batch=32)
  result = robustness.robust_accuracy(
      logits_fn, images, labels, attack=attack, epsilon=0.0, steps=3,
      key=jax.random.key(0))
  assert float(result["adversarial_top1"]) == float(result["clean_top1"])
  adversarial = robustness.pgd(logits_fn, images, labels, epsilon=0.0,
                               step_size=0.1, steps=3, key=jax.random.key(0))
  np.testing.assert_array_equal(adversarial, images)


def test_robust_accuracy_drops_under_attack_and_matches_argmax():
  logits_fn, _, _ = _linear_model()
  images, labels = _data(batch=64)
  # Labels the model gets right: a clean top-1 of 1 that the attack can
  # only lower.
  labels = jnp.argmax(logits_fn(images), -1)
  result = jax.jit(functools.partial(
      robustness.robust_accuracy, logits_fn, attack="pgd", steps=5))(
          images, labels, epsilon=0.3, key=jax.random.key(0))
  assert float(result["clean_top1"]) == 1.0
  assert float(result["adversarial_top1"]) < 0.5


def test_fgsm_on_a_linear_model_matches_numpy_float64():
  logits_fn, w, b = _linear_model(seed=3)
  images, labels = _data(batch=16, seed=4)
  epsilon = 0.03

  adversarial = np.asarray(robustness.fgsm(logits_fn, images, labels,
                                           epsilon=epsilon))

  # d CE / d x = (softmax(x W + b) - onehot(y)) W^T, in float64.
  x = np.asarray(images, np.float64).reshape(len(labels), -1)
  logits = x @ w.astype(np.float64) + b.astype(np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  onehot = np.eye(NUM_CLASSES)[np.asarray(labels)]
  grad = (probs - onehot) @ w.astype(np.float64).T
  expected = np.clip(x + epsilon * np.sign(grad), 0.0, 1.0)
  # Near-zero gradient entries could flip sign in float32: there are none.
  assert np.abs(grad).min() > 1e-4
  np.testing.assert_allclose(adversarial.reshape(len(labels), -1), expected,
                             atol=1e-6)


def test_unknown_attack_is_refused():
  logits_fn, _, _ = _linear_model()
  images, labels = _data()
  with pytest.raises(ValueError, match="fgsm"):
    robustness.robust_accuracy(logits_fn, images, labels, attack="cw",
                               epsilon=0.1)


@pytest.mark.parametrize("epsilons, match", [
    (["-0.1"], ">= 0"),
    (["0", "nan"], ">= 0"),
    (["8"], r"\[0, 255\]"),
    (["eight"], "not a number"),
    ([], "--epsilons="),
])
def test_bad_epsilons_are_refused_with_the_fix(epsilons, match):
  with pytest.raises(robustness.InputError, match=match):
    robustness.check_epsilons(epsilons)


def test_check_epsilons_parses_strings():
  assert robustness.check_epsilons(["0", "0.01", 8 / 255]) == [0.0, 0.01,
                                                               8 / 255]


@pytest.mark.parametrize("kwargs, match", [
    (dict(attack="cw"), "--attack=pgd"),
    (dict(steps=0), "--steps"),
    (dict(num_test=0), "--num_test"),
    (dict(step_size=-1.0), "--step_size"),
])
def test_evaluate_refuses_bad_arguments_before_loading(tmp_path, kwargs,
                                                       match):
  with pytest.raises(robustness.InputError, match=match):
    robustness.evaluate(str(tmp_path), [0.01], **kwargs)


def test_evaluate_without_a_run_says_what_to_pass(tmp_path):
  with pytest.raises(robustness.InputError, match="--workdir"):
    robustness.evaluate(str(tmp_path), [0.01])


def test_format_table():
  table = robustness.format_table({
      "attack": "pgd", "num_test": 10, "dataset": "d", "split": "test",
      "clean_top1": 0.9,
      "results": [{"epsilon": 0.0, "epsilon_255": 0.0,
                   "adversarial_top1": 0.9},
                  {"epsilon": 0.03, "epsilon_255": 7.65,
                   "adversarial_top1": 0.25}]})
  assert "PGD" in table and "90.00%" in table and "25.00%" in table
  assert len(table.splitlines()) == 4


@pytest.mark.slow
def test_command_line_writes_robustness_json(tmp_path):
  source = tmp_path / "fashion_mnist_src"
  source.mkdir()
  fake_fashion_mnist.write(source, num_train=64, num_test=20)
  workdir = str(tmp_path / "run")
  pretrained_test.train_tiny_run(workdir, str(source), str(tmp_path / "tfds"))

  proc = subprocess.run(
      [sys.executable, "-m", "contrastive.evaluation.robustness",
       f"--workdir={workdir}", "--epsilons=0,0.05,0.3", "--attack=pgd",
       "--steps=2", "--num_test=12", "--batch_size=8"],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
      env={**os.environ, fashion_mnist.ENV_VAR: str(source)})

  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "PGD" in proc.stdout and "robustness.json" in proc.stdout
  with open(os.path.join(workdir, "robustness.json")) as f:
    result = json.load(f)
  assert result["num_test"] == 12
  assert [r["epsilon"] for r in result["results"]] == [0.0, 0.05, 0.3]
  assert result["results"][0]["adversarial_top1"] == result["clean_top1"]
  accuracies = [r["adversarial_top1"] for r in result["results"]]
  assert all(0.0 <= a <= 1.0 for a in accuracies)
  assert accuracies[-1] <= accuracies[0]

  # A workdir without a checkpoint: a one-line error, no traceback.
  empty = tmp_path / "empty"
  empty.mkdir()
  proc = subprocess.run(
      [sys.executable, "-m", "contrastive.evaluation.robustness",
       f"--workdir={empty}"],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 1
  assert "not a training workdir" in proc.stderr
  assert "Traceback" not in proc.stderr
