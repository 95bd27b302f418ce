"""Metrics to TensorBoard (clu) and to `workdir/metrics.jsonl`, process 0 only.

`metrics.jsonl` holds one JSON object per logged step, e.g.
  {"step": 100, "loss": 5.1, "learning_rate": 0.4, "contrastive_acc": 0.31,
   "images_per_sec": 412.0, ...}
so runs can be compared and plotted without TensorBoard.
"""

import json
import os

from clu import metric_writers
import jax
import numpy as np
import tensorflow as tf


class MetricLogger:
  """Writes scalars to TensorBoard event files and a JSON-lines file."""

  def __init__(self, workdir: str):
    self._is_writer = jax.process_index() == 0
    self.writer = metric_writers.create_default_writer(
        workdir, just_logging=not self._is_writer)
    self._path = os.path.join(workdir, "metrics.jsonl")
    # Buckets (gs://) cannot append: there the file is rewritten whole, from
    # the rows it already had plus this run's.
    self._remote = "://" in workdir
    self._rows = []
    if self._is_writer and self._remote and tf.io.gfile.exists(self._path):
      with tf.io.gfile.GFile(self._path) as f:
        self._rows = f.read().splitlines()
    self._jsonl = (open(self._path, "a")
                   if self._is_writer and not self._remote else None)

  def last_value(self, name: str, up_to_step: int) -> float | None:
    """`name` in the newest row of metrics.jsonl at a step <= `up_to_step`.

    What a resumed run continues from (e.g. its training time); None where
    no such row exists, and on processes other than 0, which write none.
    """
    if not self._is_writer:
      return None
    if self._remote:
      lines = self._rows
    elif os.path.exists(self._path):
      with open(self._path) as f:
        lines = f.read().splitlines()
    else:
      lines = []
    found, found_step = None, -1
    # A resumed run repeats steps after its checkpoint: the later row wins.
    for line in lines:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # A line cut short by a kill.
        continue
      step = row.get("step", -1)
      if name in row and found_step <= step <= up_to_step:
        found, found_step = float(row[name]), step
    return found

  def write(self, step: int, scalars: dict[str, float]) -> None:
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
    self.writer.write_scalars(step, scalars)
    if not self._is_writer:
      return
    row = json.dumps({"step": step, **scalars})
    if self._jsonl is not None:
      self._jsonl.write(row + "\n")
      self._jsonl.flush()
    else:
      self._rows.append(row)
      # Through a fresh temporary object: a crash mid-write leaves the
      # previous file whole.
      temporary = self._path + ".tmp"
      if tf.io.gfile.exists(temporary):
        tf.io.gfile.remove(temporary)
      with tf.io.gfile.GFile(temporary, "w") as f:
        f.write("\n".join(self._rows) + "\n")
      tf.io.gfile.rename(temporary, self._path, overwrite=True)

  def close(self) -> None:
    self.writer.flush()
    self.writer.close()
    if self._jsonl is not None:
      self._jsonl.close()
