"""A trained encoder from its workdir: `config, model, variables = load(path)`.

For everything that uses a finished (or running) run without training it:
pictures, fine-tuning (`supervised.init_from`), notebooks. `path` is a
training workdir, local or gs:// (read through `tf.io.gfile` and Orbax):
the config comes from `path/config.json` (written by `run_dir`), the
parameters from the newest checkpoint in `path/checkpoints`.

The restore needs no optimizer: its target is built from the checkpoint's own
metadata (shapes and dtypes as saved), and only `params`, `batch_stats` and
`step` are read, onto this host's first CPU device, so a checkpoint written by
a pod loads on a laptop and the optimizer state is never read. `variables`
are numpy arrays that `model.apply(variables, x, method=model.features)`
accepts, whichever trainer wrote the checkpoint:
  - "contrastive": `params` are the model's (encoder + projection head);
  - "supervised": `params` are {"encoder": ..., "classifier": ...}; the
    encoder's are returned (the model's head is then absent, and
    `model.features` does not need it).
"""

import json
import os
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf

from contrastive import checkpoint
from contrastive import models
from contrastive import run_dir

# The supervised trainer's key of the encoder's params (see supervised.py;
# not imported from there, which imports this module).
_SUPERVISED_ENCODER = "encoder"


def load_config(path: str) -> ml_collections.ConfigDict:
  """The config recorded in `path/config.json`; ValueError if there is none."""
  config_path = os.path.join(path, run_dir.CONFIG_FILE)
  if not tf.io.gfile.exists(config_path):
    raise ValueError(
        f"{path} is not a training workdir: it has no {run_dir.CONFIG_FILE}. "
        "Pass the --workdir of a training run (the directory holding "
        f"{run_dir.CONFIG_FILE} and checkpoints/).")
  with tf.io.gfile.GFile(config_path) as f:
    return ml_collections.ConfigDict(json.load(f))


def _host_target(metadata_tree) -> Any:
  """`ShapeDtypeStruct`s on this host's first CPU device, as saved."""
  device = jax.local_devices(backend="cpu")[0]
  single = jax.sharding.SingleDeviceSharding(device)
  return jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=single),
      metadata_tree)


def _open(directory: str) -> ocp.CheckpointManager | None:
  """A read-only manager of `directory`, None if it has no checkpoint."""
  if not tf.io.gfile.isdir(directory):
    return None
  # read_only: never creates, cleans up or writes anything in `directory`.
  # The PyTree handler reads what StandardCheckpointHandler wrote and can
  # restore a part of it (`partial_restore`).
  manager = ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(
          read_only=True, create=False, save_interval_steps=0),
      item_handlers=ocp.PyTreeCheckpointHandler())
  if not manager.all_steps():
    manager.close()
    return None
  return manager


def _restore(manager: ocp.CheckpointManager, step: int, trainer: str) -> dict:
  """{"step", "params" (the encoder's), "batch_stats"} of `step`, on host."""
  where = os.path.join(str(manager.directory), str(step))
  try:
    # Orbax logs unreadable metadata and returns an empty tree, or raises.
    tree = getattr(manager.item_metadata(step), "tree", None)
    if not tree or "params" not in tree:
      raise ValueError("its metadata cannot be read")
    params = tree["params"]
    if trainer == "supervised":
      params = {_SUPERVISED_ENCODER: params[_SUPERVISED_ENCODER]}
    target = _host_target({"step": tree["step"], "params": params,
                           "batch_stats": tree.get("batch_stats", {})})
    restore_args = jax.tree.map(
        lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding,
                                       global_shape=t.shape, dtype=t.dtype),
        target)
    restored = manager.restore(step, args=ocp.args.PyTreeRestore(
        target, restore_args=restore_args, partial_restore=True))
  # Orbax, TensorStore and the codecs raise many types for bad bytes.
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"Checkpoint {where} cannot be read ({type(e).__name__}: "
                     f"{e}); it may be damaged (resuming the run moves it "
                     "aside and falls back to the previous one).") from e
  restored = jax.tree.map(np.asarray, jax.device_get(restored))
  if trainer == "supervised":
    restored["params"] = restored["params"][_SUPERVISED_ENCODER]
  logging.info("Loaded the parameters of step %d from %s.",
               int(restored["step"]), where)
  return restored


def load(path: str) -> tuple[ml_collections.ConfigDict, Any, dict[str, Any]]:
  """Returns (config, model, variables) of the run in workdir `path`.

  Args:
    path: a training workdir, local or gs://.

  Returns:
    `config`: the run's config (from `config.json`); `model`:
    `models.create(config.model)`; `variables`: {"params", "batch_stats"} of
    the encoder at the newest checkpoint, numpy arrays on the host.

  Raises:
    ValueError: `path` has no config.json or no checkpoint, or the newest
      checkpoint is unreadable; the message says what to do.
  """
  config = load_config(path)
  trainer = config.get("trainer", "contrastive")
  if trainer not in ("contrastive", "supervised"):
    raise ValueError(f"{path} was trained by config.trainer={trainer!r}, "
                     "whose checkpoints this loader does not know.")
  model = models.create(config.model)
  directory = checkpoint.checkpoint_directory(path)
  manager = _open(directory)
  if manager is None:
    raise ValueError(
        f"No checkpoint in {directory}: the run has not saved one yet. "
        "Train it (a checkpoint is written every checkpoint_every_steps and "
        "at the end), or pass the workdir of a run that has.")
  try:
    restored = _restore(manager, manager.latest_step(), trainer)
  finally:
    manager.close()
  return config, model, {"params": restored["params"],
                         "batch_stats": restored.get("batch_stats", {})}
