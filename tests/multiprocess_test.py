r"""Multi-process runs on one machine: 2 JAX processes x 4 CPU devices.

The processes talk through `jax.distributed` (gloo CPU collectives), as the
hosts of a TPU pod do through the TPU runtime. Two checks:

* Equality: the real jitted `train.train_step`, fed the same fixed global
  batches, gives the same losses and final parameters on 2 processes x 4
  devices as on 1 process x 8 devices. Each process passes only its own rows
  of the global batch (`sharding.make_global_batch`), so this also checks
  that the global batch is the concatenation of the processes' rows in
  process order.
* The real CLI (`python -m contrastive.main`) on 2 processes trains, writes
  metrics from process 0 only, checkpoints collectively, and resumes from
  the saved step.

This file is also the per-process driver of the equality check:
  python tests/multiprocess_test.py --out=DIR [--coordinator_address=HOST:PORT
      --num_processes=2 --process_id=I]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES = 2
GLOBAL_BATCH = 16
STEPS = 3
# Only a guard against a hung rendezvous or collective, which would wait
# forever: generous, not tight. The CLI test takes about 60 s alone on 2 idle
# cores and ran past a 300 s deadline on a loaded machine; 1,200 s is 20 times
# its idle time.
TIMEOUT_S = 1200


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int, **extra) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             CUDA_VISIBLE_DEVICES="", PYTHONPATH=REPO, **extra)
  return env


def _tiny_config(data_dir=None):
  # Imported here: the driver must not pull in JAX users before it has
  # initialised `jax.distributed`.
  from configs import smoke_fashion_mnist  # pylint: disable=g-import-not-at-top
  config = smoke_fashion_mnist.get_config("supcon")
  config.model.update(depth=10, width=0.125)
  config.model.head.update(hidden_dims=(32,), out_dim=16)
  # Pinned, not the smoke run's: at tau 0.2 one near-zero BN bias (2e-4)
  # lands 7e-5 apart after the steps, from the order of the cross-process
  # reductions alone, beyond the tolerance below.
  config.loss.temperature = 0.1
  config.input.update(data_dir=data_dir, batch_size=GLOBAL_BATCH,
                      shuffle_buffer=96)
  config.optim.update(lr=0.5, warmup_epochs=0.0)
  config.total_steps = STEPS
  config.linear_eval.enabled = False
  return config


def _run_processes(commands: list[list[str]], envs: list[dict[str, str]]
                   ) -> list[subprocess.CompletedProcess]:
  """Starts all commands at once (they rendezvous), waits for all of them.

  Output goes to files, not pipes: a peer blocked on a full pipe would stall
  the collectives of the others. If one process fails, the rest (which would
  wait for it forever) are killed.
  """
  timed_out = False
  with tempfile.TemporaryDirectory() as logs:
    outputs, procs = [], []
    try:
      for i, (cmd, env) in enumerate(zip(commands, envs)):
        out = open(os.path.join(logs, f"{i}.out"), "w+")
        err = open(os.path.join(logs, f"{i}.err"), "w+")
        outputs.append((out, err))
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, text=True,
                                      stdout=out, stderr=err))
      deadline = time.monotonic() + TIMEOUT_S
      while time.monotonic() < deadline:
        codes = [proc.poll() for proc in procs]
        if None not in codes or any(code for code in codes):
          break
        time.sleep(0.5)
      else:
        timed_out = True
    finally:
      for proc in procs:  # A hung or orphaned peer must not outlive the test.
        if proc.poll() is None:
          proc.kill()
        proc.wait()
    results = []
    for cmd, proc, (out, err) in zip(commands, procs, outputs):
      out.seek(0)
      err.seek(0)
      results.append(subprocess.CompletedProcess(cmd, proc.returncode,
                                                 out.read(), err.read()))
      out.close()
      err.close()
  if timed_out:
    raise TimeoutError(
        f"The {len(procs)} processes did not finish in {TIMEOUT_S} s (a hung "
        "rendezvous or collective?); their last stderr:\n" + "\n".join(
            f"[{i}] {r.stderr[-2000:]}" for i, r in enumerate(results)))
  return results


def _check_ok(results):
  for i, result in enumerate(results):
    assert result.returncode == 0, (
        f"process {i} failed:\n{result.stderr[-4000:]}")


def _driver(out: str, coordinator: str | None, num_processes: int,
            process_id: int) -> None:
  """Trains STEPS steps on fixed global batches; saves losses and params."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  if coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=num_processes,
                               process_id=process_id)
  # pylint: disable=g-import-not-at-top
  from contrastive import losses
  from contrastive import models
  from contrastive import optim
  from contrastive import sharding
  from contrastive import state as state_lib
  from contrastive import train
  # pylint: enable=g-import-not-at-top

  assert jax.process_count() == num_processes and jax.device_count() == 8
  config = _tiny_config()
  mesh = sharding.make_mesh(config.mesh)
  model = models.create(config.model)
  schedule = optim.learning_rate_schedule(config.optim, GLOBAL_BATCH, STEPS, 0)
  tx = optim.create(config.optim, schedule)
  image_shape = (28, 28, 1)
  state = state_lib.create_train_state(model, tx, jax.random.key(config.seed),
                                       image_shape, mesh)
  # Built as `train.train_and_evaluate` builds it.
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  step_fn = jax.jit(
      functools.partial(train.train_step, model=model, tx=tx,
                        loss_fn=losses.get_with_metrics(config.loss.name),
                        loss_config=config.loss, schedule=schedule,
                        grad_cache_chunks=config.get("grad_cache_chunks", 0)),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=0)

  rng = np.random.default_rng(0)
  local = GLOBAL_BATCH // num_processes
  rows = slice(process_id * local, (process_id + 1) * local)
  step_losses = []
  with jax.set_mesh(mesh):
    for _ in range(STEPS):
      images = rng.random((GLOBAL_BATCH, 2, *image_shape), dtype=np.float32)
      labels = rng.integers(0, 4, GLOBAL_BATCH).astype(np.int32)
      batch = sharding.make_global_batch(
          mesh, {"image": images[rows], "label": labels[rows]})
      state, metrics = step_fn(state, batch)
      step_losses.append(float(metrics["loss"]))
  # Replicated: this process's first shard is the whole value.
  leaves = jax.tree_util.tree_flatten_with_path(
      {"params": state.params, "batch_stats": state.batch_stats})[0]
  arrays = {jax.tree_util.keystr(path): np.asarray(leaf.addressable_data(0))
            for path, leaf in leaves}
  np.savez(os.path.join(out, f"process{process_id}.npz"),
           __loss__=np.asarray(step_losses), **arrays)


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
  driver = [sys.executable, os.path.abspath(__file__)]
  single, multi = tmp_path / "single", tmp_path / "multi"
  single.mkdir()
  multi.mkdir()
  _check_ok(_run_processes([driver + [f"--out={single}"]], [_env(8)]))

  coordinator = f"localhost:{_free_port()}"
  _check_ok(_run_processes(
      [driver + [f"--out={multi}", f"--coordinator_address={coordinator}",
                 f"--num_processes={NUM_PROCESSES}", f"--process_id={i}"]
       for i in range(NUM_PROCESSES)],
      [_env(4)] * NUM_PROCESSES))

  expected = np.load(single / "process0.npz")
  assert np.all(np.isfinite(expected["__loss__"]))
  for i in range(NUM_PROCESSES):
    got = np.load(multi / f"process{i}.npz")
    assert sorted(got.files) == sorted(expected.files)
    # Only the order of floating-point reductions may differ. BatchNorm
    # biases follow gradients that are sums with heavy cancellation: after 3
    # steps one moved by 2.7e-5 (of 0.0099) on an Intel Xeon.
    np.testing.assert_allclose(got["__loss__"], expected["__loss__"],
                               rtol=1e-5)
    for name in expected.files:
      np.testing.assert_allclose(got[name], expected[name], rtol=1e-4,
                                 atol=1e-4, err_msg=name)


def _initialize_calls(monkeypatch, on_tpu_vm: bool, **flag_values):
  """What `main._initialize_distributed` passes to jax.distributed."""
  # pylint: disable=g-import-not-at-top
  from absl import flags
  from absl.testing import flagsaver
  import jax
  from jax._src import cloud_tpu_init
  from contrastive import main
  # pylint: enable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda **kwargs: calls.append(kwargs))
  monkeypatch.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", on_tpu_vm)
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(**flag_values):
    main._initialize_distributed()  # pylint: disable=protected-access
  return calls


def test_tpu_vm_initializes_from_tpu_metadata(monkeypatch):
  assert _initialize_calls(monkeypatch, on_tpu_vm=True) == [{}]


def test_no_cluster_no_initialize(monkeypatch):
  assert _initialize_calls(monkeypatch, on_tpu_vm=False) == []


def test_explicit_coordinator_uses_gloo_on_cpu(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  calls = _initialize_calls(monkeypatch, on_tpu_vm=False,
                            coordinator_address="10.0.0.1:1234",
                            num_processes=4, process_id=3)
  assert calls == [dict(coordinator_address="10.0.0.1:1234", num_processes=4,
                        process_id=3)]
  assert jax.config.jax_cpu_collectives_implementation == "gloo"


@pytest.fixture(scope="module")
def prepared_data(tmp_path_factory):
  """A prepared fake Fashion-MNIST: (FASHION_MNIST_DIR, TFDS data_dir)."""
  # pylint: disable=g-import-not-at-top
  import fake_fashion_mnist
  from contrastive.data import fashion_mnist
  from contrastive.data import input_pipeline
  # pylint: enable=g-import-not-at-top
  source = tmp_path_factory.mktemp("fashion_mnist_src")
  fake_fashion_mnist.write(source, num_train=96, num_test=16)
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  # Prepared once here, so the processes do not race to build it.
  old = os.environ.get(fashion_mnist.ENV_VAR)
  os.environ[fashion_mnist.ENV_VAR] = str(source)
  try:
    input_pipeline.dataset_info("fashion_mnist_idx", data_dir)
  finally:
    if old is None:
      del os.environ[fashion_mnist.ENV_VAR]
    else:
      os.environ[fashion_mnist.ENV_VAR] = old
  return str(source), data_dir


def _main_on_two_processes(workdir, data, total_steps):
  source, data_dir = data
  coordinator = f"localhost:{_free_port()}"
  commands = [
      [sys.executable, "-m", "contrastive.main",
       "--config=configs/smoke_fashion_mnist.py:supcon",
       f"--workdir={workdir}", f"--coordinator_address={coordinator}",
       f"--num_processes={NUM_PROCESSES}", f"--process_id={i}",
       f"--config.input.data_dir={data_dir}",
       f"--config.input.batch_size={GLOBAL_BATCH}",
       "--config.input.shuffle_buffer=48", "--config.model.depth=10",
       "--config.model.width=0.125",
       "--config.model.head.hidden_dims=(32,)",
       "--config.model.head.out_dim=16", "--config.linear_eval.enabled=False",
       f"--config.total_steps={total_steps}", "--config.log_every_steps=1",
       "--config.checkpoint_every_steps=1000"]
      for i in range(NUM_PROCESSES)]
  # pylint: disable-next=g-import-not-at-top
  from contrastive.data import fashion_mnist
  results = _run_processes(
      commands, [_env(4, **{fashion_mnist.ENV_VAR: source})] * NUM_PROCESSES)
  _check_ok(results)
  return results


def _metric_steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f]


@pytest.mark.slow
def test_cli_two_processes_checkpoint_and_resume(prepared_data, tmp_path):
  workdir = str(tmp_path / "run")
  _main_on_two_processes(workdir, prepared_data, total_steps=2)
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
  # Process 0 alone writes metrics: one row per step, not one per process.
  assert _metric_steps(workdir) == [1, 2]

  results = _main_on_two_processes(workdir, prepared_data, total_steps=4)
  for result in results:
    assert "Restoring checkpoint of step 2" in result.stderr
    assert "JAX process" in result.stderr and "/2, 4 local / 8 global" in (
        result.stderr)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  assert _metric_steps(workdir) == [1, 2, 3, 4]


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--out", required=True)
  parser.add_argument("--coordinator_address")
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  flags = parser.parse_args()
  _driver(flags.out, flags.coordinator_address, flags.num_processes,
          flags.process_id)
