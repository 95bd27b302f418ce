r"""How often FNC's false-negative detector flags a same-class column.

FNC (and `fn_removal`) train without labels and treat the columns the
detector flags as positives (or drop them). This script measures, on a
run's training batches with their real augmentations, what share of the
flagged columns are views of an image of the anchor's class (the detector's
precision), against the share of same-class columns in the batch (what a
random flag would hit), with the weights of a workdir's newest checkpoint
or, with --init, a fresh initialisation of the same model.

  .venv/bin/python benchmarks/false_negative_detector.py \
      --workdir=/tmp/contrastive/table5v/fnc \
      --data_dir=/tmp/contrastive/tensorflow_datasets

The detector is the one training calls (`infonce.detect_false_negatives`),
on one device over the whole global batch, with the run's `fn_topk` and
`fn_threshold`; BatchNorm normalises with the batch's statistics, as in a
training step.
"""

import argparse
import itertools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
# pylint: disable=g-import-not-at-top
from contrastive import pretrained
from contrastive.data import input_pipeline
from contrastive.losses import fnc
from contrastive.losses import infonce
from contrastive.losses import streaming


def _flags(model, variables, images, detector):
  """bool[b, b * views]: the detector's flags; columns sample-major."""
  num_images, views = images.shape[:2]
  outputs, _ = model.apply(
      variables, images.reshape(num_images * views, *images.shape[2:]),
      train=True, mutable=["batch_stats"])
  z = outputs["embedding"].astype(jnp.float32)
  ids = jnp.arange(num_images * views, dtype=jnp.int32)
  columns = streaming.Columns(z=z, labels=jnp.zeros_like(ids), ids=ids)
  return infonce.detect_false_negatives(
      z.reshape(num_images, views, -1), jnp.arange(num_images, dtype=jnp.int32),
      columns, views, detector)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True,
                      help="an fnc or fn_removal training workdir")
  parser.add_argument("--data_dir", default=None,
                      help="TFDS data_dir; default: the run's")
  parser.add_argument("--batches", type=int, default=4)
  parser.add_argument("--init", action="store_true",
                      help="a fresh initialisation instead of the checkpoint")
  args = parser.parse_args()

  config, model, variables = pretrained.load(args.workdir)
  if config.loss.name not in ("fnc", "fn_removal"):
    raise ValueError(f"{args.workdir} trained {config.loss.name!r}; this "
                     "measures the detector of fnc or fn_removal runs.")
  if args.data_dir:
    config.input.data_dir = args.data_dir
  detector = fnc.detector_for(config.loss.name, **{
      key: value for key, value in config.loss.get("kwargs", {}).items()
      if key.startswith("fn_")})
  batches = input_pipeline.pretrain_dataset(
      config.input, seed=config.seed, process_index=0,
      process_count=1).as_numpy_iterator()
  first = next(batches)
  if args.init:
    variables = model.init(jax.random.key(config.seed),
                           first["image"][:2, 0], train=False)
  flags_fn = jax.jit(lambda v, x: _flags(model, v, x, detector))

  print(f"{args.workdir}: {'fresh initialisation' if args.init else 'newest checkpoint'}, "
        f"topk {detector.topk}, threshold {detector.threshold}, "
        f"batch {first['image'].shape[0]} x {first['image'].shape[1]} views")
  print("| batch | flagged columns per image | same class among flagged | "
        "same class among all other columns |")
  print("|---|---|---|---|")
  flagged, flagged_same, chances = 0, 0, []
  for index, batch in enumerate(itertools.islice(
      itertools.chain([first], batches), args.batches)):
    flags = np.asarray(flags_fn(variables, batch["image"]))
    labels = batch["label"]
    column_samples = np.arange(flags.shape[1]) // batch["image"].shape[1]
    same = labels[:, None] == labels[column_samples][None, :]
    other = np.arange(len(labels))[:, None] != column_samples[None, :]
    chances.append((same & other).sum() / other.sum())
    flagged += flags.sum()
    flagged_same += (flags & same).sum()
    print(f"| {index} | {flags.sum() / len(labels):.2f} | "
          f"{(flags & same).sum() / max(flags.sum(), 1):.4f} | "
          f"{chances[-1]:.4f} |")
  print(f"| all | {flagged / (args.batches * len(labels)):.2f} | "
        f"{flagged_same / max(flagged, 1):.4f} | {np.mean(chances):.4f} |")


if __name__ == "__main__":
  main()
