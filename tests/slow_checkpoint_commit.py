"""`python -m contrastive.main`, with one checkpoint's commit held back.

Orbax writes a checkpoint into a temporary directory in the background and
commits it by renaming the directory. Here the commit of the checkpoint of
step $SLOW_COMMIT_STEP waits $SLOW_COMMIT_SECONDS (default 600) after its
arrays are written, while training goes on, so that a kill in that window
lands during an asynchronous checkpoint write (tests/resume_test.py).
"""

import asyncio
import os
import runpy
import sys

from contrastive import xla_cpu

xla_cpu.add_cpu_flags()  # As contrastive.main does, before JAX starts.

# pylint: disable=g-import-not-at-top,wrong-import-position
from orbax.checkpoint._src.path import atomicity

STEP = os.environ["SLOW_COMMIT_STEP"]
SECONDS = float(os.environ.get("SLOW_COMMIT_SECONDS", "600"))
_commit = atomicity.AtomicRenameTemporaryPath.finalize


async def _held_back_commit(self):
  if self.get_final().name == STEP:
    await asyncio.sleep(SECONDS)
  await _commit(self)


atomicity.AtomicRenameTemporaryPath.finalize = _held_back_commit

if __name__ == "__main__":
  sys.argv[0] = "contrastive.main"
  runpy.run_module("contrastive.main", run_name="__main__", alter_sys=True)
