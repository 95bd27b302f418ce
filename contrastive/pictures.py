r"""Pictures of a run: training curves and a t-SNE map of its frozen features.

  python -m contrastive.pictures --workdir=/tmp/contrastive/smoke_supcon \
      [--out=WORKDIR/pictures] [--tsne_examples=5000] [--split=test]

writes into `--out`:
  - `curves.png`: from `workdir/metrics.jsonl`, one panel per quantity that
    the run logged: the loss, the online linear probe's top-1 (on each
    logged training batch and, periodically, on the test split) and the
    online kNN top-1 (periodic). A resumed run may have logged a step twice;
    the last row of each step is the one drawn.
  - `embedding.png`: t-SNE (2-D) of the encoder's pooled features, BN in
    inference mode as linear evaluation reads them, of the first
    `--tsne_examples` images of the evaluation split, coloured by class.

The encoder comes from `pretrained.load` (newest checkpoint, on the host) and
runs on one device of this process: the map is for looking at a run, so a
laptop or one host of a pod will do. Plotting uses matplotlib `Figure`s
directly (Agg canvas, no pyplot state), written through `tf.io.gfile` so
`--out` may be on gs://.
"""

import io
import json
import math
import os
from collections.abc import Sequence

from absl import app
from absl import flags
from absl import logging
import jax
from matplotlib import colormaps
from matplotlib import figure
from matplotlib import ticker
import numpy as np
from sklearn import manifold
import tensorflow as tf

from contrastive import pretrained
from contrastive.data import input_pipeline

def _define_flags() -> None:
  """Defines the command's flags; only when run as a command, so that
  importing this module next to another absl entry point cannot clash."""
  global _WORKDIR, _OUT, _TSNE_EXAMPLES, _SPLIT, _DATA_DIR, _BATCH_SIZE, _SEED
  _WORKDIR = flags.DEFINE_string(
      "workdir", None, "Training workdir (config.json, checkpoints/, "
      "metrics.jsonl); local or gs://.")
  _OUT = flags.DEFINE_string("out", None, "Output folder; default "
                             "WORKDIR/pictures.")
  _TSNE_EXAMPLES = flags.DEFINE_integer(
      "tsne_examples", 5000, "First N images of the split in the t-SNE map; 0 "
      "skips the map.")
  _SPLIT = flags.DEFINE_string(
      "split", None, "Split for the map; default the run's "
      "config.linear_eval.test_split.")
  _DATA_DIR = flags.DEFINE_string(
      "data_dir", None, "TFDS data dir; default the run's config.input.data_dir.")
  _BATCH_SIZE = flags.DEFINE_integer(
      "batch_size", 256, "Images per forward pass of the encoder.")
  _SEED = flags.DEFINE_integer("seed", 0, "t-SNE random state.")


METRICS_FILE = "metrics.jsonl"
EXACT_TSNE_MAX_EXAMPLES = 1000

# (panel name, title, y label, [(metrics.jsonl key, legend label)]).
# Accuracies are logged as fractions and drawn in percent.
PANELS = (
    ("loss", "Training loss", "loss", (("loss", "training batch"),)),
    ("probe_top1", "Online linear probe top-1", "top-1 (%)",
     (("probe_train_top1", "training batch"),
      ("online/probe_top1", "test split"))),
    ("knn_top1", "Online kNN top-1", "top-1 (%)",
     (("online/knn_top1", "test split"),)),
)


def read_metrics(path: str) -> list[dict]:
  """Rows of a metrics.jsonl, one per step (the last one logged), by step.

  A resumed run logs again the steps between its last checkpoint and the
  interruption; the later row is the one that belongs to the run that went
  on. A line cut short by a crash is skipped.
  """
  by_step = {}
  with tf.io.gfile.GFile(path) as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        logging.warning("Skipping unreadable line %d of %s.", number, path)
        continue
      if "step" in row:
        by_step[int(row["step"])] = row
  return [by_step[step] for step in sorted(by_step)]


def _series(rows: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of the rows that logged a finite `key`."""
  points = [(row["step"], float(row[key])) for row in rows
            if row.get(key) is not None and math.isfinite(float(row[key]))]
  steps, values = zip(*points) if points else ((), ())
  return np.asarray(steps), np.asarray(values)


def _save(fig: figure.Figure, path: str) -> None:
  """Writes `fig` as PNG, locally or on gs://."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", bbox_inches="tight")
  with tf.io.gfile.GFile(path, "wb") as f:
    f.write(buffer.getvalue())


def plot_curves(rows: Sequence[dict], path: str) -> list[str]:
  """Draws the panels of `PANELS` whose keys occur in `rows`; returns them.

  Args:
    rows: metrics.jsonl rows (see `read_metrics`), each with "step".
    path: PNG to write.

  Returns:
    The names of the panels drawn, in `PANELS` order.

  Raises:
    ValueError: no row holds any key of `PANELS`.
  """
  panels = []
  for name, title, ylabel, keys in PANELS:
    series = [(label, *_series(rows, key)) for key, label in keys]
    series = [s for s in series if len(s[1])]
    if series:
      panels.append((name, title, ylabel, series))
  if not panels:
    raise ValueError("No curve to draw: the metrics hold none of "
                     f"{[k for *_, keys in PANELS for k, _ in keys]}.")
  fig = figure.Figure(figsize=(4.8 * len(panels), 3.6))
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  for ax, (name, title, ylabel, series) in zip(axes, panels):
    for label, steps, values in series:
      if name != "loss":
        values = 100 * values
      # Periodic evaluations are few points: mark them.
      ax.plot(steps, values, label=label,
              marker="o" if len(steps) <= 50 else None, markersize=3)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if len(series) > 1 or name != "loss":
      ax.legend()
  fig.tight_layout()
  _save(fig, path)
  return [name for name, *_ in panels]


def tsne_embedding(features: np.ndarray, seed: int = 0) -> np.ndarray:
  """2-D t-SNE of `features` f32[N, F] (PCA init, fixed seed): f32[N, 2]."""
  features = np.asarray(features, np.float32)
  n = len(features)
  if n < 4:
    raise ValueError(f"t-SNE needs at least 4 examples, got {n}.")
  # sklearn requires perplexity < N; 30 is its default for large N.
  perplexity = min(30.0, (n - 1) / 3)
  # Barnes-Hut's approximation pays off only for large N; below that the
  # exact gradient is as fast and does not start OpenMP threads (which on a
  # busy 2-core machine made 120 points take 80 s instead of 0.3 s).
  method = "exact" if n <= EXACT_TSNE_MAX_EXAMPLES else "barnes_hut"
  tsne = manifold.TSNE(n_components=2, perplexity=perplexity, init="pca",
                       learning_rate="auto", random_state=seed,
                       method=method)
  return tsne.fit_transform(features).astype(np.float32)


def plot_embedding(points: np.ndarray, labels: np.ndarray,
                   class_names: Sequence[str] | None, path: str,
                   title: str = "t-SNE of the frozen encoder's features"
                   ) -> None:
  """Scatter of `points` f32[N, 2] coloured by `labels`, with a legend.

  Up to 20 classes get distinct colours and a legend entry each (by
  `class_names`, else the label); more classes share a colour map, named
  by a colour bar.
  """
  labels = np.asarray(labels)
  classes = np.unique(labels)
  names = (list(class_names) if class_names is not None
           else [str(c) for c in range(int(classes.max()) + 1)])
  fig = figure.Figure(figsize=(8.5, 7))
  ax = fig.subplots()
  size = 16 if len(points) <= 2000 else 5
  if len(classes) <= 20:
    palette = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    for i, c in enumerate(classes):
      chosen = labels == c
      ax.scatter(points[chosen, 0], points[chosen, 1], s=size,
                 color=palette(i), label=names[c], alpha=0.8, linewidths=0)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5),
              markerscale=2.5 if size < 16 else 1.5, frameon=False)
  else:
    scatter = ax.scatter(points[:, 0], points[:, 1], s=size, c=labels,
                         cmap="turbo", alpha=0.8, linewidths=0)
    fig.colorbar(scatter, ax=ax, label="class")
  ax.set(title=title, xticks=[], yticks=[])
  fig.tight_layout()
  _save(fig, path)


def features_of(model, variables, *, dataset: str, split: str,
                image_size: int, data_dir: str | None, max_examples: int,
                batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(features f32[N, F], labels i32[N]) of the first examples of `split`.

  One device of this process runs the encoder (BN in inference mode).
  """
  device = jax.local_devices()[0]
  variables = jax.device_put(variables, device)
  apply_features = jax.jit(
      lambda variables, x: model.apply(variables, x, method=model.features))
  batches = input_pipeline.eval_dataset(
      dataset, split, global_batch_size=batch_size, image_size=image_size,
      data_dir=data_dir, process_index=0, process_count=1)
  batches = batches.take(-(-max_examples // batch_size))
  features, labels = [], []
  for batch in batches.as_numpy_iterator():
    out = apply_features(variables, jax.device_put(batch["image"], device))
    features.append(np.asarray(out, np.float32)[batch["mask"]])
    labels.append(batch["label"][batch["mask"]])
  return (np.concatenate(features)[:max_examples],
          np.concatenate(labels)[:max_examples])


def draw_embedding(workdir: str, path: str, *, max_examples: int,
                   split: str | None = None, data_dir: str | None = None,
                   batch_size: int = 256, seed: int = 0) -> None:
  """`embedding.png` of the run in `workdir` (see the module docstring)."""
  config, model, variables = pretrained.load(workdir)
  dataset = config.linear_eval.dataset or config.input.dataset
  split = split or config.linear_eval.test_split
  data_dir = data_dir or config.input.data_dir
  info = input_pipeline.dataset_info(dataset, data_dir)
  features, labels = features_of(
      model, variables, dataset=dataset, split=split,
      image_size=config.input.image_size, data_dir=data_dir,
      max_examples=max_examples, batch_size=batch_size)
  logging.info("t-SNE of %s features of %s %s.", features.shape, dataset,
               split)
  points = tsne_embedding(features, seed)
  names = getattr(info.features["label"], "names", None)
  run = os.path.basename(os.path.normpath(workdir))
  plot_embedding(points, labels, names, path,
                 title=f"{run}: t-SNE of encoder features, {dataset} {split} "
                 f"({len(points)} images)")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  workdir = _WORKDIR.value
  out = _OUT.value or os.path.join(workdir, "pictures")
  tf.io.gfile.makedirs(out)
  metrics_path = os.path.join(workdir, METRICS_FILE)
  if tf.io.gfile.exists(metrics_path):
    path = os.path.join(out, "curves.png")
    panels = plot_curves(read_metrics(metrics_path), path)
    print(f"Wrote {path} ({', '.join(panels)}).")
  else:
    logging.warning("No %s: no curves drawn.", metrics_path)
  if _TSNE_EXAMPLES.value > 0:
    path = os.path.join(out, "embedding.png")
    draw_embedding(workdir, path, max_examples=_TSNE_EXAMPLES.value,
                   split=_SPLIT.value, data_dir=_DATA_DIR.value,
                   batch_size=_BATCH_SIZE.value, seed=_SEED.value)
    print(f"Wrote {path}.")


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
