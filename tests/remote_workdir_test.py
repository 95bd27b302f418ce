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
  assert logger.last_value("loss", up_to_step=2) == 0.5
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


def test_last_value_is_the_newest_row_up_to_a_step(tmp_path, monkeypatch):
  monkeypatch.setattr(metric_writers, "create_default_writer",
                      lambda *a, **k: metric_writers.LoggingWriter())
  workdir = str(tmp_path)
  logger = metric_logging.MetricLogger(workdir)
  assert logger.last_value("train_time_sec", up_to_step=10) is None
  # A first process logs steps 2..6 and is killed; a second one, resumed
  # from the step-4 checkpoint, logs 6 and 8 again.
  for step, seconds in [(2, 1.0), (4, 2.0), (6, 3.0), (6, 2.5), (8, 3.5)]:
    logger.write(step, {"train_time_sec": seconds, "loss": 1.0 / step})
  logger.write(8, {"knn": 0.5})  # An evaluation row without the name.
  logger.close()
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 9, "train_ti')  # Cut short by a kill.
  logger = metric_logging.MetricLogger(workdir)
  assert logger.last_value("train_time_sec", up_to_step=4) == 2.0
  assert logger.last_value("train_time_sec", up_to_step=5) == 2.0
  assert logger.last_value("train_time_sec", up_to_step=6) == 2.5
  assert logger.last_value("train_time_sec", up_to_step=100) == 3.5
  assert logger.last_value("train_time_sec", up_to_step=1) is None
  assert logger.last_value("missing", up_to_step=100) is None
  logger.close()
