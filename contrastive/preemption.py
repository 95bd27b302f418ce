"""SIGTERM (what a preempted spot/preemptible VM receives) as a stop request.

The handler only sets a flag; the training loop asks `reached(step)` after
each step, then checkpoints and returns, so the step in flight completes and
nothing is written from inside a signal handler. On several processes the
flag must be agreed on (a host that stops alone would hang the others in the
next collective): the processes all-gather it every `sync_every` steps, at
the same steps everywhere, which keeps the host-device round trip off most
steps.
"""

import signal
import types

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np


class Watcher:
  """Context manager that turns SIGTERM into `reached(step) == True`."""

  def __init__(self, signals=(signal.SIGTERM,), sync_every: int = 10):
    self._signals = signals
    self._sync_every = sync_every
    self._previous = {}
    self.requested = False

  def _handle(self, signum: int, frame: types.FrameType | None) -> None:
    del frame
    if not self.requested:
      logging.warning("Received signal %d: finishing the current step, then "
                      "checkpointing and exiting.", signum)
    self.requested = True

  def __enter__(self) -> "Watcher":
    for signum in self._signals:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def reached(self, step: int) -> bool:
    """Whether to stop after `step`; the same answer on every process."""
    if jax.process_count() == 1:
      return self.requested
    if step % self._sync_every:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.requested))
    return bool(np.max(flags))
