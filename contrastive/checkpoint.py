"""Orbax checkpointing of the train state: periodic, final, keep N, resume.

Saves are asynchronous (training continues while arrays are written) and
atomic: Orbax writes into a temporary directory and renames it when complete,
so a process killed mid-save leaves only a temporary directory, which the next
start removes. Restoring walks the checkpoints from the newest down: one that
cannot be read (truncated or garbage files) is moved to
`workdir/corrupt_checkpoints/` with a warning and the previous one is tried;
checkpoints are never deleted here, and a workdir whose checkpoints are all
unreadable is an error, never a silent fresh start. A checkpoint whose array
shapes differ from the model's (another model or config) is refused with the
mismatched keys named.

Orbax refuses to write arrays with no elements (e.g. the queue of a loss run
with `momentum.queue_size=0`, MoCo v3 style): they are left out of the
checkpoint and re-created, empty, on restore.
"""

import math
import os
import shutil
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import orbax.checkpoint as ocp
import tensorflow as tf

CORRUPT_DIR = "corrupt_checkpoints"


class IncompatibleCheckpointError(ValueError):
  """A readable checkpoint whose arrays do not fit the model being trained."""


class NoUsableCheckpointError(RuntimeError):
  """Checkpoints exist but none of them can be read."""


def checkpoint_directory(workdir: str) -> str:
  """`workdir/checkpoints`; remote (gs://) as given, local made absolute."""
  if "://" not in workdir:
    workdir = os.path.abspath(workdir)
  return os.path.join(workdir, "checkpoints")


def create_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """A manager writing to `workdir/checkpoints` (collectively on multi-host)."""
  directory = checkpoint_directory(workdir)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=True,
      # Saves cut short by a kill leave temporary directories behind.
      cleanup_tmp_directories=True)
  # The handler is named up front so metadata can be read before any save
  # or restore in this process.
  return ocp.CheckpointManager(
      directory, options=options,
      item_handlers=ocp.StandardCheckpointHandler())


def save(manager: ocp.CheckpointManager, state, *, force: bool = False) -> None:
  """Starts an asynchronous save of `state` at its step (once per step)."""
  step = int(jax.device_get(state.step))
  if manager.latest_step() == step:
    return
  manager.save(step, args=ocp.args.StandardSave(_without_empty_arrays(state)),
               force=force)


def _is_empty_array(leaf) -> bool:
  return hasattr(leaf, "shape") and math.prod(leaf.shape) == 0


def _without_empty_arrays(tree):
  """`tree` with its zero-element arrays replaced by None (not saved)."""
  return jax.tree.map(lambda x: None if _is_empty_array(x) else x, tree)


def _with_empty_arrays(restored, abstract_state):
  """Puts back the zero-element arrays of `abstract_state` left out on save."""
  def fill(target, value):
    if not _is_empty_array(target):
      return value
    sharding = getattr(target, "sharding", None)
    return jnp.zeros(target.shape, target.dtype, device=sharding)
  # A leaf of the first tree meets the whole (here None) subtree of the
  # second, so the left-out positions reach `fill` as None.
  return jax.tree.map(fill, abstract_state, restored)


def _key_name(key) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def _shapes(tree) -> dict[str, tuple[int, ...] | None]:
  """{'params/encoder/.../kernel': shape} for every leaf of `tree`."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key_name(k) for k in path): getattr(leaf, "shape", None)
          for path, leaf in leaves}


def _mismatches(saved: dict, expected: dict) -> list[str]:
  """Human-readable differences between two {key: shape} maps."""
  problems = [f"{k}: checkpoint {saved[k]} vs model {expected[k]}"
              for k in sorted(saved.keys() & expected.keys())
              if tuple(saved[k] or ()) != tuple(expected[k] or ())]
  problems += [f"{k}: missing from checkpoint"
               for k in sorted(expected.keys() - saved.keys())]
  problems += [f"{k}: not in model" for k in sorted(saved.keys() -
                                                     expected.keys())]
  return problems


def _saved_shapes(manager: ocp.CheckpointManager, step: int) -> dict:
  """{key: shape} of the checkpoint; raises ValueError if unreadable."""
  # Orbax logs unreadable metadata and returns an empty tree rather than
  # raising, so emptiness is what marks a damaged checkpoint here.
  metadata = manager.item_metadata(step)
  tree = getattr(metadata, "tree", None)
  if not tree:
    raise ValueError("its metadata cannot be read")
  return _shapes(tree)


def _check_compatible(manager: ocp.CheckpointManager, step: int,
                      saved: dict, abstract_state) -> None:
  """Raises IncompatibleCheckpointError if array shapes or keys differ."""
  problems = _mismatches(saved,
                         _shapes(_without_empty_arrays(abstract_state)))
  if problems:
    shown = "; ".join(problems[:8])
    more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
    raise IncompatibleCheckpointError(
        f"Checkpoint {_step_dir(manager, step)} was written by a different "
        f"model or config and cannot be resumed: {shown}{more}. Use a new "
        "--workdir, or restore the config that wrote it.")


def _step_dir(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(manager.directory), str(step))


def _move_tree(source: str, target: str) -> None:
  """Moves a directory, locally or on a bucket (which cannot rename one)."""
  if "://" not in source:
    shutil.move(source, target)
    return
  for folder, _, files in tf.io.gfile.walk(source):
    destination = target + folder[len(source):]
    tf.io.gfile.makedirs(destination)
    for name in files:
      tf.io.gfile.rename(os.path.join(folder, name),
                         os.path.join(destination, name), overwrite=True)
  tf.io.gfile.rmtree(source)


def _quarantine(manager: ocp.CheckpointManager, step: int) -> str:
  """Moves an unreadable checkpoint aside (kept for inspection); returns where."""
  source = _step_dir(manager, step)
  target = os.path.join(os.path.dirname(str(manager.directory)), CORRUPT_DIR,
                        f"{step}.{int(time.time())}")
  if jax.process_index() == 0:
    tf.io.gfile.makedirs(os.path.dirname(target))
    _move_tree(source, target)
  multihost_utils.sync_global_devices(f"quarantine checkpoint {step}")
  manager.reload()
  return target


def restore_latest(manager: ocp.CheckpointManager, abstract_state):
  """Returns the newest readable state (sharded like `abstract_state`) or None.

  Args:
    manager: from `create_manager`.
    abstract_state: `ShapeDtypeStruct`s with shardings, the restore target.

  Returns:
    The restored state, or None if there is no checkpoint at all.

  Raises:
    IncompatibleCheckpointError: the newest readable checkpoint does not fit
      `abstract_state`; the message names the mismatched keys.
    NoUsableCheckpointError: there are checkpoints but none can be read.
  """
  bad = []
  for step in sorted(manager.all_steps(), reverse=True):
    directory = _step_dir(manager, step)
    try:
      saved = _saved_shapes(manager, step)
    # Orbax, TensorStore and the codecs raise many types for bad bytes.
    except Exception as e:  # pylint: disable=broad-except
      error = e
    else:
      _check_compatible(manager, step, saved, abstract_state)
      try:
        logging.info("Restoring checkpoint of step %d from %s", step,
                     directory)
        state = _with_empty_arrays(
            manager.restore(step, args=ocp.args.StandardRestore(
                _without_empty_arrays(abstract_state))),
            abstract_state)
        restored_step = int(jax.device_get(state.step))
        if restored_step != step:
          raise ValueError(f"it holds step {restored_step}")
        if bad:
          logging.warning("Resuming from step %d, the newest readable "
                          "checkpoint.", step)
        return state
      except Exception as e:  # pylint: disable=broad-except
        error = e
    moved = _quarantine(manager, step)
    message = (f"Checkpoint {directory} is unreadable ({type(error).__name__}: "
               f"{str(error).splitlines()[0] if str(error) else ''}); moved "
               f"it to {moved} and falling back to the previous checkpoint.")
    logging.warning(message)
    bad.append(moved)
  if bad:
    raise NoUsableCheckpointError(
        f"All {len(bad)} checkpoint(s) in {manager.directory} are unreadable "
        f"(moved to {', '.join(bad)}); refusing to start from scratch over "
        "them. Restore a good checkpoint there, or use a new --workdir.")
  return None
