"""Orbax checkpointing of the train state: periodic, final, keep N, resume."""

import os

from absl import logging
import jax
import orbax.checkpoint as ocp


def create_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """A manager writing to `workdir/checkpoints` (collectively on multi-host)."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(directory, options=options)


def save(manager: ocp.CheckpointManager, state, *, force: bool = False) -> None:
  step = int(jax.device_get(state.step))
  if manager.latest_step() == step:
    return
  manager.save(step, args=ocp.args.StandardSave(state), force=force)


def restore_latest(manager: ocp.CheckpointManager, abstract_state):
  """Returns the latest saved state (sharded like `abstract_state`) or None."""
  step = manager.latest_step()
  if step is None:
    return None
  logging.info("Restoring checkpoint of step %d from %s", step,
               manager.directory)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
