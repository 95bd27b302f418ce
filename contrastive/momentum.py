"""The pure pieces of momentum-encoder methods: EMA, its schedule, a queue.

MoCo v2 keeps a momentum ("key") encoder whose parameters follow the online
("query") encoder by an exponential moving average, and a FIFO queue of the
keys of past batches that serve as negatives (He et al. 2020, arXiv
1911.05722; Chen et al. 2020, arXiv 2003.04297). BYOL and MoCo v3 raise the
momentum from its base value to 1 along a cosine.

  target = momentum.ema_update(target, online, momentum.momentum_schedule(
      step, total_steps, base=0.99, schedule="cosine"))
  queue = momentum.init_queue(65536, 128, jax.random.key(0))
  queue = momentum.enqueue(queue, keys, labels)  # keys: f32[n, dim]

Everything here is a pure function of arrays, so it runs inside the jitted
train step. The queue is replicated state: under `jax.jit` with `new_keys` a
global array sharded over the batch, `enqueue` writes the rows in global
(batch-major) order, so the queue after a step on 8 devices is the one after
the same global batch on 1 device (XLA inserts the gather).
"""

import math

import flax
import jax
import jax.numpy as jnp

SCHEDULES = ("constant", "cosine")


def ema_update(target_params, online_params, momentum):
  """`momentum * target + (1 - momentum) * online`, leaf by leaf.

  Args:
    target_params: pytree of the momentum (target) encoder's parameters.
    online_params: pytree of the online encoder's parameters, same structure.
    momentum: float or float scalar array in [0, 1]; 1 keeps the target.

  Returns:
    The updated target pytree, each leaf in its own dtype. The average is
    computed in float32 so that bf16 parameters do not lose the small
    `(1 - momentum)` steps to rounding more than their storage forces.
  """
  momentum = jnp.asarray(momentum, jnp.float32)

  def update(target, online):
    mixed = (momentum * jnp.asarray(target, jnp.float32)
             + (1.0 - momentum) * jnp.asarray(online, jnp.float32))
    return mixed.astype(jnp.asarray(target).dtype)

  return jax.tree.map(update, target_params, online_params)


def momentum_schedule(step, total_steps: int, base: float,
                      schedule: str = "cosine") -> jax.Array:
  """The EMA momentum at `step`.

  Args:
    step: int or int scalar array, the current step (0-based).
    total_steps: steps of the whole run (> 0).
    base: momentum at step 0 (MoCo v2: 0.999, BYOL: 0.996, MoCo v3 and SCE:
      0.99).
    schedule: "constant" (MoCo v2: `base` throughout) or "cosine" (BYOL /
      MoCo v3: `1 - (1 - base) * (cos(pi * step / total_steps) + 1) / 2`,
      from `base` at step 0 to 1 at `total_steps`).

  Returns:
    float32 scalar.

  Raises:
    ValueError: on an unknown schedule, total_steps <= 0 or base outside
      [0, 1].
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"Unknown momentum schedule {schedule!r}; use one of "
                     f"{SCHEDULES}.")
  if total_steps <= 0:
    raise ValueError(f"total_steps must be > 0, got {total_steps}.")
  if not 0.0 <= base <= 1.0:
    raise ValueError(f"The base momentum must be in [0, 1], got {base}.")
  base = jnp.float32(base)
  if schedule == "constant":
    return base
  # Clipped so that steps past the end (e.g. a resumed, extended run) keep 1.
  progress = jnp.clip(jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)
  return 1.0 - (1.0 - base) * (jnp.cos(math.pi * progress) + 1.0) / 2.0


@flax.struct.dataclass
class Queue:
  """A FIFO queue of keys (MoCo's dictionary).

  Attributes:
    keys: float32[K, dim], L2-normalised keys.
    labels: int32[K] their class ids; -1 for empty or unknown (the random
      initial entries, or keys of unlabelled data).
    pointer: int32[] the row the next enqueue writes first.
  """
  keys: jax.Array
  labels: jax.Array
  pointer: jax.Array

  @property
  def size(self) -> int:
    return self.keys.shape[0]


def init_queue(size: int, dim: int, key: jax.Array) -> Queue:
  """A queue of `size` random unit vectors with unknown labels (-1).

  MoCo fills its queue with random L2-normalised vectors rather than zeros,
  so that the first steps see negatives spread over the sphere.

  Args:
    size: K >= 0 rows (0: no queue; the losses then use the batch only).
    dim: embedding dimension.
    key: PRNG key for the initial vectors.

  Returns:
    The queue, pointer at 0.
  """
  if size < 0 or dim <= 0:
    raise ValueError(f"Queue size must be >= 0 and dim > 0, got size={size}, "
                     f"dim={dim}.")
  keys = jax.random.normal(key, (size, dim), jnp.float32)
  keys = keys / jnp.maximum(jnp.linalg.norm(keys, axis=1, keepdims=True),
                            1e-12)
  return Queue(keys=keys, labels=jnp.full((size,), -1, jnp.int32),
               pointer=jnp.zeros((), jnp.int32))


def enqueue(queue: Queue, new_keys: jax.Array,
            new_labels: jax.Array | None = None) -> Queue:
  """Writes `n` new rows over the oldest ones, wrapping around the end.

  Row `t` of `new_keys` goes to position `(pointer + t) % K`; the pointer
  then advances by `n` (mod K). Unlike MoCo's code, K need not be a multiple
  of `n`. A queue of size 0 (no queue, MoCo v3 style) stays empty.

  Args:
    queue: the current queue.
    new_keys: float[n, dim], the global batch's keys (stop-gradient is
      applied; any float dtype, stored as float32).
    new_labels: int[n] or None (stored as -1, unknown).

  Returns:
    The updated queue.

  Raises:
    ValueError: if 0 < K < n (the batch would overwrite its own rows), or
      on a dimension mismatch.
  """
  size, dim = queue.keys.shape
  if new_keys.ndim != 2 or new_keys.shape[1] != dim:
    raise ValueError(f"new_keys must be float[n, {dim}] to match the queue, "
                     f"got shape {new_keys.shape}; flatten the views first.")
  n = new_keys.shape[0]
  if size == 0:
    return queue
  if n > size:
    raise ValueError(
        f"Cannot enqueue {n} keys into a queue of {size} rows; make the queue "
        "at least as long as the keys enqueued per step (global batch x "
        "enqueued views).")
  if new_labels is None:
    new_labels = jnp.full((n,), -1, jnp.int32)
  elif new_labels.shape != (n,):
    raise ValueError(f"new_labels must have shape ({n},) like new_keys' rows, "
                     f"got {new_labels.shape}.")
  if n == 0:
    return queue
  positions = (queue.pointer + jnp.arange(n, dtype=jnp.int32)) % size
  keys = queue.keys.at[positions].set(
      jax.lax.stop_gradient(new_keys).astype(jnp.float32),
      unique_indices=True)
  labels = queue.labels.at[positions].set(new_labels.astype(jnp.int32),
                                          unique_indices=True)
  pointer = ((queue.pointer + n) % size).astype(jnp.int32)
  return queue.replace(keys=keys, labels=labels, pointer=pointer)


@flax.struct.dataclass
class ClassQueue:
  """Q keys per class, each class its own FIFO (ResCom's balanced queue).

  Attributes:
    keys: float32[C, Q, dim] L2-normalised keys; row c holds class c's.
    pointers: int32[C] the slot each class's next key writes.
  """
  keys: jax.Array
  pointers: jax.Array


def init_class_queue(num_classes: int, per_class: int, dim: int,
                     key: jax.Array) -> ClassQueue:
  """A class queue of random unit vectors (as ResCom starts its own)."""
  if num_classes < 1 or per_class < 1 or dim <= 0:
    raise ValueError(
        f"A class queue needs num_classes >= 1, per_class >= 1 and dim > 0, "
        f"got {num_classes}, {per_class}, {dim}.")
  keys = jax.random.normal(key, (num_classes, per_class, dim), jnp.float32)
  keys = keys / jnp.maximum(jnp.linalg.norm(keys, axis=-1, keepdims=True),
                            1e-12)
  return ClassQueue(keys=keys,
                    pointers=jnp.zeros((num_classes,), jnp.int32))


def enqueue_by_class(queue: ClassQueue, new_keys: jax.Array,
                     new_labels: jax.Array) -> ClassQueue:
  """Writes each key into its class's FIFO, in row order.

  The result is that of pushing the rows one at a time: row t of class c
  goes to slot `(pointer_c + r) % Q`, r the number of earlier rows of class
  c, and the pointer moves by the class's count. When a class has more than
  Q rows, only its last Q survive, as they would one at a time; written in
  one scatter, the surviving slots are distinct. Rows whose label is not a
  class (e.g. -1) are skipped.

  Args:
    queue: the current queue.
    new_keys: float[n, dim] keys (stop-gradient is applied).
    new_labels: int[n] their classes.

  Returns:
    The updated queue.
  """
  num_classes, per_class, dim = queue.keys.shape
  if new_keys.ndim != 2 or new_keys.shape[1] != dim:
    raise ValueError(f"new_keys must be float[n, {dim}] to match the class "
                     f"queue, got shape {new_keys.shape}.")
  if new_labels.shape != new_keys.shape[:1]:
    raise ValueError(f"new_labels must have shape ({new_keys.shape[0]},), "
                     f"got {new_labels.shape}.")
  labels = new_labels.astype(jnp.int32)
  one_hot = (labels[:, None] == jnp.arange(num_classes)[None, :]).astype(
      jnp.int32)
  is_class = one_hot.sum(axis=1) > 0
  safe_labels = jnp.where(is_class, labels, 0)
  # Each row's rank among its class's rows, and each class's count.
  rank = jnp.take_along_axis(jnp.cumsum(one_hot, axis=0) - 1,
                             safe_labels[:, None], axis=1)[:, 0]
  counts = one_hot.sum(axis=0)
  survives = is_class & (rank >= counts[safe_labels] - per_class)
  slots = (queue.pointers[safe_labels] + rank) % per_class
  # Rows that do not survive go past the end and are dropped.
  positions = jnp.where(survives, safe_labels * per_class + slots,
                        num_classes * per_class)
  keys = queue.keys.reshape(num_classes * per_class, dim).at[positions].set(
      jax.lax.stop_gradient(new_keys).astype(jnp.float32), mode="drop")
  pointers = ((queue.pointers + counts) % per_class).astype(jnp.int32)
  return queue.replace(keys=keys.reshape(num_classes, per_class, dim),
                       pointers=pointers)


def update_bank(bank: jax.Array, rows: jax.Array, features: jax.Array,
                rate: float) -> jax.Array:
  """Memory-bank rows `rows` <- normalise((1 - rate) old + rate features).

  Args:
    bank: float32[N, dim], L2-normalised rows (may be row-sharded).
    rows: int[n] distinct rows to update (the batch's images).
    features: float[n, dim] their new L2-normalised features (stop-gradient
      is applied).
    rate: weight of the new feature; 1 replaces the row (InterCLR's bank,
      whose official "momentum" 1 keeps only the newest feature).

  Returns:
    The updated bank.
  """
  if not 0.0 < rate <= 1.0:
    raise ValueError(f"The bank update rate must be in (0, 1], got {rate}.")
  new = jax.lax.stop_gradient(features).astype(jnp.float32)
  if rate < 1.0:
    new = (1.0 - rate) * bank[rows] + rate * new
  new = new / jnp.maximum(jnp.linalg.norm(new, axis=-1, keepdims=True),
                          1e-12)
  return bank.at[rows].set(new, unique_indices=True)
