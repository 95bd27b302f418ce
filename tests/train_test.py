"""End to end: the smoke config trains, logs, checkpoints, resumes, evaluates."""

import json
import logging
import os
import re
import subprocess
import sys
import time

import jax
import pytest

import fake_fashion_mnist
from configs import smoke_fashion_mnist
from contrastive import train
from contrastive.data import fashion_mnist
from contrastive.evaluation import linear

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
  folder = tmp_path_factory.mktemp("fashion_mnist_src")
  fake_fashion_mnist.write(folder, num_train=96, num_test=40)
  return str(folder)


def _tiny_config(data_dir, method="simclr"):
  config = smoke_fashion_mnist.get_config(method)
  config.model.update(depth=10, width=0.125)
  config.model.head.update(hidden_dims=(32,), out_dim=16)
  config.input.update(data_dir=data_dir, batch_size=16, shuffle_buffer=96)
  config.total_steps = 4
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.linear_eval.update(batch_size=16, steps=20)
  return config


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _main(*args, env=None):
  return subprocess.run(
      [sys.executable, "-m", "contrastive.main", *args], cwd=REPO,
      capture_output=True, text=True, env={**os.environ, **(env or {})},
      timeout=600, check=False)


@pytest.mark.slow
def test_mistyped_config_key_fails_clearly(tmp_path):
  proc = _main("--config=configs/smoke_fashion_mnist.py:simclr",
               f"--workdir={tmp_path}", "--config.optim.lrr=0.1")
  assert proc.returncode != 0
  assert "lrr" in proc.stderr


@pytest.mark.slow
def test_command_line_trains_saves_evaluates_and_resumes(fake_data, tmp_path,
                                                         monkeypatch):
  """One run, as `make smoke` starts it, inspected for everything a finished
  run leaves; then resumed in-process on a longer schedule."""
  # SupCon, so that labels go through the pipeline into the loss; SimCLR's
  # whole run is the compile guard's below and the CLI's in resume_test.py.
  workdir = str(tmp_path / "run")
  data_dir = str(tmp_path / "tfds")
  proc = _main(
      "--config=configs/smoke_fashion_mnist.py:supcon",
      f"--workdir={workdir}", f"--config.input.data_dir={data_dir}",
      # `_tiny_config(data_dir, "supcon")`, flag by flag: the resume below
      # checks the recorded config against it.
      "--config.model.depth=10", "--config.model.width=0.125",
      "--config.model.head.hidden_dims=(32,)", "--config.model.head.out_dim=16",
      "--config.input.batch_size=16", "--config.input.shuffle_buffer=96",
      "--config.total_steps=4", "--config.log_every_steps=1",
      "--config.checkpoint_every_steps=2",
      "--config.linear_eval.batch_size=16", "--config.linear_eval.steps=20",
      env={fashion_mnist.ENV_VAR: fake_data,
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           # As `make smoke` passes it: the set-up counts from there.
           "CONTRASTIVE_STARTED_AT": str(time.time() - 600)})
  assert proc.returncode == 0, proc.stderr[-3000:]

  # The printed table, and last the time budget with every phase named.
  assert ("| representation | linear top-1 | linear top-5 | kNN top-1 (k=20) |"
          in proc.stdout)
  assert "| raw pixels (784-d) |" in proc.stdout
  assert "| frozen encoder (64-d) after 4 steps |" in proc.stdout
  last = proc.stdout.strip().splitlines()[-1]
  assert re.fullmatch(r"Time budget: set-up \d+\.\d min, training \d+\.\d min, "
                      r"evaluation \d+\.\d min, total \d+\.\d min", last), last
  with open(os.path.join(workdir, "time_budget.json")) as f:
    budget = json.load(f)
  assert set(budget) == {"setup", "training", "evaluation", "total"}
  assert budget["setup"] >= 600 and budget["training"] > 0
  assert budget["evaluation"] > 0
  assert budget["total"] == pytest.approx(
      budget["setup"] + budget["training"] + budget["evaluation"])

  # Checkpoints, metrics and the evaluation record.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  rows = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  for key in ("loss", "learning_rate", "contrastive_acc", "images_per_sec"):
    assert key in rows[-1]
  assert all(r["loss"] > 0 for r in rows)
  with open(os.path.join(workdir, "linear_eval.json")) as f:
    evaluation = json.load(f)
  assert evaluation["dataset"] == "fashion_mnist_idx"
  assert evaluation["split"] == "test"
  assert evaluation["num_test"] == 40
  assert evaluation["step"] == 4
  assert 0.0 <= evaluation["top1"] <= evaluation["top5"] <= 1.0
  assert "raw_pixels" in evaluation

  # Same workdir, longer schedule: continues from step 4, does not restart.
  monkeypatch.setenv(fashion_mnist.ENV_VAR, fake_data)
  config = _tiny_config(data_dir, "supcon")
  config.total_steps = 6
  result = train.train_and_evaluate(config, workdir)
  assert result["step"] == 6
  rows = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert "6" in os.listdir(os.path.join(workdir, "checkpoints"))

  # Finished: started again, it returns what it recorded, evaluating nothing.
  with open(os.path.join(workdir, "linear_eval.json")) as f:
    recorded = json.load(f)
  evaluated = []
  monkeypatch.setattr(linear, "evaluate",
                      lambda *args: evaluated.append(args) or recorded)
  again = train.train_and_evaluate(config, workdir)
  assert not evaluated
  assert again["step"] == 6 and again["linear_eval"] == recorded
  assert again["train"] == rows[-1]
  assert len(_read_jsonl(os.path.join(workdir, "metrics.jsonl"))) == 6
  config.reevaluate = True  # Unless asked to evaluate it again.
  train.train_and_evaluate(config, workdir)
  assert len(evaluated) == 1


@pytest.mark.slow
def test_esupcon_trains_its_prototypes_and_scores_them(fake_data, tmp_path,
                                                      monkeypatch):
  monkeypatch.setenv(fashion_mnist.ENV_VAR, fake_data)
  workdir = str(tmp_path / "run")
  config = _tiny_config(str(tmp_path / "tfds"), "esupcon")
  config.linear_eval.enabled = False
  result = train.train_and_evaluate(config, workdir)
  rows = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert all(0.0 <= r["prototype_top1"] <= 1.0 for r in rows)
  with open(os.path.join(workdir, "classifier_eval.json")) as f:
    evaluation = json.load(f)
  assert evaluation == result["classifier"]
  assert evaluation["num_test"] == 40 and 0.0 <= evaluation["top1"] <= 1.0
  # A prototype count other than the number of classes is refused.
  config.model.num_prototypes = 3
  with pytest.raises(ValueError, match="num_prototypes=3 must be the number"):
    train.train_and_evaluate(config, str(tmp_path / "bad"))


@pytest.mark.slow
def test_moco_with_views_finished_on_device_resumes_exactly(fake_data,
                                                            tmp_path,
                                                            monkeypatch):
  # The key encoder and the queue are checkpointed with the state, and with
  # input.augment.on_device the step does jitter and blur from the
  # pipeline's per-view keys (small views' too): a resumed run replays the
  # same losses.
  monkeypatch.setenv(fashion_mnist.ENV_VAR, fake_data)
  config = _tiny_config(str(tmp_path / "tfds"), "moco")
  # Constant momentum: the cosine one depends on total_steps, which the
  # first, shorter run below sets to 2.
  config.momentum.update(queue_size=48, schedule="constant")
  config.input.augment.update(on_device=True, blur_prob=0.5)
  # Two multi-crop small views, also finished on the device.
  config.input.update(small_views=2, small_image_size=14,
                      small_crop_area=(0.1, 0.3))
  config.linear_eval.enabled = False
  config.online_eval.every_steps = 0
  straight = str(tmp_path / "straight")
  train.train_and_evaluate(config, straight)
  config.total_steps = 2
  resumed = str(tmp_path / "resumed")
  train.train_and_evaluate(config, resumed)
  config.total_steps = 4
  train.train_and_evaluate(config, resumed)
  rows = [_read_jsonl(os.path.join(d, "metrics.jsonl"))
          for d in (straight, resumed)]
  losses = [[r["loss"] for r in run] for run in rows]
  assert len(losses[0]) == 4 and all(loss > 0 for loss in losses[0])
  assert losses[0] == losses[1]
  assert ([r["ema_momentum"] for r in rows[0]]
          == [r["ema_momentum"] for r in rows[1]])
  # The resumed process's training clock continues from the checkpoint's.
  resumed_times = [r["train_time_sec"] for r in rows[1]]
  assert resumed_times == sorted(resumed_times), resumed_times


@pytest.mark.slow
def test_train_step_compiles_once_across_steps(fake_data, tmp_path,
                                               monkeypatch, caplog):
  """The loop's jitted step is lowered once: the state it returns (donated,
  resharded, restored) must match the signature of the state it took, or
  every step after the first recompiles (and the throughput's cost analysis
  would compile a third program)."""
  monkeypatch.setenv(fashion_mnist.ENV_VAR, fake_data)
  config = _tiny_config(str(tmp_path / "tfds"))
  config.linear_eval.enabled = False
  config.online_eval.every_steps = 0
  config.total_steps = 3
  with jax.log_compiles(), caplog.at_level(logging.WARNING, logger="jax"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  lowered = [r.getMessage() for r in caplog.records
             if r.getMessage().startswith("Compiling jit(guarded) ")]
  assert len(lowered) == 1, "\n\n".join(lowered)
