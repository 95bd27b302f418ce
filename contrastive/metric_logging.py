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


class MetricLogger:
  """Writes scalars to TensorBoard event files and a JSON-lines file."""

  def __init__(self, workdir: str):
    self._is_writer = jax.process_index() == 0
    self.writer = metric_writers.create_default_writer(
        workdir, just_logging=not self._is_writer)
    self._jsonl = (open(os.path.join(workdir, "metrics.jsonl"), "a")
                   if self._is_writer else None)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
    self.writer.write_scalars(step, scalars)
    if self._jsonl is not None:
      self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
      self._jsonl.flush()

  def close(self) -> None:
    self.writer.flush()
    self.writer.close()
    if self._jsonl is not None:
      self._jsonl.close()
