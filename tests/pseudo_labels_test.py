"""IFND's pseudo-labels: acceptance schedule, multi-granularity ids, the
table refreshed from the training split by index, and the train step's
lookup."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import fake_fashion_mnist
from configs import smoke_fashion_mnist
from contrastive import losses
from contrastive import models
from contrastive import optim
from contrastive import pseudo_labels
from contrastive import sharding
from contrastive import state as state_lib
from contrastive import train
from contrastive.data import fashion_mnist
from contrastive.data import input_pipeline


def test_acceptance_fraction_rises_linearly():
  fraction = functools.partial(pseudo_labels.acceptance_fraction,
                               total_steps=100, start=0.2, end=0.8)
  assert fraction(0) == pytest.approx(0.2)
  assert fraction(50) == pytest.approx(0.5)
  assert fraction(100) == fraction(150) == pytest.approx(0.8)
  with pytest.raises(ValueError, match="in \\[0, 1\\]"):
    pseudo_labels.acceptance_fraction(0, 10, -0.1, 1.0)


def _blobs(seed=0):
  """Four tight direction clusters on the sphere, 30 points each, split
  in two along a second direction (a finer level)."""
  rng = np.random.default_rng(seed)
  centres = np.eye(8)[:4] * 10
  points, coarse, fine = [], [], []
  for c, centre in enumerate(centres):
    for half in range(2):
      offset = np.eye(8)[4 + c] * (3 if half else -3)
      points.append(centre + offset + rng.normal(0, 0.1, (15, 8)))
      coarse += [c] * 15
      fine += [2 * c + half] * 15
  x = np.concatenate(points)
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), (
      np.array(coarse), np.array(fine))


def _same_partition(a, b):
  return all(len(set(b[a == value])) == 1 for value in set(a)) and all(
      len(set(a[b == value])) == 1 for value in set(b))


def test_ids_are_shared_only_within_every_level_and_confident_first():
  x, (coarse, fine) = _blobs()
  everyone = pseudo_labels.assign(x, (4,), 1.0, jax.random.key(0))
  assert _same_partition(everyone, coarse)
  both = pseudo_labels.assign(x, (4, 8), 1.0, jax.random.key(0))
  assert _same_partition(both, fine)
  assert set(both) == set(range(8))  # Dense ids.
  half = pseudo_labels.assign(x, (4,), 0.5, jax.random.key(0))
  accepted = half >= 0
  assert accepted.sum() == 60
  np.testing.assert_array_equal(half[accepted], everyone[accepted])
  # The accepted are the 60 closest to their centroids.
  centroids = np.stack([x[everyone == c].mean(0) for c in range(4)])
  centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
  cosine = np.einsum("nd,nd->n", x, centroids[everyone])
  assert cosine[accepted].min() >= cosine[~accepted].max() - 1e-5
  assert (pseudo_labels.assign(x, (4,), 0.0, jax.random.key(0)) == -1).all()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  source = tmp_path_factory.mktemp("fashion_mnist_src")
  fake_fashion_mnist.write(source, 40, 12)
  folder = str(tmp_path_factory.mktemp("tfds"))
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv(fashion_mnist.ENV_VAR, str(source))
    input_pipeline.dataset_info("fashion_mnist_idx", folder)
  return folder


def _config(data_dir):
  config = smoke_fashion_mnist.get_config("ifnd")
  config.model.update(depth=10, width=0.125)
  config.model.head.update(hidden_dims=(32,), out_dim=16)
  config.input.update(data_dir=data_dir, batch_size=8, image_size=12)
  config.linear_eval.batch_size = 8
  config.pseudo_labels.update(cluster_counts=(3,), iterations=5)
  return config


@pytest.mark.slow
def test_refresh_embeds_the_split_by_index_and_the_step_looks_it_up(
    data_dir):
  config = _config(data_dir)
  mesh = sharding.make_mesh()
  model = models.create(config.model)
  schedule = optim.learning_rate_schedule(config.optim, 8, 10, 0)
  tx = optim.create(config.optim, schedule)
  state = state_lib.create_train_state(
      model, tx, jax.random.key(0), (12, 12, 1), mesh,
      **train._momentum_state_spec(config, 10, 40))  # pylint: disable=protected-access
  assert state.momentum["pseudo_labels"].shape == (40,)
  assert (np.asarray(state.momentum["pseudo_labels"]) == -1).all()
  with jax.set_mesh(mesh):
    embed = pseudo_labels.embedding_fn(model, mesh)
    refreshed = pseudo_labels.refresh(config, embed, state, mesh, step=5,
                                      total_steps=10, num_examples=40)
    # Half the images accepted at mid-training (start 0, end 1).
    table = np.asarray(refreshed.momentum["pseudo_labels"])
    assert (table >= 0).sum() == 20
    # The table is indexed like the split: recompute it from embeddings
    # of the split's images in TFDS order, read without any index.
    images = np.stack([
        example["image"] for example in tfds.as_numpy(tfds.builder(
            "fashion_mnist_idx", data_dir=data_dir).as_dataset(
                split="train", shuffle_files=False))])
    # The eval pipeline's resize (TF bicubic, clipped).
    images = tf.clip_by_value(tf.image.resize(
        images.astype(np.float32) / 255.0, [12, 12], method="bicubic"),
                              0.0, 1.0).numpy()
    embeddings = np.asarray(model.apply(
        {"params": state.params, "batch_stats": state.batch_stats}, images,
        train=False)["embedding"])
    expected = pseudo_labels.assign(
        embeddings, (3,), 0.5,
        jax.random.fold_in(jax.random.key(config.seed), 5), iterations=5)
    np.testing.assert_array_equal(table, expected)

    # The step gives the loss the table's ids, or -1 - index if rejected:
    # its loss is the IFND loss of those ids.
    step = jax.jit(functools.partial(
        train.train_step, model=model, tx=tx,
        loss_fn=losses.get_with_metrics("ifnd"), loss_config=config.loss,
        schedule=schedule, momentum_config=config.momentum, total_steps=10))
    batch = next(input_pipeline.pretrain_dataset(
        config.input, seed=0).as_numpy_iterator())
    _, metrics = step(refreshed, sharding.make_global_batch(mesh, batch))
    outputs, _ = model.apply(
        {"params": state.params, "batch_stats": state.batch_stats},
        batch["image"].reshape(16, 12, 12, 1), train=True,
        mutable=["batch_stats"])
  index = batch["index"]
  ids = np.where(table[index] >= 0, table[index], -1 - index)
  expected_loss = losses.get("ifnd")(
      outputs["embedding"].reshape(8, 2, -1), temperature=0.2,
      pseudo_labels=jnp.asarray(ids))
  np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-4)
  # Eliminated columns: both views of every other image with the same
  # accepted id, for each of the 16 anchor views.
  same = (ids[:, None] == ids[None, :]) & ~np.eye(8, dtype=bool)
  assert float(metrics["false_negatives_per_anchor"]) == pytest.approx(
      4 * same.sum() / 16)
