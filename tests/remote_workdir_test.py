"""Workdirs on buckets: paths stay URLs, files go through tf.io.gfile.

TF's in-memory `ram://` file system stands in for gs://: like a bucket it
is not a local path and `open()` cannot reach it.
"""

import os

from clu import metric_writers
import ml_collections
import tensorflow as tf

from contrastive import checkpoint
from contrastive import metric_logging
from contrastive import run_dir


def test_checkpoint_directory_keeps_urls():
  assert (checkpoint.checkpoint_directory("gs://bucket/run")
          == "gs://bucket/run/checkpoints")
  assert checkpoint.checkpoint_directory("run") == os.path.join(
      os.getcwd(), "run", "checkpoints")


def test_metrics_on_a_bucket_survive_a_restart(monkeypatch):
  # clu's TensorBoard writer resolves paths with etils, which has no ram://.
  monkeypatch.setattr(metric_writers, "create_default_writer",
                      lambda *a, **k: metric_writers.LoggingWriter())
  workdir = "ram://bucket/metrics_run"
  run_dir.ensure_writable(workdir)
  logger = metric_logging.MetricLogger(workdir)
  logger.write(1, {"loss": 1.0})
  logger.write(2, {"loss": 0.5})
  logger.close()
  logger = metric_logging.MetricLogger(workdir)  # A resumed run.
  logger.write(3, {"loss": 0.25})
  logger.close()
  with tf.io.gfile.GFile(workdir + "/metrics.jsonl") as f:
    rows = f.read().splitlines()
  assert [row.split(",")[0] for row in rows] == [
      '{"step": 1', '{"step": 2', '{"step": 3']


def test_config_record_on_a_bucket():
  workdir = "ram://bucket/config_run"
  run_dir.ensure_writable(workdir)
  config = ml_collections.ConfigDict(dict(seed=0, resume="auto"))
  run_dir.check_config(workdir, config, has_checkpoint=False)
  assert tf.io.gfile.exists(workdir + "/" + run_dir.CONFIG_FILE)
  config.seed = 1
  try:
    run_dir.check_config(workdir, config, has_checkpoint=True)
  except run_dir.ConfigMismatchError as e:
    assert "seed: 0 -> 1" in str(e)
  else:
    raise AssertionError("a different config was resumed")
