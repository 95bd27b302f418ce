"""Linear evaluation of a frozen encoder.

Features are the encoder's pooled output with BatchNorm in inference mode,
extracted once over the mesh. `config.linear_eval.protocol` says how the
linear classifier is trained:
  "lbfgs": a multinomial logistic regression on standardised features,
    fitted to convergence with full-batch L-BFGS (convex, so no
    learning-rate or epoch tuning), its L2 strength fixed (`l2`) or chosen
    from `l2_grid` on a held-out part of the training split. The minimal
    probe, and the default.
  "simclr", "supcon", "moco", "supcontrast": the papers' SGD protocols
    (`linear_protocols.py`), on cached features or on augmented images.
Either way the classifier is scored on the test split, next to a weighted
kNN on the same features. The result goes to `workdir/linear_eval.json`:
  {"top1": ..., "top5": ..., "dataset": ..., "split": ..., "protocol": ...}
"""

import json
import os
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow as tf

from contrastive import sharding
from contrastive.data import input_pipeline
from contrastive.evaluation import knn
from contrastive.evaluation import long_tail
from contrastive.evaluation import linear_protocols
from contrastive.evaluation import raw_pixels


def extract(config, dataset: str, split: str, mesh,
            embed_fn=None) -> tuple[np.ndarray, np.ndarray]:
  """Returns (features f32[N, F], labels i32[N]) of every example of `split`.

  `embed_fn(images)` maps a global batch-sharded `f32[b, H, W, C]` to
  features; None gives raw pixels.
  """
  features, labels = [], []
  batches = input_pipeline.eval_dataset(
      dataset, split, global_batch_size=config.linear_eval.batch_size,
      image_size=config.input.image_size, data_dir=config.input.data_dir)
  for local in batches.as_numpy_iterator():
    batch = sharding.make_global_batch(mesh, local)
    out = (batch["image"].reshape(batch["image"].shape[0], -1)
           if embed_fn is None else embed_fn(batch["image"]))
    out, label, mask = multihost_utils.process_allgather(
        (out, batch["label"], batch["mask"]), tiled=True)
    features.append(np.asarray(out, np.float32)[mask])
    labels.append(np.asarray(label)[mask])
  return np.concatenate(features), np.concatenate(labels)


def fit_logistic_regression(x: np.ndarray, y: np.ndarray, num_classes: int,
                            *, steps: int, l2: float) -> dict[str, jax.Array]:
  """Multinomial logistic regression, L-BFGS on the L2-regularised mean CE.

  Returns params with the standardisation folded in: logits = x @ w + b.
  """
  mean, std = x.mean(0), x.std(0) + 1e-6
  xs = jnp.asarray((x - mean) / std)
  onehot = jax.nn.one_hot(jnp.asarray(y), num_classes)

  def loss(params):
    logits = xs @ params["w"] + params["b"]
    ce = optax.softmax_cross_entropy(logits, onehot).mean()
    return ce + 0.5 * l2 * jnp.sum(params["w"] ** 2)

  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  @jax.jit
  def fit(params):
    def body(_, carry):
      params, opt_state = carry
      value, grad = value_and_grad(params, state=opt_state)
      updates, opt_state = solver.update(grad, opt_state, params, value=value,
                                         grad=grad, value_fn=loss)
      return optax.apply_updates(params, updates), opt_state
    return jax.lax.fori_loop(0, steps, body, (params, solver.init(params)))[0]

  params = fit({"w": jnp.zeros((x.shape[1], num_classes)),
                "b": jnp.zeros((num_classes,))})
  w = params["w"] / std[:, None]
  return {"w": w, "b": params["b"] - jnp.asarray(mean) @ w}


def select_l2(x: np.ndarray, y: np.ndarray, num_classes: int, *, steps: int,
              candidates, validation_fraction: float,
              seed: int = 0) -> tuple[float, dict[str, float]]:
  """The L2 strength with the best top-1 on a held-out part of the train set.

  SimCLR's transfer protocol (its appendix B.8) picks the logistic
  regression's regulariser on a validation split in the same way; the test
  split never enters the choice. Ties go to the stronger regulariser.
  Returns (l2, {str(l2): validation top-1}).
  """
  if not 0 < validation_fraction < 1:
    raise ValueError("linear_eval.validation_fraction must be in (0, 1), "
                     f"got {validation_fraction}.")
  order = np.random.default_rng(seed).permutation(len(x))
  num_val = max(int(round(len(x) * validation_fraction)), 1)
  val, fit = order[:num_val], order[num_val:]
  scores = {}
  for l2 in sorted(candidates):
    params = fit_logistic_regression(x[fit], y[fit], num_classes, steps=steps,
                                     l2=l2)
    scores[repr(float(l2))] = topk_accuracy(params, x[val], y[val],
                                            ks=(1,))["top1"]
  best = max(sorted(candidates, reverse=True),
             key=lambda l2: scores[repr(float(l2))])
  return float(best), scores


def topk_accuracy(params, x: np.ndarray, y: np.ndarray,
                  ks=(1, 5)) -> dict[str, float]:
  logits = jnp.asarray(x) @ params["w"] + params["b"]
  ranked = jnp.argsort(-logits, axis=-1)
  hits = ranked == jnp.asarray(y)[:, None]
  return {f"top{k}": float(jnp.mean(jnp.any(hits[:, :k], axis=-1)))
          for k in ks}


def long_tail_scores(config, dataset: str, predictions: np.ndarray,
                     labels: np.ndarray) -> dict[str, Any]:
  """Many/medium/few-shot top-1 when `linear_eval.long_tail_thresholds`.

  The groups come from the class counts of `linear_eval.train_split` (the
  long-tailed training set); {} when the thresholds are unset.
  """
  thresholds = tuple(config.linear_eval.get("long_tail_thresholds", ()))
  if not thresholds:
    return {}
  if len(thresholds) != 2:
    raise ValueError("linear_eval.long_tail_thresholds must be (many, few), "
                     f"got {thresholds}.")
  counts = input_pipeline.class_counts(
      dataset, config.linear_eval.train_split, config.input.data_dir)
  scores = long_tail.shot_accuracies(
      predictions, labels, counts, many_threshold=thresholds[0],
      few_threshold=thresholds[1])
  return {"long_tail": {**scores, "train_counts": counts.tolist()}}


def evaluate_classifier_logits(config, mesh, logits_fn,
                               step: int) -> dict[str, Any]:
  """Top-1/top-5 of a trained classifier on `linear_eval`'s test split.

  `logits_fn(images)` maps a global batch-sharded `f32[b, H, W, C]` to
  logits (the CE model's classifier, ESupCon's prototypes).
  """
  dataset = config.linear_eval.dataset or config.input.dataset
  logits, labels = extract(config, dataset, config.linear_eval.test_split,
                           mesh, logits_fn)
  top5 = np.argsort(-logits, axis=-1)[:, :5]
  return {"top1": float(np.mean(top5[:, 0] == labels)),
          "top5": float(np.mean(np.any(top5 == labels[:, None], axis=-1))),
          "dataset": dataset, "split": config.linear_eval.test_split,
          "num_test": int(labels.shape[0]), "step": step,
          **long_tail_scores(config, dataset, top5[:, 0], labels)}


def _knn_scores(eval_config, train_x, train_y, test_x, test_y,
                num_classes: int) -> dict[str, float]:
  result = {}
  for k in eval_config.get("knn_k", ()):
    if k > len(train_x):
      logging.warning("Skipping kNN with k=%d: only %d training samples.",
                      k, len(train_x))
      continue
    scores = knn.classify(train_x, train_y, test_x, test_y,
                          num_classes=num_classes, k=k,
                          temperature=eval_config.knn_temperature)
    result[f"knn{k}_top1"] = scores["top1"]
  return result


def _sizes(train_x, test_x) -> dict[str, int]:
  return {"num_train": int(train_x.shape[0]), "num_test": int(test_x.shape[0]),
          "feature_dim": int(train_x.shape[1])}


def probe(config, dataset: str, mesh, embed_fn=None) -> dict[str, Any]:
  """Extracts train/test features and scores a linear classifier on them."""
  eval_config = config.linear_eval
  info = input_pipeline.dataset_info(dataset, config.input.data_dir)
  num_classes = info.features["label"].num_classes
  train_x, train_y = extract(config, dataset, eval_config.train_split, mesh,
                             embed_fn)
  test_x, test_y = extract(config, dataset, eval_config.test_split, mesh,
                           embed_fn)
  start = time.perf_counter()
  # The classifier is small: fit it on one device. Under the training mesh
  # every device would repeat the whole fit (7x slower on the 2-core CPU).
  hparams = {"steps": eval_config.steps, "l2": eval_config.l2}
  with jax.set_mesh(sharding.local_mesh()):
    if eval_config.l2_grid:
      hparams["l2"], hparams["validation_top1"] = select_l2(
          train_x, train_y, num_classes, steps=eval_config.steps,
          candidates=eval_config.l2_grid,
          validation_fraction=eval_config.validation_fraction)
    params = fit_logistic_regression(train_x, train_y, num_classes,
                                     steps=eval_config.steps,
                                     l2=hparams["l2"])
    result = topk_accuracy(params, test_x, test_y)
    result["train_top1"] = topk_accuracy(params, train_x, train_y,
                                         ks=(1,))["top1"]
    predictions = np.asarray(jnp.argmax(
        jnp.asarray(test_x) @ params["w"] + params["b"], axis=-1))
    result.update(long_tail_scores(config, dataset, predictions, test_y))
    result.update(_knn_scores(eval_config, train_x, train_y, test_x, test_y,
                              num_classes))
  logging.info("Fitted the linear probe (and kNN) on %s features in %.1f s.",
               train_x.shape, time.perf_counter() - start)
  result.update(_sizes(train_x, test_x))
  result.update(protocol=linear_protocols.LBFGS, hparams=hparams)
  return result


def _flatten(variables, images: jax.Array) -> jax.Array:
  del variables
  return images.reshape(images.shape[0], -1)


def protocol_probe(config, dataset: str, mesh, features_fn=None,
                   variables=None, log_fn=None) -> dict[str, Any]:
  """Trains and scores a classifier by `config.linear_eval.protocol` (SGD).

  `features_fn(variables, images)` maps a batch-sharded `f32[b, H, W, C]` to
  frozen features (None: raw pixels). `log_fn(epoch, loss)` receives the
  classifier's mean training loss of each epoch.
  """
  eval_config = config.linear_eval
  protocol = linear_protocols.resolve(eval_config)
  features_fn = features_fn or _flatten
  info = input_pipeline.dataset_info(dataset, config.input.data_dir)
  num_classes = info.features["label"].num_classes
  embed = jax.jit(features_fn, out_shardings=sharding.batch_sharding(mesh))
  embed_fn = lambda x: embed(variables, x)
  # Train features are needed either way: kNN and train accuracy.
  train_x, train_y = extract(config, dataset, eval_config.train_split, mesh,
                             embed_fn)
  test_x, test_y = extract(config, dataset, eval_config.test_split, mesh,
                           embed_fn)
  start = time.perf_counter()
  if protocol.augment:
    input_config = linear_protocols.augmented_input_config(
        config.input, dataset, eval_config.train_split, protocol.batch_size)
    params, summary = linear_protocols.fit_images(
        protocol, input_config, features_fn, variables, train_x.shape[1],
        num_classes, mesh, seed=config.seed, log_fn=log_fn)
  else:
    params, summary = linear_protocols.fit_features(
        protocol, train_x, train_y, num_classes, mesh, seed=config.seed,
        log_fn=log_fn)
  logging.info("Trained the %s linear classifier in %.1f s.", protocol.name,
               time.perf_counter() - start)
  with jax.set_mesh(sharding.local_mesh()):  # Small: one device (see probe).
    prepare = lambda x: np.asarray(
        linear_protocols.classifier_inputs(protocol, jnp.asarray(x)))
    result = topk_accuracy(params, prepare(test_x), test_y)
    result["train_top1"] = topk_accuracy(params, prepare(train_x), train_y,
                                         ks=(1,))["top1"]
    result.update(_knn_scores(eval_config, train_x, train_y, test_x, test_y,
                              num_classes))
  result.update(_sizes(train_x, test_x))
  result.update(protocol=protocol.name, hparams=summary)
  return result


def raw_pixel_scores(config: ml_collections.ConfigDict, dataset: str,
                     mesh) -> dict[str, Any]:
  """The probe of `config.linear_eval.protocol` (and kNN) on raw pixels."""
  if config.linear_eval.protocol == linear_protocols.LBFGS:
    raw = probe(config, dataset, mesh)
  else:
    raw = protocol_probe(config, dataset, mesh)
  return {k: v for k, v in raw.items()
          if k in ("top1", "top5", "feature_dim", "hparams")
          or k.startswith("knn")}


def evaluate(config: ml_collections.ConfigDict, workdir: str, model, state,
             mesh, logger=None) -> dict[str, Any]:
  """Linear evaluation of `state`'s encoder; writes `linear_eval.json`."""
  name = config.linear_eval.protocol
  linear_protocols.check_name(name)  # Before minutes of feature extraction.
  dataset = config.linear_eval.dataset or config.input.dataset
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  features_fn = lambda variables, x: model.apply(variables, x,
                                                 method=model.features)
  step = int(jax.device_get(state.step))
  if name == linear_protocols.LBFGS:
    apply_features = jax.jit(features_fn,
                             out_shardings=sharding.batch_sharding(mesh))
    result = probe(config, dataset, mesh,
                   lambda x: apply_features(variables, x))
  else:
    log_fn = None
    if logger is not None:
      # TensorBoard only, one point per epoch of the classifier's training.
      log_fn = lambda epoch, loss: logger.writer.write_scalars(
          epoch, {f"linear_eval/{name}_train_loss": loss})
    result = protocol_probe(config, dataset, mesh, features_fn, variables,
                            log_fn)
  result.update(dataset=dataset, split=config.linear_eval.test_split,
                step=step)
  if config.linear_eval.raw_pixel_baseline:
    # A constant of the data and the evaluation setting: read, not
    # recomputed, when a shipped or cached entry matches (raw_pixels.py).
    result["raw_pixels"] = raw_pixels.baseline(
        config, dataset, lambda: raw_pixel_scores(config, dataset, mesh))
  logging.info("Linear eval: %s", result)
  if logger is not None:
    # TensorBoard only: metrics.jsonl stays one row per training step.
    logger.writer.write_scalars(result["step"], {
        "linear_eval/top1": result["top1"], "linear_eval/top5": result["top5"]})
  if jax.process_index() == 0:
    path = os.path.join(workdir, "linear_eval.json")
    with tf.io.gfile.GFile(path, "w") as f:  # Local or gs://.
      json.dump(result, f, indent=2)
  return result
