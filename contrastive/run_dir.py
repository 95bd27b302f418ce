"""The workdir: checked writable, and keyed by the config that started it.

`workdir/config.json` records the config of the first start. A restart with
checkpoints present compares its config with the record and refuses to resume
a different run unless `config.resume="force"`. Keys that do not change what
is trained are not compared (`IGNORED_KEYS`): logging and checkpoint cadence,
evaluation, where the data lives, these policies themselves, and the run's
length (`total_steps`, `total_epochs`), so a finished run can be extended —
the learning-rate schedule is then rebuilt for the new length.
"""

import json
import os

from absl import logging
import jax
import ml_collections
import tensorflow as tf

CONFIG_FILE = "config.json"

IGNORED_KEYS = ("log_every_steps", "checkpoint_every_steps",
                "keep_checkpoints", "total_steps", "total_epochs",
                "linear_eval", "online_eval.every_steps", "online_eval.knn_k",
                "online_eval.knn_train_split", "input.data_dir", "resume",
                "nonfinite", "reevaluate")


class ConfigMismatchError(ValueError):
  """The workdir holds a run of another config."""


def ensure_writable(workdir: str) -> None:
  """Creates `workdir` if needed; raises one clear error if it is unusable."""
  probe = os.path.join(workdir, f".write_probe.{jax.process_index()}")
  # tf.io.gfile: the same calls serve local paths and gs:// buckets.
  try:
    tf.io.gfile.makedirs(workdir)
    with tf.io.gfile.GFile(probe, "w") as f:
      f.write("ok")
    tf.io.gfile.remove(probe)
  except (OSError, tf.errors.OpError) as e:
    reason = getattr(e, "strerror", None) or getattr(e, "message", None) or e
    raise PermissionError(
        f"Workdir {workdir} is not writable ({type(e).__name__}: "
        f"{reason}); pass a --workdir you can write to.") from e


def _flatten(tree, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(_flatten(value, name + "."))
    else:
      flat[name] = value
  return flat


def _compared(config_dict: dict) -> dict:
  def ignored(key):
    return any(key == k or key.startswith(k + ".") for k in IGNORED_KEYS)
  return {k: v for k, v in _flatten(config_dict).items() if not ignored(k)}


def _as_json_dict(config: ml_collections.ConfigDict) -> dict:
  # Through JSON, so tuples and lists compare equal to what was read back.
  return json.loads(config.to_json_best_effort(sort_keys=True))


def _write(path: str, config: ml_collections.ConfigDict) -> None:
  if jax.process_index() == 0:
    temporary = path + ".tmp"
    if tf.io.gfile.exists(temporary):  # Left by a crash.
      tf.io.gfile.remove(temporary)
    with tf.io.gfile.GFile(temporary, "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    # Atomic: never a half-written record.
    tf.io.gfile.rename(temporary, path, overwrite=True)


def _warn_if_length_changed(recorded: dict, current: dict) -> None:
  length = lambda c: (c.get("total_steps"), c.get("total_epochs"))
  if length(recorded) != length(current):
    logging.warning(
        "Resuming with a new run length (total_steps, total_epochs: %s -> %s): "
        "the learning-rate schedule is rebuilt for the new length, so the "
        "learning rate jumps at the resumed step from the old curve to the "
        "new one. For a run that follows one schedule, start it in a new "
        "--workdir.", length(recorded), length(current))


def check_config(workdir: str, config: ml_collections.ConfigDict, *,
                 has_checkpoint: bool) -> None:
  """Records the config, or checks it against the record before a resume.

  Args:
    workdir: the run's directory.
    config: this start's config.
    has_checkpoint: whether there is a checkpoint to resume from.

  Raises:
    ConfigMismatchError: a checkpoint exists, the recorded config differs in
      compared keys (named in the message) and `config.resume` is "auto".
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if has_checkpoint and tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      recorded_dict = json.load(f)
    current_dict = _as_json_dict(config)
    _warn_if_length_changed(recorded_dict, current_dict)
    recorded, current = _compared(recorded_dict), _compared(current_dict)
    differences = [
        f"{k}: {recorded.get(k, '<absent>')!r} -> {current.get(k, '<absent>')!r}"
        for k in sorted(recorded.keys() | current.keys())
        if recorded.get(k) != current.get(k)]
    if differences:
      message = (f"Workdir {workdir} holds a run with a different config "
                 f"({'; '.join(differences)}).")
      if config.resume != "force":
        raise ConfigMismatchError(
            message + " Use a new --workdir, or pass --config.resume=force "
            "to resume it with this config anyway.")
      logging.warning("%s Resuming anyway (config.resume=force).", message)
  elif has_checkpoint:
    logging.warning("Workdir %s has checkpoints but no %s; recording this "
                    "config without checking it.", workdir, CONFIG_FILE)
  _write(path, config)
