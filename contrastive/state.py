"""The explicit training state and its sharded creation."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from contrastive import sharding


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


def _init_fn(model, tx: optax.GradientTransformation,
             image_shape: tuple[int, ...]):
  def init(rng):
    variables = model.init(rng, jnp.zeros((2, *image_shape), jnp.float32),
                           train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params))
  return init


def create_train_state(model, tx: optax.GradientTransformation, rng: jax.Array,
                       image_shape: tuple[int, ...],
                       mesh: jax.sharding.Mesh) -> TrainState:
  """Initialises the state directly into its (replicated) sharding.

  `image_shape` is `(H, W, C)`. The init is jitted with output shardings so
  nothing is materialised off its final devices.
  """
  init = _init_fn(model, tx, image_shape)
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh),
                           jax.eval_shape(init, rng))
  return jax.jit(init, out_shardings=shardings)(rng)


def abstract_train_state(model, tx: optax.GradientTransformation,
                         image_shape: tuple[int, ...],
                         mesh: jax.sharding.Mesh) -> TrainState:
  """`ShapeDtypeStruct`s with shardings: the restore target for checkpoints."""
  abstract = jax.eval_shape(_init_fn(model, tx, image_shape),
                            jax.random.key(0))
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=sharding.replicated(mesh)),
      abstract)
