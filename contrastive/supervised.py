"""Supervised training: cross-entropy on the encoder + a linear classifier.

One trainer, two uses (`config.trainer = "supervised"`):

* The cross-entropy (CE) baseline of the SupCon tables: the same encoder,
  input pipeline and optimizer as a contrastive run, trained from scratch on
  labels; its frozen features are then scored by the same linear probe and
  kNN as contrastive runs (`linear_eval`).
* Fine-tuning a pretrained encoder (`supervised.init_from` = a pretraining
  workdir), e.g. SimCLR's semi-supervised protocol on 1% / 10% of the
  ImageNet labels (TFDS `imagenet2012_subset/1pct`, `/10pct`).

The classifier is a linear layer on `model.features`' input, the pooled
encoder output (not the projection head, which this trainer neither trains
nor keeps). The state is a `TrainState` with
  params = {"encoder": the encoder's params, "classifier": {kernel, bias}},
so `{"params": params["encoder"], "batch_stats": batch_stats}` are variables
`model.features` accepts. Everything else mirrors `train.py`: a pure step
jitted over the mesh with global BN, checkpoints and bitwise resume, the
non-finite guard, SIGTERM preemption, metrics every `log_every_steps`.
"""

import functools
import json
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow as tf

from contrastive import checkpoint
from contrastive import config_checks
from contrastive import metric_logging
from contrastive import models
from contrastive import optim
from contrastive import run_dir
from contrastive import sharding
from contrastive import state as state_lib
from contrastive import training_loop
from contrastive.data import input_pipeline
from contrastive.evaluation import linear
from contrastive.evaluation import online

ENCODER = "encoder"
CLASSIFIER = "classifier"
# Config keys that decide the encoder's parameter shapes: a pretrained run
# must agree on them (the projection head may differ; it is dropped).
ENCODER_KEYS = ("name", "depth", "width", "cifar_stem")


def _encode(module, images, train: bool):
  """The encoder alone (no projection head), as `model.apply` method."""
  return module.encoder(images, train=train)


def classifier_logits(classifier, features: jax.Array) -> jax.Array:
  # {"kernel", "bias"} as the online probe's, so `online.evaluate` can score
  # it, but on the raw features: BN in the encoder already sets their scale.
  return features.astype(jnp.float32) @ classifier["kernel"] + classifier[
      "bias"]


def train_step(state: state_lib.TrainState, batch: dict[str, jax.Array], *,
               model, tx: optax.GradientTransformation,
               schedule: optax.Schedule, label_smoothing: float = 0.0):
  """One cross-entropy step on the global batch; returns (state, metrics).

  `batch["image"]` is `f32[B, 1, H, W, C]` (one view from `pretrain_dataset`)
  or `f32[B, H, W, C]`, sharded on B; BN normalises over the global batch.
  """
  images, labels = batch["image"], batch["label"]
  if images.ndim == 5:
    if images.shape[1] != 1:
      raise ValueError(f"Supervised training takes one view per image, got "
                       f"{images.shape[1]}; set config.input.views=1.")
    images = images[:, 0]
  num_classes = state.params[CLASSIFIER]["bias"].shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes),
                                label_smoothing)

  def compute_loss(params):
    features, new_model_state = model.apply(
        {"params": params[ENCODER], "batch_stats": state.batch_stats},
        images, True, method=_encode, mutable=["batch_stats"])
    logits = classifier_logits(params[CLASSIFIER], features)
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    return loss, (logits, new_model_state["batch_stats"])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(
      compute_loss, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      "loss": loss,
      "train_top1": jnp.mean(
          (jnp.argmax(logits, -1) == labels).astype(jnp.float32)),
      "learning_rate": schedule(state.step),
      "grad_norm": optax.global_norm(grads),
      "param_norm": optax.global_norm(params),
  }
  new_state = state.replace(step=state.step + 1, params=params,
                            batch_stats=batch_stats, opt_state=opt_state)
  return new_state, metrics


def _init_fn(model, tx: optax.GradientTransformation,
             image_shape: tuple[int, ...], num_classes: int):
  def init(rng, encoder_variables=None):
    encoder_rng, classifier_rng = jax.random.split(rng)
    images = jnp.zeros((2, *image_shape), jnp.float32)
    variables = model.init(encoder_rng, images, False, method=_encode)
    if encoder_variables is not None:
      variables = encoder_variables
    feature_dim = model.apply(variables, images, False,
                              method=_encode).shape[-1]
    shape = (feature_dim, num_classes)
    if encoder_variables is None:
      # From scratch: the standard dense init (what a ResNet's last layer
      # gets), so LARS's trust ratio starts from a non-zero norm.
      kernel = jax.nn.initializers.lecun_normal()(classifier_rng, shape)
    else:
      # Fine-tuning: zeros (SimCLR's zero_init_logits_layer), so the first
      # steps move the classifier, not the pretrained encoder, off a random
      # layer's arbitrary gradients.
      kernel = jnp.zeros(shape, jnp.float32)
    params = {ENCODER: variables["params"],
              CLASSIFIER: {"kernel": kernel,
                           "bias": jnp.zeros((num_classes,), jnp.float32)}}
    return state_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params), probe_params={}, probe_opt_state={})
  return init


def create_train_state(model, tx: optax.GradientTransformation,
                       rng: jax.Array, image_shape: tuple[int, ...],
                       num_classes: int, mesh: jax.sharding.Mesh,
                       encoder_variables: dict | None = None
                       ) -> state_lib.TrainState:
  """A new replicated state, jitted straight into its sharding.

  `encoder_variables` ({"params", "batch_stats"} as `encoder_variables_of`
  returns them) replace the encoder's random init, and the classifier then
  starts at zero (fine-tuning).
  """
  init = _init_fn(model, tx, image_shape, num_classes)
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh),
                           jax.eval_shape(init, rng))
  if encoder_variables is not None:
    encoder_variables = jax.device_put(encoder_variables,
                                       sharding.replicated(mesh))
  return jax.jit(init, out_shardings=shardings)(rng, encoder_variables)


def abstract_train_state(model, tx: optax.GradientTransformation,
                         image_shape: tuple[int, ...], num_classes: int,
                         mesh: jax.sharding.Mesh) -> state_lib.TrainState:
  """`ShapeDtypeStruct`s with shardings: the restore target for checkpoints."""
  abstract = jax.eval_shape(_init_fn(model, tx, image_shape, num_classes),
                            jax.random.key(0))
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=sharding.replicated(mesh)),
      abstract)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): tuple(np.shape(leaf))
          for path, leaf in leaves}


def encoder_variables_of(config: ml_collections.ConfigDict, model,
                         image_shape: tuple[int, ...]) -> dict[str, Any]:
  """The encoder's {"params", "batch_stats"} from `supervised.init_from`.

  The pretrained run's projection head is dropped; its encoder must have the
  same architecture as `config.model` (named in the error otherwise).
  """
  # Imported here: only fine-tuning needs it.
  from contrastive import pretrained  # pylint: disable=g-import-not-at-top
  path = config.supervised.init_from
  pretrained_config, _, variables = pretrained.load(path)
  differences = [
      f"model.{key}: pretrained {pretrained_config.model[key]!r} vs "
      f"{config.model[key]!r}"
      for key in ENCODER_KEYS if pretrained_config.model[key] !=
      config.model[key]]
  if differences:
    raise ValueError(
        f"supervised.init_from={path} was pretrained with another encoder "
        f"({'; '.join(differences)}); set config.model to match it.")
  expected = jax.eval_shape(
      lambda: model.init(jax.random.key(0),
                         jnp.zeros((2, *image_shape), jnp.float32), False,
                         method=_encode))
  # Keep what the encoder uses (drops the head's params and BN statistics).
  encoder = {
      collection: {name: variables[collection][name]
                   for name in expected[collection]
                   if name in variables.get(collection, {})}
      for collection in expected}
  encoder = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), encoder)
  want, got = _shapes(expected), _shapes(encoder)
  problems = [f"{k}: pretrained {got.get(k, 'missing')} vs model {v}"
              for k, v in want.items() if got.get(k) != v]
  if problems:
    raise ValueError(
        f"supervised.init_from={path} does not fit config.model: "
        f"{'; '.join(problems[:8])}.")
  return encoder


def _restore_or_create(config: ml_collections.ConfigDict, workdir: str,
                       manager, model, tx, image_shape, num_classes, mesh,
                       abstract_state) -> state_lib.TrainState:
  """The newest good checkpoint, else a new state (pretrained if asked).

  `init_from` applies to a fresh start only: a resumed run continues from
  its own checkpoint.
  """
  run_dir.check_config(workdir, config,
                       has_checkpoint=bool(manager.all_steps()))
  state = checkpoint.restore_latest(manager, abstract_state)
  if state is None:
    encoder_variables = None
    if config.supervised.init_from:
      logging.info("Initialising the encoder from %s.",
                   config.supervised.init_from)
      encoder_variables = encoder_variables_of(config, model, image_shape)
    state = create_train_state(model, tx, jax.random.key(config.seed),
                               image_shape, num_classes, mesh,
                               encoder_variables)
  return state


def encoder_state(state: state_lib.TrainState) -> state_lib.TrainState:
  """The state as `linear.evaluate` reads it: params = the encoder's."""
  return state.replace(params=state.params[ENCODER])


def evaluate_classifier(config: ml_collections.ConfigDict, model,
                        state: state_lib.TrainState, mesh) -> dict[str, Any]:
  """Top-1/top-5 of the trained classifier on `linear_eval`'s test split."""
  logits_fn = jax.jit(
      lambda params, batch_stats, x: classifier_logits(
          params[CLASSIFIER],
          model.apply({"params": params[ENCODER], "batch_stats": batch_stats},
                      x, method=model.features)),
      out_shardings=sharding.batch_sharding(mesh))
  return linear.evaluate_classifier_logits(
      config, mesh, lambda x: logits_fn(state.params, state.batch_stats, x),
      int(jax.device_get(state.step)))


def _validate(config: ml_collections.ConfigDict) -> None:
  config_checks.validate(config)
  if config.input.views != 1 or config.input.get("small_views", 0):
    raise ValueError(
        f"The supervised trainer takes one view per image; set "
        f"--config.input.views=1 and --config.input.small_views=0 (got "
        f"{config.input.views} and {config.input.get('small_views', 0)}).")
  if not 0.0 <= config.supervised.label_smoothing < 1.0:
    raise ValueError(f"config.supervised.label_smoothing must be in [0, 1), "
                     f"got {config.supervised.label_smoothing}.")


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains with cross-entropy (resuming from `workdir`), then evaluates.

  As `train.train_and_evaluate`: a resumed run is bitwise the uninterrupted
  one, and SIGTERM checkpoints and returns `result["preempted"] = True`.

  Returns {"train": last logged metrics, "step", "preempted"} and, unless
  preempted, "classifier" (test top-1/top-5 of the trained classifier, also
  in `workdir/classifier_eval.json`) and, if `linear_eval.enabled`,
  "linear_eval" (the frozen encoder scored as a contrastive run's).
  """
  _validate(config)
  run_dir.ensure_writable(workdir)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_divisible(config.input.batch_size, mesh)

  info = input_pipeline.dataset_info(config.input.dataset,
                                     config.input.data_dir)
  num_train = input_pipeline.num_examples(
      config.input.dataset, config.input.train_split, config.input.data_dir)
  total_steps, warmup_steps, steps_per_epoch = training_loop.steps_for(
      config, num_train)
  image_shape = (config.input.image_size, config.input.image_size,
                 info.features["image"].shape[-1])
  num_classes = info.features["label"].num_classes
  logging.info("Supervised training %d steps (%d per epoch, warm-up %d) on "
               "%d devices, global batch %d, %d classes, %s.", total_steps,
               steps_per_epoch, warmup_steps, mesh.size,
               config.input.batch_size, num_classes,
               f"encoder from {config.supervised.init_from}"
               if config.supervised.init_from else "from scratch")

  model = models.create(config.model)
  schedule = optim.learning_rate_schedule(
      config.optim, config.input.batch_size, total_steps, warmup_steps)
  tx = optim.create(config.optim, schedule)

  manager = checkpoint.create_manager(workdir, config.keep_checkpoints)
  abstract_state = abstract_train_state(model, tx, image_shape, num_classes,
                                        mesh)
  state = _restore_or_create(config, workdir, manager, model, tx,
                             image_shape, num_classes, mesh, abstract_state)

  state_shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
  step = functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                           label_smoothing=config.supervised.label_smoothing)

  def evaluate_online(state):
    # kNN on the encoder's features, and the classifier itself as the probe.
    return online.evaluate(
        config, model,
        {"params": state.params[ENCODER], "batch_stats": state.batch_stats},
        mesh, probe_params=state.params[CLASSIFIER])

  logger = metric_logging.MetricLogger(workdir)
  training_started = time.monotonic()
  state, last_metrics, preempted = training_loop.run(
      config, step, state, state_shardings, mesh=mesh, manager=manager,
      logger=logger, total_steps=total_steps,
      steps_per_epoch=steps_per_epoch, evaluate_online=evaluate_online,
      headline_metric="train_top1")
  evaluation_started = time.monotonic()
  final_step = int(jax.device_get(state.step))
  result = {"train": last_metrics, "step": final_step,
            "preempted": preempted}
  if not preempted:
    with jax.set_mesh(mesh):
      result["classifier"] = evaluate_classifier(config, model, state, mesh)
      logging.info("Classifier: %s", result["classifier"])
      logger.writer.write_scalars(final_step, {
          "classifier/top1": result["classifier"]["top1"],
          "classifier/top5": result["classifier"]["top5"]})
      if jax.process_index() == 0:
        path = os.path.join(workdir, "classifier_eval.json")
        with tf.io.gfile.GFile(path, "w") as f:  # Local or gs://.
          json.dump(result["classifier"], f, indent=2)
      if config.linear_eval.enabled:
        result["linear_eval"] = linear.evaluate(
            config, workdir, model, encoder_state(state), mesh, logger)
  # For the run's closing time budget (main.py): this process's seconds.
  result["seconds"] = {
      "training": evaluation_started - training_started,
      "evaluation": time.monotonic() - evaluation_started}
  logger.close()
  manager.close()
  return result
