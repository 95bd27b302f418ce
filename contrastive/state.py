"""The explicit training state and its sharded creation."""

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from contrastive import momentum as momentum_lib
from contrastive import sharding
from contrastive.evaluation import online


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  # The online linear probe on stop-gradient features ({} when off): its
  # own parameters and optimizer, so it never moves the encoder.
  probe_params: Any = flax.struct.field(default_factory=dict)
  probe_opt_state: Any = flax.struct.field(default_factory=dict)
  # Momentum-encoder losses ({} otherwise): "params" and "batch_stats" of
  # the key encoder (an EMA of the online one), "queue", a `momentum.Queue`
  # of past keys, and for ResCom "class_queue", a `momentum.ClassQueue`.
  # Checkpointed and restored with the rest.
  momentum: Any = flax.struct.field(default_factory=dict)


def _init_momentum(model, variables, images, rng, momentum_encoder: bool,
                   queue_size: int | None,
                   class_queue: tuple[int, int] | None = None,
                   pseudo_label_table: int | None = None,
                   memory_bank: int | None = None,
                   prototypes: int | None = None
                   ) -> dict[str, Any]:
  """The key encoder (a copy of the online one) and the queues, as asked."""
  state = {}
  if prototypes is not None:
    # OpenCon's class prototypes (seen and novel), moved by EMA, not by
    # gradient: random unit vectors at the start.
    dim = model.apply(variables, images, train=False)["embedding"].shape[-1]
    state["prototypes"] = momentum_lib.init_queue(
        prototypes, dim, jax.random.fold_in(rng, 4)).keys
  if memory_bank is not None:
    # InterCLR: a feature per training image (random unit vectors until the
    # image is first seen) and its k-means cluster (-1: none yet).
    dim = model.apply(variables, images, train=False)["embedding"].shape[-1]
    bank = momentum_lib.init_queue(memory_bank, dim,
                                   jax.random.fold_in(rng, 3))
    state["memory_bank"] = bank.keys
    state["bank_clusters"] = bank.labels
  if pseudo_label_table is not None:
    # IFND's per-image pseudo-labels, none accepted yet.
    state["pseudo_labels"] = jnp.full((pseudo_label_table,), -1, jnp.int32)
  if momentum_encoder:
    state["params"] = jax.tree.map(jnp.copy, variables["params"])
    state["batch_stats"] = jax.tree.map(jnp.copy,
                                        variables.get("batch_stats", {}))
  if queue_size is not None:
    dim = model.apply(variables, images, train=False)["embedding"].shape[-1]
    # Its own stream: the queue's random start must not repeat the init's.
    state["queue"] = momentum_lib.init_queue(
        queue_size, dim, jax.random.fold_in(rng, 1))
  if class_queue is not None:
    dim = model.apply(variables, images, train=False)["embedding"].shape[-1]
    num_classes, per_class = class_queue
    state["class_queue"] = momentum_lib.init_class_queue(
        num_classes, per_class, dim, jax.random.fold_in(rng, 2))
  return state


def _init_fn(model, tx: optax.GradientTransformation,
             image_shape: tuple[int, ...], probe_tx, num_classes,
             momentum_encoder: bool = False, queue_size: int | None = None,
             class_queue: tuple[int, int] | None = None,
             pseudo_label_table: int | None = None,
             memory_bank: int | None = None,
             prototypes: int | None = None):
  def init(rng):
    images = jnp.zeros((2, *image_shape), jnp.float32)
    variables = model.init(rng, images, train=False)
    params = variables["params"]
    probe_params = probe_opt_state = {}
    if probe_tx is not None:
      features = model.apply(variables, images, method=model.features)
      probe_params = online.probe_init(features.shape[-1], num_classes)
      probe_opt_state = online.probe_optimizer_init(probe_tx, probe_params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params), probe_params=probe_params,
                      probe_opt_state=probe_opt_state,
                      momentum=_init_momentum(model, variables, images, rng,
                                              momentum_encoder, queue_size,
                                              class_queue,
                                              pseudo_label_table,
                                              memory_bank, prototypes))
  return init


def create_train_state(model, tx: optax.GradientTransformation, rng: jax.Array,
                       image_shape: tuple[int, ...], mesh: jax.sharding.Mesh,
                       probe_tx: optax.GradientTransformation | None = None,
                       num_classes: int = 0, momentum_encoder: bool = False,
                       queue_size: int | None = None,
                       class_queue: tuple[int, int] | None = None,
                       pseudo_label_table: int | None = None,
                       memory_bank: int | None = None,
                       prototypes: int | None = None
                       ) -> TrainState:
  """Initialises the state directly into its sharding (`state_sharding`).

  `image_shape` is `(H, W, C)`. The init is jitted with output shardings so
  nothing is materialised off its final devices. With `probe_tx`, the state
  carries an online linear probe over `num_classes`; with
  `momentum_encoder`, a key encoder starting as a copy of the online one;
  with `queue_size` (an int, 0 allowed), a queue of that many random keys;
  with `class_queue` (num_classes, per_class), ResCom's class queue; with
  `pseudo_label_table` (the number of training images), IFND's table; with
  `memory_bank` (likewise), InterCLR's bank and clusters, row-sharded;
  with `prototypes` (a number of classes), OpenCon's prototypes.
  """
  init = _init_fn(model, tx, image_shape, probe_tx, num_classes,
                  momentum_encoder, queue_size, class_queue,
                  pseudo_label_table, memory_bank, prototypes)
  shardings = jax.tree_util.tree_map_with_path(
      functools.partial(sharding.state_sharding, mesh),
      jax.eval_shape(init, rng))
  return jax.jit(init, out_shardings=shardings)(rng)


def abstract_train_state(model, tx: optax.GradientTransformation,
                         image_shape: tuple[int, ...], mesh: jax.sharding.Mesh,
                         probe_tx: optax.GradientTransformation | None = None,
                         num_classes: int = 0, momentum_encoder: bool = False,
                         queue_size: int | None = None,
                         class_queue: tuple[int, int] | None = None,
                         pseudo_label_table: int | None = None,
                         memory_bank: int | None = None,
                         prototypes: int | None = None
                         ) -> TrainState:
  """`ShapeDtypeStruct`s with shardings: the restore target for checkpoints."""
  abstract = jax.eval_shape(
      _init_fn(model, tx, image_shape, probe_tx, num_classes,
               momentum_encoder, queue_size, class_queue,
               pseudo_label_table, memory_bank, prototypes),
      jax.random.key(0))
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=sharding.state_sharding(mesh, path, x)),
      abstract)
