r"""The raw-pixel baseline, computed once per dataset and evaluation setting.

A linear probe (and kNN) on flattened pixels depends on the data and on the
evaluation settings, not on the run: `make smoke` spent a quarter of its
time recomputing it. It is looked up, in this order, in

  1. `contrastive/evaluation/raw_pixel_baselines/*.json`, measured constants
     shipped with the code (each file says how it was measured and the
     command that reproduces it);
  2. `<input.data_dir>/raw_pixel_baselines/`, beside the prepared dataset,
     where an earlier run on the same data wrote it (single-process runs);

and computed (then written to 2) otherwise. Each entry is keyed by a hash of
`setting()`: the dataset, its version and split sizes, the evaluation
splits, protocol, probe and kNN settings, image size and seed, so that a
change of split, probe or grid recomputes it. To recompute a shipped
constant:

  python -m contrastive.evaluation.raw_pixels \
      --config=configs/smoke_fashion_mnist.py \
      --config.input.data_dir=/tmp/contrastive/tensorflow_datasets \
      --out=contrastive/evaluation/raw_pixel_baselines
"""

import datetime
import hashlib
import json
import os
from typing import Any, Callable

from absl import logging
import jax
import ml_collections
import tensorflow as tf

from contrastive.data import input_pipeline
from contrastive.evaluation import linear_protocols

SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "raw_pixel_baselines")
CACHE_FOLDER = "raw_pixel_baselines"
# Keys of `linear_eval` that do not change the raw-pixel scores.
_RUN_ONLY_KEYS = ("enabled", "raw_pixel_baseline", "batch_size")


def setting(config: ml_collections.ConfigDict, dataset: str) -> dict[str, Any]:
  """Everything the raw-pixel scores depend on, as plain JSON values."""
  eval_config = config.linear_eval
  info = input_pipeline.dataset_info(dataset, config.input.data_dir)
  splits = (eval_config.train_split, eval_config.test_split)
  result = {
      "dataset": dataset,
      "version": str(info.version),
      "num_examples": {split: input_pipeline.num_examples(
          dataset, split, config.input.data_dir) for split in splits},
      "linear_eval": {k: v for k, v in eval_config.to_dict().items()
                      if k not in _RUN_ONLY_KEYS},
      "image_size": config.input.image_size,
      "seed": config.seed,
  }
  if (eval_config.protocol != linear_protocols.LBFGS
      and linear_protocols.resolve(eval_config).augment):
    # The classifier trains on augmented images: the input settings count.
    result["input"] = {k: v for k, v in config.input.to_dict().items()
                       if k != "data_dir"}
  # Tuples and lists are one JSON array; sorted keys make the hash stable.
  return json.loads(json.dumps(result, sort_keys=True))


def key(setting_dict: dict[str, Any]) -> str:
  """A short hash of `setting_dict`, the file name of its entry."""
  text = json.dumps(setting_dict, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _file_name(setting_dict) -> str:
  dataset = setting_dict["dataset"].replace("/", "_")
  return f"{dataset}-{key(setting_dict)}.json"


def _load(path: str, setting_dict) -> dict[str, Any] | None:
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    entry = json.load(f)
  # The file name is a hash: check the setting itself, not just its hash.
  if entry.get("setting") != setting_dict:
    logging.warning("Ignoring %s: its setting is not this run's.", path)
    return None
  return entry["result"]


def _cache_dir(config) -> str | None:
  return (os.path.join(config.input.data_dir, CACHE_FOLDER)
          if config.input.data_dir else None)


def write(folder: str, setting_dict, result, command: str | None = None
          ) -> str:
  """Writes one entry (atomically: a crash leaves no partial file)."""
  tf.io.gfile.makedirs(folder)
  path = os.path.join(folder, _file_name(setting_dict))
  entry = {
      "setting": setting_dict, "result": result,
      "measured": datetime.datetime.now(datetime.timezone.utc).strftime(
          "%Y-%m-%d"),
      "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
  }
  if command:
    entry["command"] = command
  tmp = f"{path}.tmp-{os.getpid()}"
  with tf.io.gfile.GFile(tmp, "w") as f:
    json.dump(entry, f, indent=2, sort_keys=True)
  tf.io.gfile.rename(tmp, path, overwrite=True)
  return path


def baseline(config: ml_collections.ConfigDict, dataset: str,
             compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
  """The raw-pixel scores of this setting: shipped, cached, or `compute()`d.

  `compute()` runs the probe on raw pixels and returns its scores. With
  several processes only the shipped constants are read (every host has the
  same code, so all of them skip or all of them compute: the extraction is
  a collective); the data_dir cache is for single-process runs.
  """
  setting_dict = setting(config, dataset)
  name = _file_name(setting_dict)
  folders = [SHIPPED_DIR]
  cache_dir = _cache_dir(config) if jax.process_count() == 1 else None
  if cache_dir:
    folders.append(cache_dir)
  for folder in folders:
    path = os.path.join(folder, name)
    result = _load(path, setting_dict)
    if result is not None:
      logging.info("Raw-pixel baseline read from %s (not recomputed).", path)
      return dict(result, source=path)
  result = compute()
  if cache_dir:
    path = write(cache_dir, setting_dict, result)
    logging.info("Raw-pixel baseline written to %s.", path)
  return dict(result, source="computed")


def main(argv):
  """Computes the raw-pixel baseline of --config and writes it to --out."""
  # pylint: disable=g-import-not-at-top
  import sys
  from absl import flags
  from contrastive import sharding
  from contrastive.evaluation import linear
  # pylint: enable=g-import-not-at-top
  del argv
  config = flags.FLAGS["config"].value
  dataset = config.linear_eval.dataset or config.input.dataset
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    result = linear.raw_pixel_scores(config, dataset, mesh)
  command = "python -m contrastive.evaluation.raw_pixels " + " ".join(
      arg for arg in sys.argv[1:] if not arg.startswith("--out"))
  path = write(flags.FLAGS["out"].value, setting(config, dataset), result,
               command)
  print(json.dumps({"path": path, **result}))


if __name__ == "__main__":
  # pylint: disable=g-import-not-at-top
  from contrastive import xla_cpu
  xla_cpu.add_cpu_flags()
  from absl import app
  from absl import flags as absl_flags
  from ml_collections import config_flags
  # pylint: enable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Config file (':arg' ok).")
  absl_flags.DEFINE_string("out", SHIPPED_DIR, "Folder of the entries.")
  absl_flags.mark_flags_as_required(["config"])
  app.run(main)
