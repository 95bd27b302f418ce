"""The papers' linear-evaluation protocols: a linear classifier trained by SGD.

`config.linear_eval.protocol` names one of `PROTOCOLS` (or "lbfgs", the
minimal probe of `linear.py`). Each protocol is a frozen `Protocol` of the
values its official code uses; `config.linear_eval.{epochs, learning_rate,
train_batch_size, augment}` replace the protocol's value when set (CPU runs
need fewer epochs and a smaller batch). The encoder is frozen with BatchNorm
in inference mode, the classifier is replicated and each step is one jitted
update on a global batch sharded over the mesh's `data` axis.

  protocol = linear_protocols.resolve(config.linear_eval)
  # augment=False: features extracted once (`linear.extract`), then
  params, summary = linear_protocols.fit_features(
      protocol, train_x, train_y, num_classes, mesh, seed=0)
  # augment=True: crop + flip views from the input pipeline each step
  params, summary = linear_protocols.fit_images(
      protocol, input_config, features_fn, variables, feature_dim,
      num_classes, mesh, seed=0)
  logits = classifier_inputs(protocol, x) @ params["w"] + params["b"]

Schedules are written in epochs of the protocol's own length; overriding
`epochs` stretches the whole schedule (warm-up, milestones, decay period)
with it, so a short CPU run keeps the protocol's shape.
"""

from collections.abc import Callable
import dataclasses
import math
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from contrastive import sharding
from contrastive.data import input_pipeline

LBFGS = "lbfgs"  # The minimal probe of `linear.py`; not an SGD protocol.

# Random resized crop + horizontal flip, the training augmentation of all
# three protocols: SimCLR finetune preprocessing (`color_distort=False`),
# MoCo `RandomResizedCrop` + `RandomHorizontalFlip` (scale 0.08-1, ratio
# 3/4-4/3, as torchvision's defaults and `configs.common.simclr_augment`).
CROP_FLIP = dict(
    crop_area_min=0.08, crop_area_max=1.0, crop_aspect_min=3 / 4,
    crop_aspect_max=4 / 3, flip=True, color_jitter_prob=0.0,
    color_strength=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0,
    on_device=False)


@dataclasses.dataclass(frozen=True)
class Protocol:
  """One paper's linear-evaluation recipe. Epoch-valued fields are epochs."""
  name: str
  optimizer: str  # Key of OPTIMIZERS.
  base_lr: float
  lr_scaling: str  # Key of LR_SCALING: how base_lr grows with the batch.
  batch_size: int  # Global.
  epochs: float
  decay: str  # Key of DECAYS, applied after the warm-up.
  warmup_epochs: float = 0.0  # Linear from 0 to the peak.
  decay_epochs: tuple[float, ...] = ()  # "step": milestones; "exponential":
  decay_rate: float = 1.0               # (period,); both multiply by rate.
  weight_decay: float = 0.0  # Coupled (L2 in the loss), kernel and bias.
  augment: bool = True
  label_smoothing: float = 0.0
  normalize_features: bool = False  # L2-normalise the classifier's inputs.
  init: str = "zeros"  # Key of INITS: the kernel's initialiser; bias 0.

  @property
  def peak_lr(self) -> float:
    return LR_SCALING[self.lr_scaling](self.base_lr, self.batch_size)


def _tf_rmsprop(schedule: optax.Schedule) -> optax.GradientTransformation:
  # TF1 `tf.train.RMSPropOptimizer(lr, decay=0.9, momentum=0.9, epsilon)`
  # (supcon/utils.py `build_optimizer` defaults): mean square initialised to
  # 1, epsilon inside the square root, learning rate inside the momentum.
  # epsilon = 1e-3 is hparams_flags.py's `stage_2_rmsprop_epsilon` default.
  return optax.rmsprop(schedule, decay=0.9, eps=1e-3, initial_scale=1.0,
                       eps_in_sqrt=True, momentum=0.9)


OPTIMIZERS: dict[str, Callable[[optax.Schedule],
                               optax.GradientTransformation]] = {
    # TF `MomentumOptimizer(use_nesterov=True)`: same update as optax's.
    "nesterov": lambda schedule: optax.sgd(schedule, momentum=0.9,
                                           nesterov=True),
    # PyTorch `SGD(momentum=0.9)`: buf = 0.9 buf + g; p -= lr * buf.
    "momentum": lambda schedule: optax.sgd(schedule, momentum=0.9),
    "rmsprop_tf": _tf_rmsprop,
}

LR_SCALING: dict[str, Callable[[float, int], float]] = {
    "linear": lambda lr, batch: lr * batch / 256,
    "none": lambda lr, batch: lr,
}


def _cosine(protocol, peak, steps_per_epoch, decay_steps):
  del protocol, steps_per_epoch
  return optax.cosine_decay_schedule(peak, max(decay_steps, 1))


def _step(protocol, peak, steps_per_epoch, decay_steps):
  del decay_steps
  # At the first step of each milestone epoch, as MoCo's per-epoch
  # `adjust_learning_rate`. Repeated boundaries (tiny runs) still count.
  boundaries = jnp.asarray([round(e * steps_per_epoch)
                            for e in protocol.decay_epochs], jnp.int32)
  return lambda count: peak * protocol.decay_rate ** jnp.sum(
      count >= boundaries)


def _exponential(protocol, peak, steps_per_epoch, decay_steps):
  del decay_steps
  # tf.train.exponential_decay(staircase=True): rate ** floor(step / period).
  period = max(protocol.decay_epochs[0] * steps_per_epoch, 1e-6)
  return lambda count: peak * protocol.decay_rate ** jnp.floor(count / period)


DECAYS = {"cosine": _cosine, "step": _step, "exponential": _exponential}


def learning_rate_schedule(protocol: Protocol, steps_per_epoch: int,
                           total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 (if any), then the protocol's decay."""
  warmup = min(int(protocol.warmup_epochs * steps_per_epoch), total_steps)
  decay = DECAYS[protocol.decay](protocol, protocol.peak_lr, steps_per_epoch,
                                 total_steps - warmup)
  if not warmup:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, protocol.peak_lr, warmup), decay], [warmup])


def _glorot_uniform(rng, shape):
  limit = math.sqrt(6 / sum(shape))
  return rng.uniform(-limit, limit, shape)


INITS: dict[str, Callable[[np.random.Generator, tuple[int, int]],
                          np.ndarray]] = {
    "zeros": lambda rng, shape: np.zeros(shape),
    "glorot_uniform": _glorot_uniform,  # tf.layers.Dense's default.
    "normal_0.01": lambda rng, shape: rng.normal(0.0, 0.01, shape),
}

PROTOCOLS = {
    # google-research/simclr README, "Finetuning the linear head" on
    # ImageNet: --optimizer=momentum (Nesterov in its code) --learning_rate=
    # 0.1 (x B/256, `learning_rate_scaling=linear`) --weight_decay=1e-6
    # --train_epochs=90 --train_batch_size=4096 --warmup_epochs=0
    # --zero_init_logits_layer=True; cosine decay; crop + flip, no colour.
    # Sure of all values (peers.md and methods.md agree); the README's
    # CIFAR-10 command uses weight_decay=0 instead.
    "simclr": Protocol(
        name="simclr", optimizer="nesterov", base_lr=0.1,
        lr_scaling="linear", batch_size=4096, epochs=90, decay="cosine",
        weight_decay=1e-6, augment=True, init="zeros"),
    # google-research supcon/scripts/supcon_imagenet_resnet50.sh, stage 2
    # (the classifier on the stop-gradient encoder): --stage_2_optimizer=
    # RMSPROP --stage_2_base_learning_rate=0.05 (x B/256, launcher.py)
    # --stage_2_epochs=90 --stage_2_weight_decay=1e-6 (classifier kernel and
    # bias, `use_bias_weight_decay=True`) --stage_2_learning_rate_decay=
    # EXPONENTIAL --stage_2_decay_rate=0.97 --stage_2_epochs_per_decay=0.5,
    # --batch_size=6144; label_smoothing 0.05 (IMAGENET_FLAGS); L2-normalised
    # classifier inputs and Glorot init (SUPCON_FLAGS: normalize_embedding,
    # zero_initialize_classifier=False). Not set by the script, so the flag
    # defaults (hparams_flags.py): 12 warm-up epochs, RMSProp epsilon 1e-3;
    # decay 0.9 and momentum 0.9 are `utils.build_optimizer` defaults. Read
    # from the code, not run. Deviations: stage 2 there reads the pretraining
    # augmentation (AutoAugment) and BN in train mode without updating its
    # statistics; here crop + flip and BN in inference mode, as the other
    # protocols. (HobbitLong/SupContrast `main_linear.py` is plain SGD.)
    "supcon": Protocol(
        name="supcon", optimizer="rmsprop_tf", base_lr=0.05,
        lr_scaling="linear", batch_size=6144, epochs=90, decay="exponential",
        warmup_epochs=12, decay_epochs=(0.5,), decay_rate=0.97,
        weight_decay=1e-6, augment=True, label_smoothing=0.05,
        normalize_features=True, init="glorot_uniform"),
    # facebookresearch/moco main_lincls.py defaults: SGD momentum 0.9,
    # lr 30 (not scaled with the batch), weight decay 0, batch 256, 100
    # epochs, lr x 0.1 at epochs 60 and 80, fc init N(0, 0.01), bias 0,
    # RandomResizedCrop + flip, model.eval(). Sure (read from the code).
    "moco": Protocol(
        name="moco", optimizer="momentum", base_lr=30.0, lr_scaling="none",
        batch_size=256, epochs=100, decay="step", decay_epochs=(60, 80),
        decay_rate=0.1, weight_decay=0.0, augment=True, init="normal_0.01"),
    # HobbitLong/SupContrast main_linear.py, as its README runs it for the
    # CIFAR numbers (--batch_size 512 --learning_rate 5): SGD momentum 0.9,
    # lr 5 (not scaled), weight decay 0, 100 epochs, cosine, Linear layer's
    # default init, RandomResizedCrop(scale 0.2-1) + flip. Deviations: crops
    # of 0.08-1 as the other protocols, and a zero-initialised classifier
    # instead of PyTorch's uniform(+-1/sqrt(fan_in)) (the loss is convex, so
    # only the first steps differ). Read from the code, not run.
    "supcontrast": Protocol(
        name="supcontrast", optimizer="momentum", base_lr=5.0,
        lr_scaling="none", batch_size=512, epochs=100, decay="cosine",
        weight_decay=0.0, augment=True, init="zeros"),
}


def names() -> tuple[str, ...]:
  return (LBFGS, *PROTOCOLS)


def check_name(name: str) -> None:
  if name not in names():
    raise ValueError(f"Unknown linear_eval.protocol '{name}'; choose one of "
                     f"{list(names())}.")


def resolve(eval_config: ml_collections.ConfigDict) -> Protocol:
  """The protocol named by `eval_config.protocol`, with its overrides."""
  check_name(eval_config.protocol)
  if eval_config.protocol == LBFGS:
    raise ValueError("'lbfgs' is not an SGD protocol; use linear.probe.")
  protocol = PROTOCOLS[eval_config.protocol]
  overrides = {field: eval_config.get(key) for key, field in (
      ("learning_rate", "base_lr"), ("train_batch_size", "batch_size"),
      ("augment", "augment"), ("epochs", "epochs"))
               if eval_config.get(key) is not None}
  if "epochs" in overrides:
    stretch = overrides["epochs"] / protocol.epochs
    # Milestones and the exponential period stretch alike, so the lr ends
    # as low as in the paper.
    overrides.update(
        warmup_epochs=protocol.warmup_epochs * stretch,
        decay_epochs=tuple(e * stretch for e in protocol.decay_epochs))
  return dataclasses.replace(protocol, **overrides)


def hyperparameters(protocol: Protocol, steps_per_epoch: int,
                    total_steps: int) -> dict[str, Any]:
  """The effective values, for `linear_eval.json`."""
  return {**dataclasses.asdict(protocol), "peak_lr": protocol.peak_lr,
          "steps_per_epoch": steps_per_epoch, "total_steps": total_steps}


def classifier_inputs(protocol: Protocol, x: jax.Array) -> jax.Array:
  if not protocol.normalize_features:
    return x
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def init_classifier(protocol: Protocol, feature_dim: int, num_classes: int,
                    seed: int) -> dict[str, np.ndarray]:
  # numpy: a tiny host computation (under a mesh, jax would run it on every
  # device).
  rng = np.random.default_rng(seed)
  return {"w": INITS[protocol.init](rng, (feature_dim, num_classes)).astype(
              np.float32),
          "b": np.zeros((num_classes,), np.float32)}


def create_optimizer(protocol: Protocol, steps_per_epoch: int,
                     total_steps: int) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(protocol, steps_per_epoch, total_steps)
  # Coupled decay = the L2 term wd/2 |theta|^2 of the TF and PyTorch codes,
  # so it passes through RMSProp's scaling as theirs does.
  return optax.chain(optax.add_decayed_weights(protocol.weight_decay),
                     OPTIMIZERS[protocol.optimizer](schedule))


def make_train_step(protocol: Protocol, tx: optax.GradientTransformation,
                    num_classes: int, features_fn=None):
  """Jitted `(params, opt_state, variables, batch) -> (..., loss)`.

  `batch` holds "x" (features) or, with `features_fn(variables, images)`,
  "image"; and "label". Batch arrays are sharded over `data`, params
  replicated: XLA all-reduces the gradient of the global mean loss.
  """

  def loss_fn(params, x, labels):
    logits = classifier_inputs(protocol, x) @ params["w"] + params["b"]
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes),
                                  protocol.label_smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()

  @jax.jit
  def step(params, opt_state, variables, batch):
    if features_fn is None:
      x = batch["x"]
    else:
      # Frozen encoder: no gradient, BN statistics untouched.
      x = jax.lax.stop_gradient(features_fn(variables, batch["image"]))
    loss, grads = jax.value_and_grad(loss_fn)(params, x, batch["label"])
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def _check_batch(protocol: Protocol, examples: int, mesh) -> None:
  """Whole batches only, as the papers' loaders; `examples` per process."""
  sharding.check_batch_divisible(protocol.batch_size, mesh)
  if protocol.batch_size // jax.process_count() > examples:
    raise ValueError(
        f"linear_eval: the global batch {protocol.batch_size} of protocol "
        f"'{protocol.name}' needs more than the {examples} training examples "
        "per process; set config.linear_eval.train_batch_size lower.")


def _train(protocol, features_fn, batches, params, variables, num_classes,
           mesh, steps_per_epoch, log_fn):
  """Runs the steps over `batches`; returns (params, summary)."""
  total_steps = max(1, round(protocol.epochs * steps_per_epoch))
  tx = create_optimizer(protocol, steps_per_epoch, total_steps)
  step = make_train_step(protocol, tx, num_classes, features_fn)
  with jax.set_mesh(mesh):
    params = jax.device_put(params, sharding.replicated(mesh))
    opt_state = jax.jit(tx.init)(params)
    epoch_losses, loss_sum, count = [], 0.0, 0
    for index, batch in zip(range(total_steps), batches):
      params, opt_state, loss = step(params, opt_state, variables, batch)
      loss_sum, count = loss_sum + loss, count + 1
      if (index + 1) % steps_per_epoch == 0 or index + 1 == total_steps:
        # One host sync per epoch, not per step.
        epoch_losses.append(float(loss_sum) / count)
        logging.info("linear_eval %s: epoch %d/%g, train loss %.4f",
                     protocol.name, len(epoch_losses), protocol.epochs,
                     epoch_losses[-1])
        if log_fn is not None:
          log_fn(len(epoch_losses), epoch_losses[-1])
        loss_sum, count = 0.0, 0
  summary = hyperparameters(protocol, steps_per_epoch, total_steps)
  summary["train_loss"] = epoch_losses
  return jax.device_get(params), summary


def fit_features(protocol: Protocol, train_x: np.ndarray, train_y: np.ndarray,
                 num_classes: int, mesh, *, seed: int, log_fn=None
                 ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Trains on cached features, shuffled each epoch by (seed, epoch).

  Every process holds all of `train_x` (as `linear.extract` returns it) and
  contributes its rows of each global batch.
  """
  num_train = len(train_x)
  _check_batch(protocol, num_train // jax.process_count(), mesh)
  steps_per_epoch = num_train // protocol.batch_size
  local = protocol.batch_size // jax.process_count()
  rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)

  def batches():
    for epoch in range(math.ceil(protocol.epochs) + 1):
      order = np.random.default_rng([seed, epoch]).permutation(num_train)
      for i in range(steps_per_epoch):
        index = order[i * protocol.batch_size:(i + 1) * protocol.batch_size]
        yield sharding.make_global_batch(mesh, {
            "x": train_x[index[rows]], "label": train_y[index[rows]]})

  params = init_classifier(protocol, train_x.shape[1], num_classes, seed)
  return _train(protocol, None, batches(), params, None, num_classes, mesh,
                steps_per_epoch, log_fn)


def augmented_input_config(input_config: ml_collections.ConfigDict,
                           dataset: str, split: str,
                           batch_size: int) -> ml_collections.ConfigDict:
  """`config.input` for one crop + flip view per image of `split`."""
  fields = input_config.to_dict()
  fields.update(dataset=dataset, train_split=split, batch_size=batch_size,
                views=1, small_views=0, augment=dict(CROP_FLIP))
  return ml_collections.ConfigDict(fields)


def fit_images(protocol: Protocol, input_config: ml_collections.ConfigDict,
               features_fn, variables, feature_dim: int, num_classes: int,
               mesh, *, seed: int, log_fn=None
               ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Trains on augmented views, the frozen features computed in each step.

  `input_config` as from `augmented_input_config`; batches come from
  `input_pipeline.pretrain_dataset`, a pure function of (seed, step).
  """
  num_train = input_pipeline.num_examples(
      input_config.dataset, input_config.train_split, input_config.data_dir)
  # pretrain_dataset's epoch: whole local batches of this process's shard.
  shard = num_train // jax.process_count()
  _check_batch(protocol, shard, mesh)
  steps_per_epoch = shard // (protocol.batch_size // jax.process_count())
  dataset = input_pipeline.pretrain_dataset(input_config, seed=seed)

  def batches():
    for local in dataset.as_numpy_iterator():
      yield sharding.make_global_batch(mesh, {"image": local["image"][:, 0],
                                              "label": local["label"]})

  params = init_classifier(protocol, feature_dim, num_classes, seed)
  return _train(protocol, features_fn, batches(), params, variables,
                num_classes, mesh, steps_per_epoch, log_fn)
