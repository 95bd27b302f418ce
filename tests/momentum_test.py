"""EMA, momentum schedule and the key queue against numpy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive import momentum
from contrastive import sharding


def test_ema_update_matches_numpy_and_keeps_dtypes():
  rng = np.random.default_rng(0)
  target = {"w": rng.normal(size=(3, 4)).astype(np.float32),
            "b": {"x": rng.normal(size=(5,)).astype(jnp.bfloat16)}}
  online = {"w": rng.normal(size=(3, 4)).astype(np.float32),
            "b": {"x": rng.normal(size=(5,)).astype(jnp.bfloat16)}}
  new = jax.jit(momentum.ema_update)(target, online, 0.9)
  expected_w = (0.9 * target["w"].astype(np.float64)
                + 0.1 * online["w"].astype(np.float64))
  np.testing.assert_allclose(new["w"], expected_w, rtol=1e-6, atol=1e-7)
  assert new["w"].dtype == jnp.float32
  assert new["b"]["x"].dtype == jnp.bfloat16
  expected_x = (0.9 * np.asarray(target["b"]["x"], np.float64)
                + 0.1 * np.asarray(online["b"]["x"], np.float64))
  np.testing.assert_allclose(np.asarray(new["b"]["x"], np.float64),
                             expected_x, rtol=1e-2, atol=1e-2)
  # Momentum 1 keeps the target, 0 copies the online parameters.
  np.testing.assert_array_equal(
      momentum.ema_update(target, online, 1.0)["w"], target["w"])
  np.testing.assert_array_equal(
      momentum.ema_update(target, online, 0.0)["w"], online["w"])


def test_momentum_schedule():
  cosine = lambda step: float(momentum.momentum_schedule(step, 100, 0.99))
  np.testing.assert_allclose(cosine(0), 0.99, rtol=1e-7)
  np.testing.assert_allclose(cosine(100), 1.0, rtol=1e-7)
  np.testing.assert_allclose(cosine(50), 0.995, rtol=1e-7)
  np.testing.assert_allclose(
      cosine(30), 1 - 0.01 * (math.cos(math.pi * 0.3) + 1) / 2, rtol=1e-7)
  assert cosine(200) == pytest.approx(1.0)
  values = [cosine(s) for s in range(0, 101, 10)]
  assert values == sorted(values)
  for step in (0, 37, 100):
    assert float(momentum.momentum_schedule(
        step, 100, 0.999, schedule="constant")) == pytest.approx(0.999)
  # Traced steps work (the schedule runs inside the train step).
  np.testing.assert_allclose(
      jax.jit(lambda s: momentum.momentum_schedule(s, 100, 0.99))(
          jnp.int32(50)), 0.995, rtol=1e-7)
  with pytest.raises(ValueError, match="schedule"):
    momentum.momentum_schedule(0, 100, 0.99, schedule="linear")
  with pytest.raises(ValueError, match="total_steps"):
    momentum.momentum_schedule(0, 0, 0.99)


def test_init_queue():
  queue = momentum.init_queue(16, 8, jax.random.key(0))
  assert queue.keys.shape == (16, 8) and queue.keys.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(queue.keys, axis=1), 1.0,
                             rtol=1e-6)
  np.testing.assert_array_equal(queue.labels, -np.ones(16))
  assert queue.labels.dtype == jnp.int32 and int(queue.pointer) == 0
  assert queue.size == 16
  assert momentum.init_queue(0, 8, jax.random.key(0)).keys.shape == (0, 8)


class _NumpyQueue:
  """The FIFO written out position by position."""

  def __init__(self, keys, labels):
    self.keys, self.labels, self.pointer = keys.copy(), labels.copy(), 0

  def enqueue(self, new_keys, new_labels):
    for key, label in zip(new_keys, new_labels):
      self.keys[self.pointer] = key
      self.labels[self.pointer] = label
      self.pointer = (self.pointer + 1) % len(self.keys)


def test_enqueue_matches_numpy_with_wrap_around():
  rng = np.random.default_rng(1)
  queue = momentum.init_queue(10, 3, jax.random.key(0))
  reference = _NumpyQueue(np.asarray(queue.keys), np.asarray(queue.labels))
  step = jax.jit(momentum.enqueue)
  # 4 + 4 + 4 wraps at 10 in the third batch; 7 then wraps again.
  for n in (4, 4, 4, 7, 10):
    keys = rng.normal(size=(n, 3)).astype(np.float32)
    labels = rng.integers(0, 5, size=n).astype(np.int32)
    queue = step(queue, keys, labels)
    reference.enqueue(keys, labels)
    np.testing.assert_array_equal(queue.keys, reference.keys)
    np.testing.assert_array_equal(queue.labels, reference.labels)
    assert int(queue.pointer) == reference.pointer
  unlabelled = momentum.enqueue(queue, np.ones((2, 3), np.float32))
  written = (reference.pointer + np.arange(2)) % 10
  np.testing.assert_array_equal(unlabelled.labels[written], [-1, -1])
  np.testing.assert_array_equal(unlabelled.keys[written], np.ones((2, 3)))


def test_enqueue_errors():
  queue = momentum.init_queue(4, 3, jax.random.key(0))
  with pytest.raises(ValueError, match="queue of 4 rows"):
    momentum.enqueue(queue, np.ones((5, 3), np.float32))
  with pytest.raises(ValueError, match="float\\[n, 3\\]"):
    momentum.enqueue(queue, np.ones((2, 4), np.float32))
  with pytest.raises(ValueError, match="new_labels"):
    momentum.enqueue(queue, np.ones((2, 3), np.float32),
                     np.zeros((3,), np.int32))
  # No queue (size 0): enqueueing is a no-op, not an error.
  empty = momentum.init_queue(0, 3, jax.random.key(0))
  assert momentum.enqueue(empty, np.ones((5, 3), np.float32)).keys.shape == (
      0, 3)


def test_sharded_enqueue_equals_one_device():
  """A global batch sharded over 8 devices lands in batch-major order."""
  rng = np.random.default_rng(2)
  keys = [rng.normal(size=(16, 4)).astype(np.float32) for _ in range(3)]
  labels = [rng.integers(0, 9, size=16).astype(np.int32) for _ in range(3)]

  def run(devices):
    mesh = sharding.make_mesh(devices=jax.devices()[:devices])
    with jax.set_mesh(mesh):
      queue = jax.device_put(momentum.init_queue(40, 4, jax.random.key(3)),
                             sharding.replicated(mesh))
      step = jax.jit(momentum.enqueue)
      put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
      for k, y in zip(keys, labels):  # 16 + 16 + 16 wraps at 40.
        queue = step(queue, put(k), put(y))
      return jax.device_get(queue)

  assert len(jax.devices()) >= 8
  one, eight = run(1), run(8)
  np.testing.assert_array_equal(eight.keys, one.keys)
  np.testing.assert_array_equal(eight.labels, one.labels)
  assert int(eight.pointer) == int(one.pointer) == 48 % 40
  reference = _NumpyQueue(np.asarray(momentum.init_queue(
      40, 4, jax.random.key(3)).keys), -np.ones(40, np.int32))
  for k, y in zip(keys, labels):
    reference.enqueue(k, y)
  np.testing.assert_array_equal(one.keys, reference.keys)
  np.testing.assert_array_equal(one.labels, reference.labels)


def test_enqueue_by_class_matches_pushing_one_key_at_a_time():
  rng = np.random.default_rng(3)
  num_classes, per_class, dim = 4, 3, 2
  queue = momentum.init_class_queue(num_classes, per_class, dim,
                                    jax.random.key(1))
  assert queue.keys.shape == (4, 3, 2)
  np.testing.assert_allclose(np.linalg.norm(queue.keys, axis=-1), 1.0,
                             rtol=1e-6)
  keys, pointers = np.asarray(queue.keys).copy(), np.zeros(4, int)
  step = jax.jit(momentum.enqueue_by_class)
  # Class 0 gets 7 keys in the first batch (> Q: only its last 3 survive),
  # class 3 none in the second; -1 rows are skipped.
  batches = [np.array([0, 0, 1, 0, 0, 2, 0, 0, 3, 0, -1]),
             np.array([1, 1, 1, 1, 2, 0, -1, 2]),
             rng.integers(0, 4, 16)]
  for labels in batches:
    new_keys = rng.normal(size=(len(labels), dim)).astype(np.float32)
    queue = step(queue, new_keys, labels.astype(np.int32))
    for key, label in zip(new_keys, labels):
      if label < 0:
        continue
      keys[label, pointers[label]] = key
      pointers[label] = (pointers[label] + 1) % per_class
    np.testing.assert_array_equal(queue.keys, keys)
    np.testing.assert_array_equal(queue.pointers, pointers)
  with pytest.raises(ValueError, match="new_labels"):
    momentum.enqueue_by_class(queue, np.ones((2, 2), np.float32),
                              np.zeros((3,), np.int32))
  with pytest.raises(ValueError, match="per_class >= 1"):
    momentum.init_class_queue(4, 0, 2, jax.random.key(0))


def test_sharded_enqueue_by_class_equals_one_device():
  rng = np.random.default_rng(4)
  keys = rng.normal(size=(16, 3)).astype(np.float32)
  labels = rng.integers(0, 3, size=16).astype(np.int32)

  def run(devices):
    mesh = sharding.make_mesh(devices=jax.devices()[:devices])
    with jax.set_mesh(mesh):
      queue = jax.device_put(
          momentum.init_class_queue(3, 4, 3, jax.random.key(0)),
          sharding.replicated(mesh))
      put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
      queue = jax.jit(momentum.enqueue_by_class)(queue, put(keys),
                                                 put(labels))
    return jax.device_get(queue)

  one, eight = run(1), run(8)
  np.testing.assert_array_equal(one.keys, eight.keys)
  np.testing.assert_array_equal(one.pointers, eight.pointers)


def test_update_bank_matches_numpy_and_sharded_equals_one_device():
  rng = np.random.default_rng(5)
  bank = rng.normal(size=(16, 3))
  bank = (bank / np.linalg.norm(bank, axis=1, keepdims=True)).astype(
      np.float32)
  rows = np.array([3, 0, 15, 7, 9, 2, 12, 5], np.int32)
  features = rng.normal(size=(8, 3))
  features = (features / np.linalg.norm(features, axis=1, keepdims=True)
              ).astype(np.float32)
  for rate in (1.0, 0.5):
    expected = bank.astype(np.float64).copy()
    blend = (1 - rate) * expected[rows] + rate * features
    expected[rows] = blend / np.linalg.norm(blend, axis=1, keepdims=True)
    results = []
    for devices in (1, 8):
      mesh = sharding.make_mesh(devices=jax.devices()[:devices])
      with jax.set_mesh(mesh):
        sharded = jax.device_put(bank, sharding.batch_sharding(mesh))
        put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
        new = jax.jit(momentum.update_bank, static_argnums=3)(
            sharded, put(rows), put(features), rate)
        assert new.sharding.spec == sharding.batch_sharding(mesh).spec
        results.append(np.asarray(jax.device_get(new)))
    np.testing.assert_allclose(results[0], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(results[0], results[1])
  with pytest.raises(ValueError, match="update rate"):
    momentum.update_bank(bank, rows, features, 0.0)


def test_per_image_state_is_row_sharded():
  mesh = sharding.make_mesh()
  leaf = jax.ShapeDtypeStruct((64, 4), jnp.float32)
  path = (jax.tree_util.GetAttrKey("momentum"),
          jax.tree_util.DictKey("memory_bank"))
  assert sharding.state_sharding(mesh, path, leaf) == sharding.batch_sharding(mesh)
  # Rows that do not divide evenly, and every other entry, are replicated.
  odd = jax.ShapeDtypeStruct((63, 4), jnp.float32)
  assert sharding.state_sharding(mesh, path, odd) == sharding.replicated(mesh)
  queue = (jax.tree_util.GetAttrKey("momentum"),
           jax.tree_util.DictKey("queue"))
  assert sharding.state_sharding(mesh, queue, leaf) == sharding.replicated(mesh)
