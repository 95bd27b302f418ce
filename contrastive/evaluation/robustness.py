r"""Adversarial robustness of the linear-evaluated encoder: FGSM and PGD.

  python -m contrastive.evaluation.robustness --workdir=/tmp/contrastive/run \
      [--epsilons=0,0.01,0.03,0.1] [--attack=pgd] [--steps=10] \
      [--num_test=1000]

Following Gupta et al. (arXiv 2207.10862), a frozen encoder is scored by the
top-1 accuracy of its linear probe under l-infinity attacks: the encoder of
the newest checkpoint (`pretrained.load`, BatchNorm in inference mode) and
the multinomial logistic regression that linear evaluation fits on its
features of the training split (`linear.fit_logistic_regression`, the
"lbfgs" probe whatever the run's `linear_eval.protocol`) are attacked end to
end on the first `--num_test` images of the test split. The result goes to
`workdir/robustness.json`:
  {"clean_top1": ..., "results": [{"epsilon": ..., "adversarial_top1": ...},
   ...], "attack": ..., ...}

Pixel scale and normalisation: the attacks work on images in [0, 1], the
scale `input_pipeline.eval_dataset` yields (uint8 / 255, resized to
`config.input.image_size` and clipped to [0, 1] by `augment.eval_view`), and
epsilon is in that scale (8/255 = 0.0314). The encoder consumes those pixels
as they are: this codebase has no per-channel mean/std normalisation of
inputs (the ResNet stem, `models/resnet.py`, reads them directly). The only
normalisation between pixels and logits is the probe's feature
standardisation, which `fit_logistic_regression` folds into its `w` and `b`;
so `logits = model.features(images) @ w + b` (see `probe_logits_fn`) is
exactly what linear evaluation predicts, and every perturbation the attack
makes is a change of valid pixels. The attack acts on the preprocessed
(resized) image, i.e. the encoder's actual input.

The attack functions are pure and jit-able; `logits_fn` maps float images
`[B, H, W, C]` to logits `[B, K]` and must treat examples independently (BN
in inference mode), since one gradient of the summed loss serves the batch.
"""

from collections.abc import Callable, Sequence
import functools
import json
import math
import os
import sys
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow as tf

from contrastive import pretrained
from contrastive import sharding
from contrastive.data import input_pipeline
from contrastive.evaluation import linear

LogitsFn = Callable[[jax.Array], jax.Array]

RESULT_FILE = "robustness.json"
ATTACKS = ("fgsm", "pgd")
# PGD's default step, as a multiple of epsilon / steps: Madry et al.'s
# 2.5 eps / steps lets the iterate cross the ball and come back.
DEFAULT_STEP_FACTOR = 2.5
PIXEL_RANGE = (0.0, 1.0)


class InputError(ValueError):
  """Bad input to the command (arguments, workdir, data); says what to do."""


def _per_example_loss(logits_fn: LogitsFn, images: jax.Array,
                      labels: jax.Array) -> jax.Array:
  logits = logits_fn(images).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _loss_and_grad(logits_fn: LogitsFn, images: jax.Array,
                   labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mean CE over the batch, d(summed CE)/d images).

  The gradient is of the sum, not the mean: each example's gradient is then
  its own and does not shrink with the batch size (only its sign is used,
  but a mean could underflow to zero in low precision).
  """
  total, grad = jax.value_and_grad(
      lambda x: jnp.sum(_per_example_loss(logits_fn, x, labels)))(images)
  return total / images.shape[0], grad


def fgsm(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, *,
         epsilon: float | jax.Array,
         clip: tuple[float, float] = PIXEL_RANGE) -> jax.Array:
  """Fast gradient sign method (Goodfellow et al. 2015), l-infinity.

  Args:
    logits_fn: float images `[B, H, W, C]` -> logits `[B, K]`.
    images: clean images, inside `clip`.
    labels: int `[B]` true classes.
    epsilon: l-infinity radius, in the pixel scale of `clip` (0 returns the
      clean images).
    clip: (lo, hi), the valid pixel range.

  Returns:
    `clip(images + epsilon * sign(d CE / d images))`, same shape and dtype.
  """
  _, grad = _loss_and_grad(logits_fn, images, labels)
  return jnp.clip(images + epsilon * jnp.sign(grad), clip[0], clip[1])


def pgd(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, *,
        epsilon: float | jax.Array, step_size: float | jax.Array, steps: int,
        key: jax.Array | None = None,
        clip: tuple[float, float] = PIXEL_RANGE,
        return_losses: bool = False
        ) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Projected gradient descent (Madry et al. 2018) on the CE, l-infinity.

  Each step moves by `step_size * sign(gradient)` and projects back onto
  the intersection of the epsilon-ball around `images` and `clip`.

  Args:
    logits_fn: float images `[B, H, W, C]` -> logits `[B, K]`.
    images: clean images, inside `clip`.
    labels: int `[B]` true classes.
    epsilon: l-infinity radius, in the pixel scale of `clip`.
    step_size: size of each sign-gradient step.
    steps: number of steps (static; >= 0).
    key: if given, the start is uniform in the epsilon-ball (then
      projected onto `clip`); None starts at the clean images.
    clip: (lo, hi), the valid pixel range.
    return_losses: also return the mean CE at each iterate.

  Returns:
    The adversarial images; with `return_losses`, also f32 `[steps + 1]`:
    the batch-mean CE at the start point and after each step.
  """
  lower = jnp.maximum(images - epsilon, clip[0])
  upper = jnp.minimum(images + epsilon, clip[1])
  start = images
  if key is not None:
    noise = jax.random.uniform(key, images.shape, jnp.float32, -1.0, 1.0)
    start = jnp.clip(images + epsilon * noise.astype(images.dtype), lower,
                     upper)

  def step(x, _):
    loss, grad = _loss_and_grad(logits_fn, x, labels)
    return jnp.clip(x + step_size * jnp.sign(grad), lower, upper), loss

  adversarial, losses = jax.lax.scan(step, start, None, length=steps)
  if not return_losses:
    return adversarial
  final = jnp.mean(_per_example_loss(logits_fn, adversarial, labels))
  return adversarial, jnp.concatenate([losses, final[None]])


def _attack(name: str, logits_fn: LogitsFn, images: jax.Array,
            labels: jax.Array, *, epsilon, step_size, steps: int,
            key: jax.Array | None, clip: tuple[float, float]) -> jax.Array:
  if name == "fgsm":
    return fgsm(logits_fn, images, labels, epsilon=epsilon, clip=clip)
  if name == "pgd":
    return pgd(logits_fn, images, labels, epsilon=epsilon,
               step_size=step_size, steps=steps, key=key, clip=clip)
  raise ValueError(f"Unknown attack {name!r}; choose one of {ATTACKS}.")


def attack_hits(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, *,
                attack: str = "pgd", epsilon: float | jax.Array,
                step_size: float | jax.Array | None = None, steps: int = 10,
                key: jax.Array | None = None,
                clip: tuple[float, float] = PIXEL_RANGE
                ) -> tuple[jax.Array, jax.Array]:
  """Per-example top-1 hits, bool `[B]` each: (clean, adversarial).

  Arguments as `robust_accuracy`'s; jit-able (`attack` and `steps` static).
  """
  if step_size is None:
    step_size = DEFAULT_STEP_FACTOR * epsilon / max(steps, 1)
  adversarial = _attack(attack, logits_fn, images, labels, epsilon=epsilon,
                        step_size=step_size, steps=steps, key=key, clip=clip)
  clean_hits = jnp.argmax(logits_fn(images), axis=-1) == labels
  adversarial_hits = jnp.argmax(logits_fn(adversarial), axis=-1) == labels
  return clean_hits, adversarial_hits


def robust_accuracy(logits_fn: LogitsFn, images: jax.Array,
                    labels: jax.Array, *, attack: str = "pgd",
                    epsilon: float | jax.Array,
                    step_size: float | jax.Array | None = None,
                    steps: int = 10, key: jax.Array | None = None,
                    clip: tuple[float, float] = PIXEL_RANGE
                    ) -> dict[str, jax.Array]:
  """Clean and adversarial top-1 of `logits_fn` on one batch.

  Args:
    logits_fn: float images `[B, H, W, C]` -> logits `[B, K]`.
    images: clean images, inside `clip`.
    labels: int `[B]` true classes.
    attack: "fgsm" or "pgd".
    epsilon: l-infinity radius, in the pixel scale of `clip`.
    step_size: PGD's step; None: 2.5 * epsilon / steps.
    steps: PGD's number of steps (ignored by FGSM).
    key: PGD's random start (None: start at the clean images).
    clip: (lo, hi), the valid pixel range.

  Returns:
    {"clean_top1": f32 scalar, "adversarial_top1": f32 scalar}.
  """
  clean_hits, adversarial_hits = attack_hits(
      logits_fn, images, labels, attack=attack, epsilon=epsilon,
      step_size=step_size, steps=steps, key=key, clip=clip)
  return {"clean_top1": jnp.mean(clean_hits.astype(jnp.float32)),
          "adversarial_top1": jnp.mean(adversarial_hits.astype(jnp.float32))}


def probe_logits_fn(model, variables: Any, probe: dict[str, Any]) -> LogitsFn:
  """Images in [0, 1] -> the linear probe's logits over the frozen encoder.

  `model.features` runs BatchNorm in inference mode; `probe` is
  `linear.fit_logistic_regression`'s output, whose `w` and `b` already hold
  the feature standardisation, so no other normalisation is applied.
  """
  def logits_fn(images: jax.Array) -> jax.Array:
    features = model.apply(variables, images, method=model.features)
    return features.astype(jnp.float32) @ probe["w"] + probe["b"]
  return logits_fn


# -- The command. --


def check_epsilons(epsilons: Sequence[float]) -> list[float]:
  """Returns `epsilons` as floats; InputError with the fix if one is bad."""
  if not epsilons:
    raise InputError("No epsilon given: pass e.g. --epsilons=0,0.01,0.03,0.1 "
                     "(l-infinity radii in the [0, 1] pixel scale).")
  values = []
  for epsilon in epsilons:
    try:
      value = float(epsilon)
    except (TypeError, ValueError):
      raise InputError(f"Epsilon {epsilon!r} is not a number: pass "
                       "comma-separated floats, e.g. --epsilons=0,0.03."
                       ) from None
    if not math.isfinite(value) or value < 0:
      raise InputError(f"Epsilon {epsilon!r} must be finite and >= 0: it is "
                       "the l-infinity radius of the attack, in the [0, 1] "
                       "pixel scale (8/255 = 0.0314).")
    if value > 1:
      raise InputError(f"Epsilon {value:g} exceeds the pixel range [0, 1]: "
                       "epsilons are in the [0, 1] scale, not [0, 255]; "
                       f"for {value:g}/255 pass {value / 255:.4g}.")
    values.append(value)
  return values


def _check_args(attack: str, steps: int, num_test: int, batch_size: int,
                step_size: float | None) -> None:
  if attack not in ATTACKS:
    raise InputError(f"Unknown attack {attack!r}: pass --attack=pgd or "
                     "--attack=fgsm.")
  if attack == "pgd" and steps < 1:
    raise InputError(f"PGD needs --steps >= 1, got {steps}.")
  if num_test < 1:
    raise InputError(f"--num_test must be >= 1, got {num_test}.")
  if batch_size < 1:
    raise InputError(f"--batch_size must be >= 1, got {batch_size}.")
  if step_size is not None and step_size <= 0:
    raise InputError(f"--step_size must be > 0 (or unset for 2.5 * epsilon "
                     f"/ steps), got {step_size}.")


def _fit_probe(config, model, variables, dataset: str, mesh
               ) -> tuple[dict[str, jax.Array], float, int]:
  """Linear evaluation's L-BFGS probe; returns (params, train top-1, N)."""
  apply_features = jax.jit(
      lambda variables, x: model.apply(variables, x, method=model.features),
      out_shardings=sharding.batch_sharding(mesh))
  variables = jax.device_put(variables, sharding.replicated(mesh))
  train_x, train_y = linear.extract(
      config, dataset, config.linear_eval.train_split, mesh,
      lambda x: apply_features(variables, x))
  info = input_pipeline.dataset_info(dataset, config.input.data_dir)
  num_classes = info.features["label"].num_classes
  probe = linear.fit_logistic_regression(
      train_x, train_y, num_classes, steps=config.linear_eval.steps,
      l2=config.linear_eval.l2)
  train_top1 = linear.topk_accuracy(probe, train_x, train_y, ks=(1,))["top1"]
  return probe, train_top1, int(train_x.shape[0])


def evaluate(workdir: str, epsilons: Sequence[float], *, attack: str = "pgd",
             steps: int = 10, step_size: float | None = None,
             random_start: bool = True, num_test: int = 1000,
             batch_size: int = 256, split: str | None = None,
             data_dir: str | None = None, seed: int = 0,
             write: bool = True) -> dict[str, Any]:
  """Robust accuracy of the run in `workdir`; writes `robustness.json`.

  Args:
    workdir: a training workdir (config.json and checkpoints/).
    epsilons: l-infinity radii in the [0, 1] pixel scale.
    attack: "pgd" or "fgsm".
    steps: PGD's steps.
    step_size: PGD's step; None: 2.5 * epsilon / steps per epsilon.
    random_start: PGD starts uniformly in the epsilon-ball (else at the
      clean image).
    num_test: the first this many images of the test split are attacked.
    batch_size: images per attacked batch.
    split: the test split; default the run's `linear_eval.test_split`.
    data_dir: TFDS data dir; default the run's `input.data_dir`.
    seed: of PGD's random starts.
    write: write `workdir/robustness.json`.

  Returns:
    The result written to `robustness.json`.

  Raises:
    InputError: a bad argument, `workdir` without config or checkpoint, or
      data that cannot be read; the message says what to do.
  """
  # Duplicates would be attacked twice and mixed up in the results.
  epsilons = list(dict.fromkeys(check_epsilons(epsilons)))
  _check_args(attack, steps, num_test, batch_size, step_size)
  if jax.process_count() > 1:
    raise InputError("The robustness evaluation runs on one host; start it "
                     "as a single process (it reads the whole test split).")
  try:
    config, model, variables = pretrained.load(workdir)
    if data_dir:
      config.input.data_dir = data_dir
    dataset = config.linear_eval.dataset or config.input.dataset
    split = split or config.linear_eval.test_split
    num_test = min(num_test, input_pipeline.num_examples(
        dataset, split, config.input.data_dir))
  # No checkpoint or config, data not prepared, a bad split: each message
  # says what to do.
  except (ValueError, FileNotFoundError) as e:
    raise InputError(str(e)) from e

  # One device: the probe fit and the attack are per-host computations
  # (as in `pictures`), and the batch sizes need not divide a mesh.
  mesh = sharding.local_mesh()
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    probe, train_top1, num_train = _fit_probe(config, model, variables,
                                              dataset, mesh)
  logging.info("Fitted the probe on %d features in %.1f s.", num_train,
               time.perf_counter() - start)

  device = jax.local_devices()[0]
  variables = jax.device_put(variables, device)
  probe = jax.device_put(probe, device)

  # Variables and probe are arguments, not constants baked into the jitted
  # graph; epsilon and step size are traced, so one compilation serves all.
  @functools.partial(jax.jit, static_argnames=("steps",))
  def hits(variables, probe, images, labels, key, epsilon, step_size, *,
           steps):
    return attack_hits(probe_logits_fn(model, variables, probe), images,
                       labels, attack=attack, epsilon=epsilon,
                       step_size=step_size, steps=steps,
                       key=key if random_start else None)

  batches = input_pipeline.eval_dataset(
      dataset, split, global_batch_size=batch_size,
      image_size=config.input.image_size, data_dir=config.input.data_dir,
      process_index=0, process_count=1).take(-(-num_test // batch_size))
  key = jax.random.key(seed)
  clean, adversarial = [], {epsilon: [] for epsilon in epsilons}
  start = time.perf_counter()
  for index, batch in enumerate(batches.as_numpy_iterator()):
    images = jax.device_put(batch["image"], device)
    labels = jax.device_put(batch["label"], device)
    mask = batch["mask"]
    batch_clean = None
    # Zero radii last: they reuse the clean hits of an attacked one.
    for epsilon in sorted(epsilons, key=lambda e: e == 0):
      if epsilon == 0 and batch_clean is not None:
        # The attack cannot move the images: adversarial hits are clean ones.
        adversarial[epsilon].append(batch_clean)
        continue
      step = (step_size if step_size is not None
              else DEFAULT_STEP_FACTOR * epsilon / max(steps, 1))
      batch_key = jax.random.fold_in(key, index)
      clean_hits, adversarial_hits = hits(
          variables, probe, images, labels, batch_key, jnp.float32(epsilon),
          jnp.float32(step), steps=steps)
      batch_clean = np.asarray(clean_hits)[mask]
      adversarial[epsilon].append(np.asarray(adversarial_hits)[mask])
    clean.append(batch_clean)
  elapsed = time.perf_counter() - start
  clean = np.concatenate(clean)[:num_test]
  results = [{"epsilon": epsilon,
              "epsilon_255": epsilon * 255,
              "adversarial_top1": float(np.mean(
                  np.concatenate(adversarial[epsilon])[:num_test]))}
             for epsilon in epsilons]
  result = {
      "clean_top1": float(np.mean(clean)),
      "results": results,
      "attack": attack,
      "steps": steps if attack == "pgd" else 1,
      "step_size": (step_size if step_size is not None else
                    f"{DEFAULT_STEP_FACTOR} * epsilon / steps"),
      "random_start": bool(random_start and attack == "pgd"),
      "norm": "linf",
      "pixel_range": list(PIXEL_RANGE),
      "num_test": int(len(clean)),
      "dataset": dataset,
      "split": split,
      "probe": {"protocol": "lbfgs", "steps": config.linear_eval.steps,
                "l2": config.linear_eval.l2, "train_top1": train_top1,
                "num_train": num_train},
      "seconds": elapsed,
  }
  logging.info("Robustness: %s", result)
  if write:
    path = os.path.join(workdir, RESULT_FILE)
    with tf.io.gfile.GFile(path, "w") as f:  # Local or gs://.
      json.dump(result, f, indent=2)
  return result


def format_table(result: dict[str, Any]) -> str:
  """A small text table of `evaluate`'s result."""
  lines = [f"{result['attack'].upper()} (l-inf, {result['num_test']} "
           f"{result['dataset']} {result['split']} images), clean top-1 "
           f"{100 * result['clean_top1']:.2f}%",
           f"{'epsilon':>9} {'x255':>7} {'adv top-1':>10}"]
  for row in result["results"]:
    lines.append(f"{row['epsilon']:>9.4g} {row['epsilon_255']:>7.3g} "
                 f"{100 * row['adversarial_top1']:>9.2f}%")
  return "\n".join(lines)


def _define_flags() -> None:
  """Defines the command's flags; only when run as a command, so that
  importing this module next to another absl entry point cannot clash."""
  global _WORKDIR, _EPSILONS, _ATTACK, _STEPS, _STEP_SIZE, _RANDOM_START
  global _NUM_TEST, _BATCH_SIZE, _SPLIT, _DATA_DIR, _SEED
  _WORKDIR = flags.DEFINE_string(
      "workdir", None, "Training workdir (config.json, checkpoints/); local "
      "or gs://. robustness.json is written there.")
  _EPSILONS = flags.DEFINE_list(
      "epsilons", ["0", "0.01", "0.03", "0.1"],
      "l-infinity radii in the [0, 1] pixel scale (8/255 = 0.0314).")
  _ATTACK = flags.DEFINE_enum("attack", "pgd", list(ATTACKS), "The attack.")
  _STEPS = flags.DEFINE_integer("steps", 10, "PGD steps.")
  _STEP_SIZE = flags.DEFINE_float(
      "step_size", None, "PGD step; default 2.5 * epsilon / steps.")
  _RANDOM_START = flags.DEFINE_bool(
      "random_start", True, "PGD starts uniformly in the epsilon-ball.")
  _NUM_TEST = flags.DEFINE_integer(
      "num_test", 1000, "The first N images of the test split are attacked.")
  _BATCH_SIZE = flags.DEFINE_integer("batch_size", 256,
                                     "Images per attacked batch.")
  _SPLIT = flags.DEFINE_string(
      "split", None, "Test split; default the run's "
      "config.linear_eval.test_split.")
  _DATA_DIR = flags.DEFINE_string(
      "data_dir", None,
      "TFDS data dir; default the run's config.input.data_dir.")
  _SEED = flags.DEFINE_integer("seed", 0, "Seed of PGD's random starts.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    result = evaluate(
        _WORKDIR.value, _EPSILONS.value, attack=_ATTACK.value,
        steps=_STEPS.value, step_size=_STEP_SIZE.value,
        random_start=_RANDOM_START.value, num_test=_NUM_TEST.value,
        batch_size=_BATCH_SIZE.value, split=_SPLIT.value,
        data_dir=_DATA_DIR.value, seed=_SEED.value)
  except InputError as e:
    # The message says what to do; a traceback would bury it.
    sys.exit(f"robustness: {e}")
  print(format_table(result))
  print(f"Wrote {os.path.join(_WORKDIR.value, RESULT_FILE)}.")


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
