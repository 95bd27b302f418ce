"""The trainer's momentum state: key encoder EMA, queue, sharding, resume."""

import functools

import jax
import numpy as np
import pytest

import fake_fashion_mnist
from configs import smoke_fashion_mnist
from contrastive import config_checks
from contrastive import losses
from contrastive import models
from contrastive import optim
from contrastive import sharding
from contrastive import state as state_lib
from contrastive import train
from contrastive.data import fashion_mnist
from contrastive.data import input_pipeline

IMAGE_SHAPE = (12, 12, 1)
BATCH = 16
BANK_ROWS = 64


def _config(method="moco"):
  config = smoke_fashion_mnist.get_config(method)
  config.model.update(depth=10, width=0.125)
  config.model.head.hidden_dims = (32,)
  config.model.head.out_dim = 16
  config.momentum.update(queue_size=80, base=0.9)
  return config


def _batches(count, seed=0):
  rng = np.random.default_rng(seed)
  return [{"image": rng.uniform(size=(BATCH, 2, *IMAGE_SHAPE)
                                ).astype(np.float32),
           "label": rng.integers(0, 4, size=BATCH).astype(np.int32)}
          for _ in range(count)]


def _setup(config, mesh, total_steps=10, loss_options=None):
  model = models.create(config.model)
  schedule = optim.learning_rate_schedule(config.optim, BATCH, total_steps, 0)
  tx = optim.create(config.optim, schedule)
  needs = losses.extra_inputs(config.loss.name)
  state = state_lib.create_train_state(
      model, tx, jax.random.key(0), IMAGE_SHAPE, mesh,
      momentum_encoder="keys" in needs,
      queue_size=config.momentum.queue_size if "queue" in needs else None,
      class_queue=((config.model.linear_classes,
                    config.momentum.class_queue_size)
                   if "class_queue" in needs else None),
      memory_bank=BANK_ROWS if "memory_bank" in needs else None,
      prototypes=4 if "prototypes" in needs else None)
  step = jax.jit(functools.partial(
      train.train_step, model=model, tx=tx,
      loss_fn=functools.partial(losses.get_with_metrics(config.loss.name),
                                **(loss_options or {})),
      loss_config=config.loss, schedule=schedule,
      momentum_config=config.momentum, total_steps=total_steps))
  return model, state, step


def _run(config, mesh, batches, loss_options=None):
  _, state, step = _setup(config, mesh, loss_options=loss_options)
  metrics = []
  with jax.set_mesh(mesh):
    for batch in batches:
      state, m = step(state, sharding.make_global_batch(mesh, batch))
      metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics


@pytest.mark.slow
def test_step_moves_the_key_encoder_by_the_ema_and_enqueues_its_keys():
  config = _config()
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  model, initial, step = _setup(config, mesh)
  initial = jax.device_get(initial)
  # The key encoder starts as a copy of the online one.
  for a, b in zip(jax.tree.leaves(initial.params),
                  jax.tree.leaves(initial.momentum["params"])):
    np.testing.assert_array_equal(a, b)
  queue = initial.momentum["queue"]
  assert queue.keys.shape == (80, 16) and int(queue.pointer) == 0
  np.testing.assert_allclose(np.linalg.norm(queue.keys, axis=1), 1.0,
                             rtol=1e-5)
  assert (queue.labels == -1).all()

  batch = _batches(1)[0]
  with jax.set_mesh(mesh):
    state, metrics = step(initial, sharding.make_global_batch(mesh, batch))
  state = jax.device_get(state)

  # EMA with the schedule's momentum at step 0 (the base).
  base = config.momentum.base
  assert float(metrics["ema_momentum"]) == pytest.approx(base)
  for target, online, new in zip(jax.tree.leaves(initial.momentum["params"]),
                                 jax.tree.leaves(state.params),
                                 jax.tree.leaves(state.momentum["params"])):
    np.testing.assert_allclose(new, base * target + (1 - base) * online,
                               rtol=1e-6, atol=1e-7)
  assert not np.allclose(state.params["head"]["Dense_0"]["kernel"],
                         initial.params["head"]["Dense_0"]["kernel"])

  # The enqueued rows: the (old) key encoder's embeddings of the batch's
  # two views, batch-major, in train-mode BN, with their labels.
  outputs, _ = model.apply(
      {"params": initial.momentum["params"],
       "batch_stats": initial.momentum["batch_stats"]},
      batch["image"].reshape(BATCH * 2, *IMAGE_SHAPE), train=True,
      mutable=["batch_stats"])
  expected = np.asarray(outputs["embedding"])
  new_queue = state.momentum["queue"]
  np.testing.assert_allclose(new_queue.keys[:2 * BATCH], expected,
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(new_queue.keys[2 * BATCH:],
                                queue.keys[2 * BATCH:])
  np.testing.assert_array_equal(new_queue.labels[:2 * BATCH],
                                np.repeat(batch["label"], 2))
  assert int(new_queue.pointer) == 2 * BATCH


@pytest.mark.slow
def test_eight_devices_equal_one_and_the_queue_wraps_around():
  config = _config()
  batches = _batches(3, seed=1)  # 3 x 32 keys into 80 rows: wraps once.
  state1, metrics1 = _run(config, sharding.make_mesh(devices=jax.devices()[:1]),
                          batches)
  state8, metrics8 = _run(config, sharding.make_mesh(), batches)
  for m1, m8 in zip(metrics1, metrics8):
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  assert int(state8.momentum["queue"].pointer) == (3 * 32) % 80
  np.testing.assert_allclose(state8.momentum["queue"].keys,
                             state1.momentum["queue"].keys, rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_array_equal(state8.momentum["queue"].labels,
                                state1.momentum["queue"].labels)
  for a, b in zip(jax.tree.leaves(state1.momentum),
                  jax.tree.leaves(state8.momentum)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_a_queue_shorter_than_a_step_of_keys_is_refused():
  config = _config()
  config.input.batch_size = 64
  config.momentum.queue_size = 100
  with pytest.raises(ValueError, match="queue_size=100 is shorter than the "
                     "128 keys"):
    # pylint: disable-next=protected-access
    train._momentum_state_spec(config)


@pytest.mark.parametrize("method", [
    "paco",
    *[pytest.param(m, marks=pytest.mark.slow)
      for m in ("gpaco", "mochi", "sce", "relic", "renyicl")]])
@pytest.mark.slow
def test_every_momentum_method_steps_on_eight_devices(method):
  config = _config(method)
  config.momentum.queue_size = 0 if method == "renyicl" else 64
  if method in ("paco", "gpaco"):
    config.model.linear_classes = 4
  if method == "mochi":
    # The trainer's step input starts the mixing at the second step.
    config.loss.kwargs = dict(num_hard=16, num_mix=8, num_query_mix=4,
                              mix_from_step=1)
  state, metrics = _run(config, sharding.make_mesh(), _batches(2, seed=2))
  if method == "mochi":
    assert [m["mochi_mixing"] for m in metrics] == [0.0, 1.0]
  assert all(np.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics)
  assert metrics[0]["loss"] != metrics[1]["loss"]
  # GPaCo has no key encoder: its queue takes the online embeddings.
  assert ("params" in state.momentum) == (method != "gpaco")
  if method != "renyicl":
    queue = state.momentum["queue"]
    assert int(queue.pointer) == (2 * 2 * BATCH) % 64
    assert (queue.labels >= 0).all()  # Both steps' labels, all rows.


def test_class_prior_is_the_training_split_class_frequencies(tmp_path,
                                                             monkeypatch):
  (tmp_path / "src").mkdir()
  source = fake_fashion_mnist.write(tmp_path / "src", 30, 5)
  monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tmp_path / "src"))
  prior = input_pipeline.class_frequencies(
      "fashion_mnist_idx", "train", str(tmp_path / "tfds"))
  labels = source["train"][1]
  np.testing.assert_allclose(prior, np.bincount(labels, minlength=10) / 30)
  # Only losses with a class prior take the option.
  config = _config("paco")
  config.loss.class_prior = True
  config_checks.validate(config)
  config = _config("moco")
  config.loss.class_prior = True
  with pytest.raises(ValueError, match=r"takes no class prior; only "
                     r"\['gpaco', 'paco'\]"):
    config_checks.validate(config)


@pytest.mark.slow
def test_multi_crop_small_views_join_the_loss_but_not_the_key_encoder():
  config = _config("renyicl")
  config.momentum.queue_size = 0
  rng = np.random.default_rng(3)
  batches = _batches(2, seed=3)
  with_small = [dict(b, image_small=rng.uniform(
      size=(BATCH, 2, 8, 8, 1)).astype(np.float32)) for b in batches]
  state1, metrics1 = _run(config, sharding.make_mesh(devices=jax.devices()[:1]),
                          with_small)
  state8, metrics8 = _run(config, sharding.make_mesh(), with_small)
  _, plain = _run(config, sharding.make_mesh(), batches)
  for m1, m8, m0 in zip(metrics1, metrics8, plain):
    # 1.3e-5 apart on the second step on an Intel Xeon (float32 summation
    # order); global-vs-local BatchNorm or a local-batch loss is 1e-2 apart.
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-4)
    assert np.isfinite(m8["loss"]) and m8["loss"] != m0["loss"]
  # The key encoder's BatchNorm scales and biases follow online ones whose
  # gradients are sums with heavy cancellation: float32 summation order (1
  # vs 8 devices, and the CPU's vector width) moves them by up to 2e-4 after
  # two steps on an AMD EPYC, while the losses agree to about 1e-5.
  for a, b in zip(jax.tree.leaves(state1.momentum),
                  jax.tree.leaves(state8.momentum)):
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3)
  # Refused where a second pass of other images cannot join.
  config = _config("unicon")
  _, state, step = _setup(config, sharding.make_mesh(devices=jax.devices()[:1]))
  with pytest.raises(ValueError, match="small_views=0"):
    step(state, with_small[0])


@pytest.mark.slow
def test_with_a_predictor_the_keys_are_the_key_encoders_projections():
  config = _config()
  config.model.predictor = dict(hidden_dims=(24,), out_dim=16)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  model, initial, step = _setup(config, mesh)
  initial = jax.device_get(initial)
  batch = _batches(1, seed=4)[0]
  with jax.set_mesh(mesh):
    state, metrics = step(initial, sharding.make_global_batch(mesh, batch))
  assert np.isfinite(metrics["loss"])
  outputs, _ = model.apply(
      {"params": initial.momentum["params"],
       "batch_stats": initial.momentum["batch_stats"]},
      batch["image"].reshape(BATCH * 2, *IMAGE_SHAPE), train=True,
      mutable=["batch_stats"])
  enqueued = jax.device_get(state.momentum["queue"].keys[:2 * BATCH])
  np.testing.assert_allclose(enqueued, outputs["target_embedding"],
                             rtol=1e-4, atol=1e-5)
  assert not np.allclose(enqueued, outputs["embedding"], atol=1e-2)
  # The predictor trains; the key encoder's copy of it only follows.
  moved = jax.tree.map(lambda a, b: not np.allclose(a, b),
                       initial.params["predictor"], state.params["predictor"])
  assert any(jax.tree.leaves(moved))


def _rescom_config():
  config = _config("rescom")
  config.model.linear_classes = 4
  config.momentum.class_queue_size = 3
  config.loss.kwargs = dict(con_weight=0.5, num_hard_positives=1,
                            num_hard_negatives=4, effective_num_beta=0.999)
  return config


_RESCOM_COUNTS = {"class_counts": np.array([50.0, 20.0, 8.0, 2.0],
                                           np.float32)}


@pytest.mark.slow
def test_rescom_fills_its_class_queues_with_view_0_embeddings():
  config = _rescom_config()
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  model, initial, step = _setup(config, mesh, loss_options=_RESCOM_COUNTS)
  initial = jax.device_get(initial)
  assert initial.momentum["class_queue"].keys.shape == (4, 3, 16)
  assert "params" not in initial.momentum  # No key encoder.
  batch = _batches(1, seed=5)[0]
  with jax.set_mesh(mesh):
    state, metrics = step(initial, sharding.make_global_batch(mesh, batch))
  state = jax.device_get(state)
  assert np.isfinite(metrics["loss"]) and 0 <= metrics["class_acc"] <= 1
  # The online embeddings before the step (train-mode BN over both views).
  outputs, _ = model.apply(
      {"params": initial.params, "batch_stats": initial.batch_stats},
      batch["image"].reshape(BATCH * 2, *IMAGE_SHAPE), train=True,
      mutable=["batch_stats"])
  view0 = np.asarray(outputs["embedding"]).reshape(BATCH, 2, -1)[:, 0]
  queue = state.momentum["class_queue"]
  for label in range(4):
    rows = view0[batch["label"] == label]
    kept = rows[-3:]  # Each class keeps its last 3, in FIFO slots.
    slots = (np.arange(len(rows)) % 3)[-3:]
    np.testing.assert_allclose(queue.keys[label][slots], kept, rtol=1e-4,
                               atol=1e-5)
    assert int(queue.pointers[label]) == len(rows) % 3


@pytest.mark.slow
def test_rescom_on_eight_devices_equals_one():
  config = _rescom_config()
  batches = _batches(2, seed=6)
  one = _run(config, sharding.make_mesh(devices=jax.devices()[:1]), batches,
             _RESCOM_COUNTS)
  eight = _run(config, sharding.make_mesh(), batches, _RESCOM_COUNTS)
  for m1, m8 in zip(one[1], eight[1]):
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(eight[0].momentum["class_queue"].keys,
                             one[0].momentum["class_queue"].keys, rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_array_equal(eight[0].momentum["class_queue"].pointers,
                                one[0].momentum["class_queue"].pointers)


@pytest.mark.slow
def test_interclr_bank_follows_the_keys_and_shards_its_rows():
  from contrastive import pseudo_labels  # pylint: disable=g-import-not-at-top
  config = _config("interclr")
  config.momentum.update(bank_clusters=4, bank_kmeans_iterations=3)
  config.loss.kwargs = dict(num_negatives=4, semi_hard_pool=16)
  batches = _batches(2, seed=7)
  rng = np.random.default_rng(7)
  for batch in batches:
    batch["index"] = rng.permutation(BANK_ROWS)[:BATCH].astype(np.int32)

  def run(mesh):
    model, state, step = _setup(config, mesh)
    initial = jax.device_get(state)
    metrics = []
    with jax.set_mesh(mesh):
      state, m = step(state, sharding.make_global_batch(mesh, batches[0]))
      metrics.append(jax.device_get(m))
      # Cluster the bank between the steps, as the training loop does.
      state = pseudo_labels.cluster_bank(config, state, step=1)
      state, m = step(state, sharding.make_global_batch(mesh, batches[1]))
      metrics.append(jax.device_get(m))
    return model, initial, state, metrics

  model, initial, one_state, one = run(
      sharding.make_mesh(devices=jax.devices()[:1]))
  _, _, eight_state, eight = run(sharding.make_mesh())
  assert eight_state.momentum["memory_bank"].sharding.spec == (
      jax.sharding.PartitionSpec("data"))
  for m1, m8 in zip(one, eight):
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  # No clusters at the first step: only the intra (MoCo) part; then some
  # queries meet their cluster.
  assert one[0]["inter_valid_fraction"] == 0.0
  assert one[1]["inter_valid_fraction"] > 0.0
  bank1 = np.asarray(jax.device_get(one_state.momentum["memory_bank"]))
  bank8 = np.asarray(jax.device_get(eight_state.momentum["memory_bank"]))
  np.testing.assert_allclose(bank8, bank1, rtol=1e-4, atol=1e-5)
  # After step 1 the batch's rows held the (old) key encoder's view-0
  # keys; rows never in a batch keep their random start.
  seen = set(batches[0]["index"]) | set(batches[1]["index"])
  untouched = sorted(set(range(BANK_ROWS)) - seen)
  np.testing.assert_array_equal(
      bank1[untouched], np.asarray(initial.momentum["memory_bank"])[untouched])
  only_first = sorted(set(batches[0]["index"]) - set(batches[1]["index"]))
  outputs, _ = model.apply(
      {"params": initial.momentum["params"],
       "batch_stats": initial.momentum["batch_stats"]},
      batches[0]["image"].reshape(BATCH * 2, *IMAGE_SHAPE), train=True,
      mutable=["batch_stats"])
  keys = np.asarray(outputs["embedding"]).reshape(BATCH, 2, -1)[:, 0]
  where = {row: i for i, row in enumerate(batches[0]["index"])}
  np.testing.assert_allclose(bank1[only_first],
                             keys[[where[row] for row in only_first]],
                             rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_opencon_moves_its_prototypes_and_eight_devices_equal_one():
  from contrastive.losses import opencon  # pylint: disable=g-import-not-at-top
  config = _config("opencon")
  config.loss.kwargs = dict(num_seen=2, labeled_ratio=0.5)
  batches = _batches(2, seed=8)
  rng = np.random.default_rng(8)
  for batch in batches:
    # Classes 0-1 seen, about half of them labelled; 2-3 novel.
    labelled = (batch["label"] < 2) & (rng.uniform(size=BATCH) < 0.5)
    batch["open_label"] = np.where(labelled, batch["label"], -1).astype(
        np.int32)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  model, initial, step = _setup(config, mesh)
  initial = jax.device_get(initial)
  assert initial.momentum["prototypes"].shape == (4, 16)
  with jax.set_mesh(mesh):
    state, metrics = step(initial, sharding.make_global_batch(mesh,
                                                              batches[0]))
  outputs, _ = model.apply(
      {"params": initial.params, "batch_stats": initial.batch_stats},
      batches[0]["image"].reshape(BATCH * 2, *IMAGE_SHAPE), train=True,
      mutable=["batch_stats"])
  z = np.asarray(outputs["embedding"]).reshape(BATCH, 2, -1)
  expected = opencon.update_prototypes(
      initial.momentum["prototypes"], z, batches[0]["open_label"],
      num_seen=2, momentum=config.momentum.prototype_momentum)
  np.testing.assert_allclose(jax.device_get(state.momentum["prototypes"]),
                             expected, rtol=1e-4, atol=1e-5)
  assert np.isfinite(metrics["loss"])
  one = _run(config, mesh, batches)
  eight = _run(config, sharding.make_mesh(), batches)
  for m1, m8 in zip(one[1], eight[1]):
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(eight[0].momentum["prototypes"],
                             one[0].momentum["prototypes"], rtol=1e-4,
                             atol=1e-5)
