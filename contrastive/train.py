"""Contrastive pretraining: `train_and_evaluate(config, workdir)`.

The step is a pure function of (state, batch); it is jitted once over the
mesh with explicit shardings and the state donated. The batch is
`{"image": f32[B, V, H, W, C], "label": i32[B]}` (plus `"bias_label": i32[B]`
from datasets with a bias attribute), sharded on B over `data`;
views are folded into the batch for the encoder (global BN over all B*V
views, as SimCLR) and unfolded for the loss, which meets the global batch
through `shard_map` (see `contrastive/sharding.py`).
"""

import functools
import inspect
from typing import Any

import json
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow as tf

from contrastive import checkpoint
from contrastive import config_checks
from contrastive import grad_cache
from contrastive import losses
from contrastive import metric_logging
from contrastive import models
from contrastive import momentum as momentum_lib
from contrastive import optim
from contrastive import pseudo_labels
from contrastive import run_dir
from contrastive import sharding
from contrastive import state as state_lib
from contrastive import training_loop
from contrastive.data import input_pipeline
from contrastive.evaluation import clustering
from contrastive.evaluation import linear
from contrastive.evaluation import online
from contrastive.losses import excon
from contrastive.losses import moco
from contrastive.losses import opencon
from contrastive.losses import unicon


# Loss inputs that are model outputs, and the setting that makes the model
# produce them.
_MODEL_OUTPUTS = {
    "prototype_cosines": ("--config.model.num_prototypes to the number of "
                          "classes"),
    "bregman_phi": "--config.model.bregman.subnetworks to K > 0",
    "class_logits": ("--config.model.linear_classes to the number of "
                     "classes"),
}

# Fold-in constants that give each kind of per-step randomness its own
# stream of `jax.random.key(config.seed)`.
_LOSS_RNG_STREAM = 1


def train_step(state: state_lib.TrainState, batch: dict[str, jax.Array], *,
               model, tx: optax.GradientTransformation, loss_fn,
               loss_config: ml_collections.ConfigDict,
               schedule: optax.Schedule, grad_cache_chunks: int = 0,
               probe_tx: optax.GradientTransformation | None = None,
               seed: int = 0,
               momentum_config: ml_collections.ConfigDict | None = None,
               total_steps: int = 1):
  """One optimisation step on the global batch; returns (state, metrics).

  `grad_cache_chunks` > 0 computes the same gradient with GradCache (see
  `contrastive/grad_cache.py`): activation memory of one chunk. With
  `probe_tx`, the online linear probe in `state.probe_params` also takes a
  step on the gradient-stopped features of every view
  (`contrastive/evaluation/online.py`). `seed` keys the step's own
  randomness (UniCon's universum, MoCHi's mixing), folded with the step
  number. For momentum-encoder losses, `state.momentum` holds the key
  encoder and the queue: the loss gets the key encoder's embeddings of the
  same views and the queue as it was before the step; then the key encoder
  moves towards the updated online one by the EMA of `momentum_config`
  (momentum scheduled over `total_steps`) and the keys of the global batch
  (views `moco.KEY_VIEWS`, batch-major) are enqueued.
  """
  images = batch["image"]
  # Multi-crop's small views ([B, V_small, s, s, C]), or None.
  small_images = batch.get("image_small")
  labels = batch["label"] if loss_config.use_labels else None
  needs = losses.extra_inputs(loss_config.name)
  extra_metrics = {}
  if small_images is not None and (grad_cache_chunks or {
      "explanations", "universum"} & set(needs)):
    raise ValueError(
        "Multi-crop small views (input.small_views > 0) are not supported "
        "with GradCache, UniCon's universum or ExCon's explanations; set "
        "input.small_views=0.")
  if "explanations" in needs:
    if probe_tx is None:
      raise ValueError(f"Loss {loss_config.name!r} explains the online "
                       "probe's predictions; set "
                       "--config.online_eval.probe=True.")
    options = {key: loss_config.kwargs[key] for key in
               excon.EXPLANATION_OPTIONS if key in loss_config.kwargs}
    explanation = excon.explain(
        model, {"params": state.params, "batch_stats": state.batch_stats},
        state.probe_params, images, batch["label"], **options)
    explain_from_step = loss_config.kwargs.get("explain_from_step", 0)
    explanation = excon.from_step(explanation, state.step, explain_from_step)
    images, extra_metrics["masked_view_fraction"] = excon.masked_views(
        images, explanation)
  # Images the loss needs embedded in a pass of their own, by loss input.
  second_pass_images = {}
  if "universum" in needs:
    options = {key: loss_config.kwargs[key] for key in
               unicon.UNIVERSUM_OPTIONS if key in loss_config.kwargs}
    second_pass_images["universum"] = unicon.make_universum(
        images, batch["label"],
        jax.random.fold_in(jax.random.key(seed), state.step), **options)
  if "explanations" in needs and loss_config.kwargs.get("negative_pair"):
    second_pass_images["background"] = explanation.masked[:, None]
  if second_pass_images and grad_cache_chunks:
    raise ValueError(f"Loss {loss_config.name!r} embeds a second batch "
                     f"({', '.join(second_pass_images)}) and does not "
                     "support GradCache; set --config.grad_cache_chunks=0.")

  def embed(params, batch_stats, chunk):
    # Views are folded into the batch: BN sees every view of the chunk.
    num_images, num_views = chunk.shape[:2]
    outputs, new_model_state = model.apply(
        {"params": params, "batch_stats": batch_stats},
        chunk.reshape(num_images * num_views, *chunk.shape[2:]),
        train=True, mutable=["batch_stats"])
    outputs = jax.tree.map(
        lambda x: x.reshape(num_images, num_views, *x.shape[1:]), outputs)
    embedding = outputs["embedding"]
    if embedding.ndim == 4:
      # One embedding per modality (CMC's multiview model): the modalities
      # of each view are further views, [B, views * modalities, dim].
      outputs["embedding"] = embedding.reshape(num_images, -1,
                                               embedding.shape[-1])
    return outputs, new_model_state["batch_stats"]

  # The momentum losses' inputs: constants of the step (no gradient).
  momentum_inputs, keys, key_batch_stats = {}, None, None
  if "keys" in needs:
    key_outputs, key_batch_stats = embed(state.momentum["params"],
                                         state.momentum["batch_stats"], images)
    # With a predictor, the key encoder's projection (MoCo v3, BYOL).
    keys = jax.lax.stop_gradient(key_outputs.get("target_embedding",
                                                 key_outputs["embedding"]))
    momentum_inputs["keys"] = keys
  if "queue" in needs:
    momentum_inputs["queue"] = state.momentum["queue"].keys
  if "queue_labels" in needs:
    momentum_inputs["queue_labels"] = state.momentum["queue"].labels
  if "class_queue" in needs:
    momentum_inputs["class_queue"] = state.momentum["class_queue"].keys
  if {"pseudo_labels", "index"} & set(needs):
    if input_pipeline.INDEX_KEY not in batch:
      raise ValueError(
          f"Loss {loss_config.name!r} looks up each image's pseudo-label by "
          "its index: set --config.input.example_index=True.")
    index = batch[input_pipeline.INDEX_KEY]
  if "index" in needs:
    momentum_inputs["index"] = index
  if "memory_bank" in needs:
    momentum_inputs["memory_bank"] = state.momentum["memory_bank"]
  if "bank_clusters" in needs:
    momentum_inputs["bank_clusters"] = state.momentum["bank_clusters"]
  if "open_labels" in needs:
    if "open_label" not in batch:
      raise ValueError(
          f"Loss {loss_config.name!r} needs partial labels: train on an "
          "open-world dataset (e.g. input.dataset='open_world/"
          "fashion_mnist_seen5_labeled50').")
    momentum_inputs["open_labels"] = batch["open_label"]
  if "prototypes" in needs:
    momentum_inputs["prototypes"] = state.momentum["prototypes"]
  if "pseudo_labels" in needs:
    table = state.momentum["pseudo_labels"][index]
    # Images without an accepted pseudo-label get ids of their own
    # (negative, so never equal to an accepted one).
    momentum_inputs["pseudo_labels"] = jnp.where(table >= 0, table,
                                                 -1 - index)
  if "rng" in needs:
    momentum_inputs["rng"] = jax.random.fold_in(
        jax.random.fold_in(jax.random.key(seed), _LOSS_RNG_STREAM),
        state.step)
  if "step" in needs:
    momentum_inputs["step"] = state.step
  if "background" in second_pass_images:
    momentum_inputs["background_valid"] = excon.backgrounds(
        explanation, state.step, explain_from_step)

  def loss_of_embeddings(outputs, second_pass_embeddings=None):
    extra = dict(second_pass_embeddings or {})
    extra.update(momentum_inputs)
    if "features" in needs:
      extra["features"] = outputs["features"]
    if "bias_labels" in needs:
      if "bias_label" not in batch:
        raise ValueError(
            f"Loss {loss_config.name!r} needs bias labels; train on a "
            "dataset that has them (e.g. input.dataset="
            "'biased_fashion_mnist/rho0.99').")
      extra["bias_labels"] = batch["bias_label"]
    for name, setting in _MODEL_OUTPUTS.items():
      if name in needs:
        if name not in outputs:
          raise ValueError(f"Loss {loss_config.name!r} needs the model's "
                           f"{name!r}; set {setting}.")
        extra[name] = outputs[name]
    loss, loss_metrics = loss_fn(
        outputs["embedding"], labels, temperature=loss_config.temperature,
        loss_impl=loss_config.loss_impl,
        block_size=loss_config.block_size or None, **loss_config.kwargs,
        **extra)
    return loss, (loss_metrics, jax.lax.stop_gradient(outputs["features"]),
                  jax.lax.stop_gradient(outputs["embedding"]))

  if grad_cache_chunks:
    (loss, (loss_metrics, features, embeddings)), grads, batch_stats = (
        grad_cache.loss_and_grads(
            embed, loss_of_embeddings, state.params, state.batch_stats,
            images, chunks=grad_cache_chunks))
  else:
    def compute_loss(params):
      batch_stats = state.batch_stats
      # First, each in its own pass (its own BN batch statistics), as
      # UniCon's reference embeds its universum.
      second_pass_embeddings = {}
      for name, extra_images in second_pass_images.items():
        extra_outputs, batch_stats = embed(params, batch_stats, extra_images)
        second_pass_embeddings[name] = extra_outputs["embedding"]
      outputs, batch_stats = embed(params, batch_stats, images)
      if small_images is not None:
        # Their own pass (another resolution), then after the large views
        # on the view axis: every output is [B, views, ...].
        small_outputs, batch_stats = embed(params, batch_stats, small_images)
        outputs = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=1),
                               outputs, small_outputs)
      loss, aux = loss_of_embeddings(outputs, second_pass_embeddings)
      return loss, (aux, batch_stats)

    (loss, ((loss_metrics, features, embeddings), batch_stats)), grads = (
        jax.value_and_grad(compute_loss, has_aux=True)(state.params))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      "loss": loss,
      "learning_rate": schedule(state.step),
      "grad_norm": optax.global_norm(grads),
      "param_norm": optax.global_norm(params),
      **loss_metrics,
      **extra_metrics,
  }
  probe_params, probe_opt_state = state.probe_params, state.probe_opt_state
  if probe_tx is not None:
    # The probe learns from the full-size views only.
    features = features[:, :images.shape[1]]
    num_images, num_views = features.shape[:2]
    probe_params, probe_opt_state, probe_metrics = online.probe_step(
        probe_params, probe_opt_state,
        features.reshape(num_images * num_views, -1),
        jnp.repeat(batch["label"], num_views), probe_tx)
    metrics.update(probe_metrics)
  new_momentum = dict(state.momentum)
  if "params" in new_momentum:
    ema = momentum_lib.momentum_schedule(
        state.step, total_steps, momentum_config.base,
        momentum_config.schedule)
    new_momentum["params"] = momentum_lib.ema_update(
        state.momentum["params"], params, ema)
    new_momentum["batch_stats"] = key_batch_stats
    metrics["ema_momentum"] = ema
  if "queue" in new_momentum:
    # The key encoder's keys, or for losses without one (GPaCo) the online
    # embeddings; labels go along for the losses that use them.
    source = embeddings if keys is None else keys
    key_views = min(source.shape[1], moco.KEY_VIEWS)
    new_keys = source[:, :key_views].reshape(-1, source.shape[-1])
    new_labels = (None if "label" not in batch
                  else jnp.repeat(batch["label"], key_views))
    new_momentum["queue"] = momentum_lib.enqueue(
        state.momentum["queue"], new_keys, new_labels)
  if "prototypes" in new_momentum:
    # OpenCon's prototypes follow the batch by EMA, after the step.
    new_momentum["prototypes"] = opencon.update_prototypes(
        state.momentum["prototypes"], embeddings, batch["open_label"],
        num_seen=loss_config.kwargs["num_seen"],
        momentum=momentum_config.prototype_momentum)
  if "memory_bank" in new_momentum:
    # InterCLR's bank row of each image: its key (view 0) blended in.
    new_momentum["memory_bank"] = momentum_lib.update_bank(
        state.momentum["memory_bank"], batch[input_pipeline.INDEX_KEY],
        (embeddings if keys is None else keys)[:, 0],
        momentum_config.bank_update_rate)
  if "class_queue" in new_momentum:
    # ResCom feeds its class queues with the online embeddings of view 0.
    new_momentum["class_queue"] = momentum_lib.enqueue_by_class(
        state.momentum["class_queue"], embeddings[:, 0], batch["label"])
  new_state = state.replace(step=state.step + 1, params=params,
                            batch_stats=batch_stats, opt_state=opt_state,
                            probe_params=probe_params,
                            probe_opt_state=probe_opt_state,
                            momentum=new_momentum)
  return new_state, metrics


def _momentum_state_spec(config: ml_collections.ConfigDict,
                         num_classes: int = 0,
                         num_train: int = 0) -> dict[str, Any]:
  """`momentum_encoder`, `queue_size` and `class_queue` the loss needs."""
  needs = losses.extra_inputs(config.loss.name)
  class_queue = None
  if "class_queue" in needs:
    per_class = config.momentum.get("class_queue_size", 0)
    if per_class < 1 or num_classes < 1:
      raise ValueError(
          f"Loss {config.loss.name!r} keeps a queue of keys per class: set "
          f"config.momentum.class_queue_size >= 1 (got {per_class}) on a "
          f"labelled dataset (classes: {num_classes}).")
    class_queue = (num_classes, per_class)
  queue_size = None
  if "queue" in needs:
    queue_size = config.momentum.queue_size
    key_views = min(config.input.views, moco.KEY_VIEWS)
    per_step = config.input.batch_size * key_views
    if 0 < queue_size < per_step:
      raise ValueError(
          f"config.momentum.queue_size={queue_size} is shorter than the "
          f"{per_step} keys enqueued per step (global batch x {key_views} "
          "key views); make it at least that, or 0 for no queue.")
  return dict(momentum_encoder="keys" in needs, queue_size=queue_size,
              class_queue=class_queue,
              pseudo_label_table=(num_train if "pseudo_labels" in needs
                                  else None),
              memory_bank=num_train if "memory_bank" in needs else None,
              prototypes=num_classes if "prototypes" in needs else None)


def _restore_or_create(config: ml_collections.ConfigDict, workdir: str,
                       manager, model, tx, image_shape, mesh, abstract_state,
                       probe_tx, num_classes, num_train):
  """The state to continue from: the newest good checkpoint, else a new one.

  A workdir with checkpoints must have been started by the same config
  (see `run_dir.check_config`).
  """
  run_dir.check_config(workdir, config,
                       has_checkpoint=bool(manager.all_steps()))
  state = checkpoint.restore_latest(manager, abstract_state)
  if state is None:
    state = state_lib.create_train_state(
        model, tx, jax.random.key(config.seed), image_shape, mesh,
        probe_tx=probe_tx, num_classes=num_classes,
        **_momentum_state_spec(config, num_classes, num_train))
  return state


def evaluate_prototypes(config: ml_collections.ConfigDict, model, state,
                        mesh) -> dict[str, Any]:
  """Top-1/top-5 of the model's own classifier (ESupCon's prototypes or
  PaCo's linear classifier, `model.classify`) on `linear_eval`'s test
  split."""
  logits_fn = jax.jit(
      lambda variables, x: model.apply(variables, x, method=model.classify),
      out_shardings=sharding.batch_sharding(mesh))
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  return linear.evaluate_classifier_logits(
      config, mesh, lambda x: logits_fn(variables, x),
      int(jax.device_get(state.step)))


def evaluate_open_world(config: ml_collections.ConfigDict, model, state,
                        mesh) -> dict[str, Any]:
  """OpenCon's clustering accuracy: each test image goes to its nearest
  prototype; all / seen / novel accuracy by ORCA's protocol (Hungarian
  matching; `contrastive/evaluation/clustering.py`) on `linear_eval`'s test
  split. Classes 0 .. num_seen - 1 are the seen ones."""
  embed = pseudo_labels.embedding_fn(model, mesh)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  dataset = config.linear_eval.dataset or config.input.dataset
  embeddings, labels = linear.extract(config, dataset,
                                      config.linear_eval.test_split, mesh,
                                      lambda x: embed(variables, x))
  prototypes = np.asarray(jax.device_get(state.momentum["prototypes"]))
  predictions = np.argmax(embeddings @ prototypes.T, axis=-1)
  num_seen = config.loss.kwargs["num_seen"]
  scores = clustering.open_world_accuracy(predictions, labels,
                                          range(num_seen))
  return {**{f"{name}_top1": float(value) for name, value in scores.items()},
          "dataset": dataset, "split": config.linear_eval.test_split,
          "num_test": int(labels.shape[0]), "num_seen": num_seen,
          "step": int(jax.device_get(state.step))}


def _recorded_results(config: ml_collections.ConfigDict, workdir: str,
                      latest_step: int | None, total_steps: int,
                      scores_clustering: bool) -> dict[str, Any] | None:
  """The results a finished run wrote, or None if it has to run (on).

  Finished means: the latest checkpoint is the last step and every enabled
  evaluation's record is of that step.
  """
  if latest_step != total_steps:
    return None
  records = {}
  if config.model.num_prototypes or config.model.get("linear_classes", 0):
    records["classifier"] = "classifier_eval.json"
  if scores_clustering:
    records["clustering"] = "clustering_eval.json"
  if config.linear_eval.enabled:
    records["linear_eval"] = "linear_eval.json"
  result = {"step": total_steps, "preempted": False, "train": {},
            "seconds": {"training": 0.0, "evaluation": 0.0}}
  for key, name in records.items():
    path = os.path.join(workdir, name)
    if not tf.io.gfile.exists(path):
      return None
    with tf.io.gfile.GFile(path) as f:
      result[key] = json.load(f)
    if result[key].get("step") != total_steps:
      return None
  metrics = os.path.join(workdir, "metrics.jsonl")
  if tf.io.gfile.exists(metrics):
    with tf.io.gfile.GFile(metrics) as f:
      lines = f.read().splitlines()
    if lines:
      result["train"] = json.loads(lines[-1])
  return result


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Pretrains (resuming from `workdir` if it holds a checkpoint), evaluates.

  A run resumed after any interruption is bitwise the run that was never
  interrupted (see `training_loop`). On SIGTERM the run checkpoints after
  the current step and returns early with `result["preempted"] = True`.

  Returns the final training metrics and, if enabled, the linear-eval result.
  """
  config_checks.validate(config)
  run_dir.ensure_writable(workdir)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_divisible(config.input.batch_size, mesh)
  if config.grad_cache_chunks:
    grad_cache.check_chunks(config.input.batch_size,
                            mesh.shape[sharding.DATA_AXIS],
                            config.grad_cache_chunks)

  info = input_pipeline.dataset_info(config.input.dataset,
                                     config.input.data_dir)
  num_train = input_pipeline.num_examples(
      config.input.dataset, config.input.train_split, config.input.data_dir)
  total_steps, warmup_steps, steps_per_epoch = training_loop.steps_for(
      config, num_train)
  image_shape = (config.input.image_size, config.input.image_size,
                 info.features["image"].shape[-1])
  logging.info("Training %d steps (%d per epoch, warm-up %d) on %d devices, "
               "global batch %d images x %d views.", total_steps,
               steps_per_epoch, warmup_steps, mesh.size,
               config.input.batch_size, config.input.views)

  model = models.create(config.model)
  schedule = optim.learning_rate_schedule(
      config.optim, config.input.batch_size, total_steps, warmup_steps)
  tx = optim.create(config.optim, schedule)
  loss_fn = losses.get_with_metrics(config.loss.name)
  if config.loss.get("class_prior", False):
    prior = input_pipeline.class_frequencies(
        config.input.dataset, config.input.train_split, config.input.data_dir)
    logging.info("Class prior of %s: %s", config.input.train_split,
                 prior.round(4).tolist())
    loss_fn = functools.partial(loss_fn,
                                class_prior=jnp.asarray(prior, jnp.float32))
  if "class_counts" in inspect.signature(loss_fn).parameters:
    # Class-balanced losses (ResCom) weigh classes by their training counts.
    counts = input_pipeline.class_counts(
        config.input.dataset, config.input.train_split, config.input.data_dir)
    logging.info("Class counts of %s: %s", config.input.train_split,
                 counts.tolist())
    loss_fn = functools.partial(loss_fn,
                                class_counts=jnp.asarray(counts, jnp.float32))

  probe_tx = (online.probe_optimizer(config.online_eval.probe_learning_rate,
                                     total_steps)
              if config.online_eval.probe else None)
  num_classes = info.features["label"].num_classes
  for field in ("num_prototypes", "linear_classes"):
    if config.model.get(field, 0) not in (0, num_classes):
      raise ValueError(
          f"config.model.{field}={config.model.get(field)} must be "
          f"the number of classes of {config.input.dataset} ({num_classes}) "
          "or 0.")

  manager = checkpoint.create_manager(workdir, config.keep_checkpoints)
  momentum_spec = _momentum_state_spec(config, num_classes, num_train)
  if not config.reevaluate:
    recorded = _recorded_results(
        config, workdir, manager.latest_step(), total_steps,
        scores_clustering=momentum_spec["prototypes"] is not None)
    if recorded is not None:
      run_dir.check_config(workdir, config, has_checkpoint=True)
      logging.info("The run in %s finished at step %d; printing its recorded "
                   "results (--config.reevaluate=True evaluates it again, a "
                   "larger --config.total_steps trains it on).", workdir,
                   total_steps)
      manager.close()
      return recorded
  abstract_state = state_lib.abstract_train_state(
      model, tx, image_shape, mesh, probe_tx=probe_tx,
      num_classes=num_classes, **momentum_spec)
  state = _restore_or_create(config, workdir, manager, model, tx, image_shape,
                             mesh, abstract_state, probe_tx, num_classes,
                             num_train)

  state_shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
  step = functools.partial(train_step, model=model, tx=tx, loss_fn=loss_fn,
                           loss_config=config.loss, schedule=schedule,
                           grad_cache_chunks=config.grad_cache_chunks,
                           probe_tx=probe_tx, seed=config.seed,
                           momentum_config=config.momentum,
                           total_steps=total_steps)

  def evaluate_online(state):
    return online.evaluate(
        config, model,
        {"params": state.params, "batch_stats": state.batch_stats}, mesh,
        probe_params=state.probe_params if config.online_eval.probe else None)

  refresh = None
  if "pseudo_labels" in losses.extra_inputs(config.loss.name):
    # IFND: re-cluster the training set every `refresh_every_epochs`.
    every = max(1, round(config.pseudo_labels.refresh_every_epochs
                         * steps_per_epoch))
    embed = pseudo_labels.embedding_fn(model, mesh)
    refresh = (every, lambda state, step: pseudo_labels.refresh(
        config, embed, state, mesh, step=step, total_steps=total_steps,
        num_examples=num_train))
  elif "bank_clusters" in losses.extra_inputs(config.loss.name):
    # InterCLR: online k-means of the memory bank.
    every = max(1, round(config.momentum.bank_cluster_every_epochs
                         * steps_per_epoch))
    refresh = (every, lambda state, step: pseudo_labels.cluster_bank(
        config, state, step=step))

  logger = metric_logging.MetricLogger(workdir)
  training_started = time.monotonic()
  state, last_metrics, preempted = training_loop.run(
      config, step, state, state_shardings, mesh=mesh, manager=manager,
      logger=logger, total_steps=total_steps,
      steps_per_epoch=steps_per_epoch, evaluate_online=evaluate_online,
      headline_metric="contrastive_acc", refresh=refresh)
  evaluation_started = time.monotonic()
  result = {"train": last_metrics, "step": int(jax.device_get(state.step)),
            "preempted": preempted}
  if not preempted and (config.model.num_prototypes
                        or config.model.get("linear_classes", 0)):
    # The prototype classifier is scored directly (ESupCon), as the CE
    # trainer's classifier: `classifier_eval.json`.
    with jax.set_mesh(mesh):
      result["classifier"] = evaluate_prototypes(config, model, state, mesh)
    kind = "Prototype" if config.model.num_prototypes else "Linear"
    logging.info("%s classifier: %s", kind, result["classifier"])
    logger.writer.write_scalars(result["step"], {
        "classifier/top1": result["classifier"]["top1"],
        "classifier/top5": result["classifier"]["top5"]})
    if jax.process_index() == 0:
      with tf.io.gfile.GFile(os.path.join(workdir, "classifier_eval.json"),
                             "w") as f:
        json.dump(result["classifier"], f, indent=2)
  if not preempted and "prototypes" in state.momentum:
    # OpenCon is scored by clustering the test images with its prototypes.
    with jax.set_mesh(mesh):
      result["clustering"] = evaluate_open_world(config, model, state, mesh)
    logging.info("Open-world clustering accuracy: %s", result["clustering"])
    logger.writer.write_scalars(result["step"], {
        f"clustering/{name}": result["clustering"][f"{name}_top1"]
        for name in ("all", "seen", "novel")})
    if jax.process_index() == 0:
      with tf.io.gfile.GFile(os.path.join(workdir, "clustering_eval.json"),
                             "w") as f:
        json.dump(result["clustering"], f, indent=2)
  if not preempted and config.linear_eval.enabled:
    with jax.set_mesh(mesh):
      result["linear_eval"] = linear.evaluate(
          config, workdir, model, state, mesh, logger)
  # For the run's closing time budget (main.py): this process's seconds.
  result["seconds"] = {
      "training": evaluation_started - training_started,
      "evaluation": time.monotonic() - evaluation_started}
  logger.close()
  manager.close()
  return result
