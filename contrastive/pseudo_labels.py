"""Pseudo-labels of the training images from clustering their embeddings:
IFND's false-negative table and InterCLR's memory-bank clusters.

IFND (Chen et al., "Incremental False Negative Detection for Contrastive
Learning", ICLR 2022) periodically embeds the whole training set, clusters
it at several granularities, and treats images that share a cluster as each
other's false negatives, accepting only the most confident fraction of the
images, a fraction that grows during training. Here:

  * every `refresh_every_epochs`, the training split is embedded without
    augmentation (BN in inference mode) and L2-normalised;
  * spherical k-means (`contrastive/kmeans.py`) runs for each k in
    `cluster_counts`; an image's pseudo-label is its tuple of cluster ids,
    so two images share one only if they share a cluster at every
    granularity (the coarse levels veto merges the fine level would make;
    IFND's exact hierarchical rule is unverified, this is our choice);
  * an image's confidence is its cosine to its centroid at the finest
    granularity; the `fraction(step)` most confident images keep their
    pseudo-label, the others get -1 (no false negatives), with `fraction`
    rising linearly from `start_fraction` to `end_fraction` over training.

The table (int32[num_train], indexed by the position of the image in its
split, `input.example_index`) lives in the train state
(`state.momentum["pseudo_labels"]`), so it is checkpointed and a resumed run
continues with the same one.
"""

from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from contrastive import kmeans
from contrastive import sharding
from contrastive.data import input_pipeline


def acceptance_fraction(step: int, total_steps: int, start: float,
                        end: float) -> float:
  """The fraction of images whose pseudo-label is accepted at `step`."""
  if not 0.0 <= start <= 1.0 or not 0.0 <= end <= 1.0:
    raise ValueError(f"Acceptance fractions must be in [0, 1], got start="
                     f"{start}, end={end}.")
  progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
  return start + (end - start) * progress


def assign(embeddings: np.ndarray, cluster_counts: tuple[int, ...],
           fraction: float, key: jax.Array, *,
           iterations: int = 20) -> np.ndarray:
  """Pseudo-labels of `embeddings` [n, dim]: int32[n], -1 where rejected.

  Ids are dense (0 .. number of distinct cluster tuples - 1) among the
  accepted images.
  """
  if not cluster_counts:
    raise ValueError("cluster_counts must name at least one k.")
  x = jnp.asarray(embeddings, jnp.float32)
  assignments, distances = [], None
  for level, k in enumerate(sorted(cluster_counts)):
    result = kmeans.kmeans(x, k, jax.random.fold_in(key, level),
                           iterations=iterations, metric="cosine")
    assignments.append(np.asarray(result.labels))
    # The finest level (largest k) sets the confidence.
    distances = np.asarray(kmeans.assign(x, result.centroids,
                                         metric="cosine")[1])
  _, ids = np.unique(np.stack(assignments, axis=1), axis=0,
                     return_inverse=True)
  ids = ids.reshape(-1).astype(np.int32)
  accepted = int(round(fraction * len(ids)))
  labels = np.full(len(ids), -1, np.int32)
  if accepted:
    # Stable, so equal distances keep index order (deterministic).
    confident = np.argsort(distances, kind="stable")[:accepted]
    labels[confident] = ids[confident]
  return labels


def embed_split(config: ml_collections.ConfigDict, embed_fn, mesh,
                num_examples: int) -> np.ndarray:
  """Embeddings [num_examples, dim] of `input.train_split`, by index."""
  batches = input_pipeline.eval_dataset(
      config.input.dataset, config.input.train_split,
      global_batch_size=config.linear_eval.batch_size,
      image_size=config.input.image_size, data_dir=config.input.data_dir,
      with_index=True)
  table = None
  for local in batches.as_numpy_iterator():
    batch = sharding.make_global_batch(mesh, local)
    out = embed_fn(batch["image"])
    out, index, mask = multihost_utils.process_allgather(
        (out, batch[input_pipeline.INDEX_KEY], batch["mask"]), tiled=True)
    out, index, mask = np.asarray(out), np.asarray(index), np.asarray(mask)
    if table is None:
      table = np.zeros((num_examples, out.shape[-1]), np.float32)
    table[index[mask]] = out[mask]
  return table


def embedding_fn(model, mesh):
  """`(variables, images) -> embeddings` (BN in inference), jitted once:
  build it once per run and reuse it at every refresh."""
  return jax.jit(
      lambda variables, x: model.apply(variables, x, train=False)[
          "embedding"],
      out_shardings=sharding.batch_sharding(mesh))


def refresh(config: ml_collections.ConfigDict, embed, state, mesh, *,
            step: int, total_steps: int, num_examples: int) -> Any:
  """`state` with its pseudo-label table recomputed from its encoder;
  `embed` from `embedding_fn`."""
  options = config.pseudo_labels
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  embeddings = embed_split(config, lambda x: embed(variables, x), mesh,
                           num_examples)
  fraction = acceptance_fraction(step, total_steps, options.start_fraction,
                                 options.end_fraction)
  labels = assign(embeddings, tuple(options.cluster_counts), fraction,
                  jax.random.fold_in(jax.random.key(config.seed), step),
                  iterations=options.iterations)
  accepted = labels >= 0
  logging.info(
      "Pseudo-labels at step %d: %d of %d images accepted (fraction %.3f), "
      "%d distinct labels.", step, accepted.sum(), len(labels), fraction,
      len(np.unique(labels[accepted])))
  momentum = dict(state.momentum)
  momentum["pseudo_labels"] = jax.device_put(
      jnp.asarray(labels), sharding.replicated(mesh))
  return state.replace(momentum=momentum)


def cluster_bank(config: ml_collections.ConfigDict, state, *,
                 step: int) -> Any:
  """`state` with InterCLR's bank clusters recomputed by k-means of the bank.

  Spherical k-means of `config.momentum.bank_clusters` clusters, seeded by
  random distinct rows (k-means++ would take k passes over the bank) and
  run for `bank_kmeans_iterations`; the rows stay sharded as they are.
  """
  bank = state.momentum["memory_bank"]
  k = config.momentum.bank_clusters
  if not 1 <= k <= bank.shape[0]:
    raise ValueError(f"config.momentum.bank_clusters={k} must be between 1 "
                     f"and the {bank.shape[0]} training images.")
  result = kmeans.kmeans(
      bank, k, jax.random.fold_in(jax.random.key(config.seed), step),
      iterations=config.momentum.bank_kmeans_iterations, metric="cosine",
      init="random")
  counts = np.asarray(result.counts)
  logging.info("Memory bank clusters at step %d: %d of %d non-empty, "
               "largest %d.", step, (counts > 0).sum(), k, counts.max())
  momentum = dict(state.momentum)
  momentum["bank_clusters"] = jax.device_put(
      result.labels.astype(jnp.int32), state.momentum["bank_clusters"].sharding)
  return state.replace(momentum=momentum)
