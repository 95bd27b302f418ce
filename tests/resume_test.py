"""Interrupted runs: SIGKILL and SIGTERM mid-run, and corrupt checkpoints.

The end-to-end tests run the real command line as a subprocess, interrupt it,
run the same command again, and require the result to be bitwise the run that
was never interrupted: final parameters, batch statistics and optimizer
state, and every logged metric at every step (timings aside).
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import fake_fashion_mnist
from contrastive import checkpoint
from contrastive import momentum as momentum_lib
from contrastive import result_table
from contrastive import state as state_lib
from contrastive import throughput
from contrastive.data import fashion_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 15  # Leaves steps to run after the last kill point.
CHECKPOINT_EVERY = 3
# Metrics that measure time, not the computation.
_TIMING_KEYS = ("train_time_sec", "online/eval_seconds",
                *throughput.TIMING_METRICS)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """(FASHION_MNIST_DIR, TFDS data_dir) with 256 fake training images."""
  source = tmp_path_factory.mktemp("fashion_mnist_src")
  fake_fashion_mnist.write(source, num_train=256, num_test=16)
  return str(source), str(tmp_path_factory.mktemp("tfds"))


def _command(workdir, data_dir):
  return [
      sys.executable, "-m", "contrastive.main",
      "--config=configs/smoke_fashion_mnist.py:simclr",
      f"--workdir={workdir}", f"--config.input.data_dir={data_dir}",
      f"--config.total_steps={TOTAL_STEPS}", "--config.input.batch_size=32",
      "--config.model.depth=10", "--config.model.width=0.125",
      "--config.model.head.hidden_dims=(32,)",
      "--config.model.head.out_dim=16", "--config.log_every_steps=1",
      f"--config.checkpoint_every_steps={CHECKPOINT_EVERY}",
      "--config.linear_eval.enabled=False"]


def _env(source):
  return {**os.environ, fashion_mnist.ENV_VAR: source,
          "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
          "JAX_PLATFORMS": "cpu"}


def _run(workdir, data):
  proc = subprocess.run(_command(workdir, data[1]), cwd=REPO,
                        env=_env(data[0]), capture_output=True, text=True,
                        timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _start(workdir, data, log_path):
  with open(log_path, "w") as log:
    return subprocess.Popen(_command(workdir, data[1]), cwd=REPO,
                            env=_env(data[0]), stdout=log,
                            stderr=subprocess.STDOUT)


def _rows(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    # The last line may be half-written when the process is killed.
    lines = f.read().split("\n")[:-1]
  return [json.loads(line) for line in lines]


def _checkpoint_steps(workdir):
  folder = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(folder):
    return []
  return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def _wait_for_step(proc, workdir, step, timeout=300):
  """Waits until `step` is logged and its last checkpoint is complete.

  The process runs on meanwhile, so where it stops is wherever it is when
  the signal lands: mid-step, mid-save or between steps.
  """
  checkpoint_due = step // CHECKPOINT_EVERY * CHECKPOINT_EVERY
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    assert proc.poll() is None, "The run ended before it could be stopped."
    rows, saved = _rows(workdir), _checkpoint_steps(workdir)
    if rows and rows[-1]["step"] >= step and saved and saved[-1] >= (
        checkpoint_due):
      return rows[-1]["step"]
    time.sleep(0.05)
  proc.kill()
  raise TimeoutError(f"Step {step} was not reached in {timeout}s.")


def _final_arrays(workdir):
  path = os.path.join(workdir, "checkpoints", str(TOTAL_STEPS), "default")
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(path)
  return jax.tree_util.tree_flatten_with_path(jax.device_get(restored))[0]


def _assert_same_run(workdir, reference):
  """Bitwise-equal final state, and equal metrics at every logged step."""
  expected = {row["step"]: row for row in _rows(reference)}
  rows = _rows(workdir)
  assert {row["step"] for row in rows} == set(range(1, TOTAL_STEPS + 1))
  for row in rows:  # Steps logged twice (before and after a kill) included.
    want = expected[row["step"]]
    for key, value in row.items():
      if key not in _TIMING_KEYS:
        np.testing.assert_equal(value, want[key], err_msg=f"{key} @ {row}")
  actual, wanted = _final_arrays(workdir), _final_arrays(reference)
  assert [path for path, _ in actual] == [path for path, _ in wanted]
  for (path, a), (_, b) in zip(actual, wanted):
    assert a.dtype == b.dtype and a.shape == b.shape, path
    assert a.tobytes() == b.tobytes(), f"{jax.tree_util.keystr(path)} differs"


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
  """The uninterrupted run, shared by every interrupted one."""
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  _run(workdir, data)
  assert _checkpoint_steps(workdir)[-1] == TOTAL_STEPS
  return workdir


@pytest.mark.slow
def test_sigkill_then_rerun_is_bitwise_the_uninterrupted_run(
    data, reference, tmp_path):
  # Mid-way between two checkpoints (3 and 6 are saved, 9 is due): the kill
  # lands wherever the run is then, mid-step, mid-save or between steps.
  workdir = str(tmp_path / "run")
  proc = _start(workdir, data, tmp_path / "killed.log")
  killed_at = _wait_for_step(proc, workdir, 7)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  resumed_from = _checkpoint_steps(workdir)[-1]
  print(f"killed after step {killed_at}, resuming from step {resumed_from}")
  assert 0 < resumed_from < TOTAL_STEPS
  _run(workdir, data)
  _assert_same_run(workdir, reference)


def _temporary_checkpoints(workdir):
  folder = os.path.join(workdir, "checkpoints")
  return sorted(name for name in os.listdir(folder)
                if ".orbax-checkpoint-tmp" in name)


@pytest.mark.slow
def test_sigkill_during_an_asynchronous_checkpoint_write(data, reference,
                                                         tmp_path):
  """Killed while step 6's checkpoint is written in the background (its
  commit held back, tests/slow_checkpoint_commit.py) and training has gone
  on past it: the rerun discards the partial checkpoint, resumes from step 3
  and is bitwise the uninterrupted run."""
  workdir = str(tmp_path / "run")
  pending = 2 * CHECKPOINT_EVERY
  command = [sys.executable, os.path.join(REPO, "tests",
                                          "slow_checkpoint_commit.py"),
             *_command(workdir, data[1])[3:]]
  env = {**_env(data[0]), "PYTHONPATH": REPO,
         "SLOW_COMMIT_STEP": str(pending)}
  with open(tmp_path / "killed.log", "w") as log:
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 300
    while not (_rows(workdir) and _rows(workdir)[-1]["step"] > pending
               and os.path.isdir(os.path.join(workdir, "checkpoints"))
               and _temporary_checkpoints(workdir)):
      assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
      assert time.monotonic() < deadline, "The write was never in flight."
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert _temporary_checkpoints(workdir) == [
      f"{pending}.orbax-checkpoint-tmp"], os.listdir(workdir)
  assert _checkpoint_steps(workdir)[-1] == CHECKPOINT_EVERY
  _run(workdir, data)
  assert not _temporary_checkpoints(workdir)
  _assert_same_run(workdir, reference)


@pytest.mark.slow
def test_sigterm_checkpoints_exits_zero_and_resumes_exactly(
    data, reference, tmp_path):
  workdir = str(tmp_path / "run")
  log_path = tmp_path / "preempted.log"
  proc = _start(workdir, data, log_path)
  _wait_for_step(proc, workdir, 4)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0
  output = log_path.read_text()
  assert "Preempted: checkpointed step" in output
  stopped_at = _rows(workdir)[-1]["step"]
  assert stopped_at < TOTAL_STEPS
  # The step in flight finished and was checkpointed, not only the last
  # periodic checkpoint.
  assert _checkpoint_steps(workdir)[-1] == stopped_at
  _run(workdir, data)
  _assert_same_run(workdir, reference)


def test_empty_queue_is_checkpointed_and_restored_with_the_rest(tmp_path):
  # RenyiCL runs with momentum.queue_size=0 (batch keys only); Orbax refuses
  # to write zero-element arrays, which once ended such a run at its first
  # checkpoint.
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  empty = momentum_lib.init_queue(0, 16, jax.random.key(1))
  full = momentum_lib.init_queue(8, 16, jax.random.key(2))
  state = _state(4, 4.0).replace(momentum={
      "queue": jax.device_put(empty, replicated),
      "params": {"kernel": jnp.arange(6.0).reshape(2, 3)}, "other": full})
  manager = checkpoint.create_manager(str(tmp_path), keep=2)
  checkpoint.save(manager, state)
  manager.wait_until_finished()
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      state)
  restored = checkpoint.restore_latest(manager, abstract)
  manager.close()
  assert int(restored.step) == 4
  queue = restored.momentum["queue"]
  assert queue.keys.shape == (0, 16) and queue.keys.dtype == jnp.float32
  assert queue.labels.shape == (0,) and queue.labels.dtype == jnp.int32
  assert queue.keys.sharding == replicated
  assert int(queue.pointer) == 0
  np.testing.assert_array_equal(restored.momentum["other"].keys, full.keys)
  np.testing.assert_array_equal(restored.momentum["params"]["kernel"],
                                np.arange(6.0).reshape(2, 3))
  np.testing.assert_array_equal(restored.params["dense"]["kernel"],
                                np.full((4, 3), 4.0))
  # A model whose queue is not empty still refuses this checkpoint.
  manager = checkpoint.create_manager(str(tmp_path), keep=2)
  bigger = abstract.replace(momentum=dict(
      abstract.momentum, queue=jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(
              (32,) + x.shape[1:] if x.ndim else x.shape, x.dtype),
          abstract.momentum["queue"])))
  with pytest.raises(checkpoint.IncompatibleCheckpointError,
                     match="momentum/queue/keys: missing from checkpoint"):
    checkpoint.restore_latest(manager, bigger)
  manager.close()


# Corrupt checkpoints (no training: a small state saved directly).


def _state(step: int, value: float) -> state_lib.TrainState:
  params = {"dense": {"kernel": jnp.full((4, 3), value),
                      "bias": jnp.zeros(3)}}
  return state_lib.TrainState(
      step=jnp.asarray(step, jnp.int32), params=params, batch_stats={},
      opt_state=optax.sgd(0.1, momentum=0.9).init(params))


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _save_steps(workdir, steps):
  manager = checkpoint.create_manager(workdir, keep=5)
  for step in steps:
    checkpoint.save(manager, _state(step, float(step)))
    manager.wait_until_finished()
  return manager


def _corrupt(step_dir, how):
  for root, _, files in os.walk(step_dir):
    for name in files:
      path = os.path.join(root, name)
      if how == "truncate":
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)
      elif how == "garbage":
        with open(path, "wb") as f:
          f.write(os.urandom(max(os.path.getsize(path), 16)))
      elif how == "empty":
        os.remove(path)


@pytest.mark.parametrize("how", ["truncate", "garbage", "empty"])
def test_corrupt_latest_checkpoint_falls_back_with_a_warning(
    tmp_path, how, caplog):
  workdir = str(tmp_path)
  _save_steps(workdir, [3, 6]).close()
  bad_dir = os.path.join(workdir, "checkpoints", "6")
  _corrupt(bad_dir, how)
  manager = checkpoint.create_manager(workdir, keep=5)
  with caplog.at_level("INFO"):
    state = checkpoint.restore_latest(manager, _abstract(_state(0, 0.0)))
  assert int(state.step) == 3
  # The result table reads the resumed step from this log to time the run.
  assert result_table.restored_step(caplog.text) == 3
  np.testing.assert_array_equal(state.params["dense"]["kernel"],
                                np.full((4, 3), 3.0))
  assert any(bad_dir in r.getMessage() and "unreadable" in r.getMessage()
             for r in caplog.records), caplog.text
  # The bad one is kept aside for inspection; the good one is untouched.
  assert os.listdir(os.path.join(workdir, checkpoint.CORRUPT_DIR))
  assert manager.all_steps() == [3]
  # Training on saves step 6 again, in place of the corrupt one.
  checkpoint.save(manager, _state(6, 6.0))
  manager.wait_until_finished()
  assert manager.all_steps() == [3, 6]
  manager.close()


def test_only_corrupt_checkpoints_refuse_to_start_from_scratch(tmp_path):
  workdir = str(tmp_path)
  _save_steps(workdir, [2]).close()
  _corrupt(os.path.join(workdir, "checkpoints", "2"), "garbage")
  manager = checkpoint.create_manager(workdir, keep=5)
  with pytest.raises(checkpoint.NoUsableCheckpointError,
                     match="refusing to start from scratch"):
    checkpoint.restore_latest(manager, _abstract(_state(0, 0.0)))
  manager.close()
