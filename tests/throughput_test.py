"""Peak FLOP/s (table, probe, cache), step FLOPs, input-wait timer, metrics."""

import json
import math
import os
import time
import types

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

import fake_fashion_mnist
from configs import smoke_fashion_mnist
from contrastive import throughput
from contrastive import train
from contrastive.data import fashion_mnist


@pytest.mark.parametrize("kind, peak", [
    ("TPU v4", 275e12),
    ("TPU v3", 123e12 / 2),  # Two TensorCores, i.e. two JAX devices, a chip.
    ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-40GB", 312e12),
    ("cpu", None),
    ("TPU v99", None),
])
def test_peak_table_lookup(kind, peak):
  assert throughput.peak_flops_from_table(kind) == peak


def test_table_kinds_are_not_probed(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

  def probe(devices):
    raise AssertionError(f"Probed {devices}, a kind in the table.")

  monkeypatch.setattr(throughput, "measure_peak_flops", probe)
  tpu = types.SimpleNamespace(device_kind="TPU v5 lite", platform="tpu")
  assert throughput.peak_flops_per_device([tpu]) == 197e12
  assert not os.listdir(tmp_path)


def test_probe_returns_a_positive_finite_rate():
  flops = throughput.measure_peak_flops(jax.local_devices(), size=128,
                                        repeats=2)
  assert math.isfinite(flops) and flops > 0


def _counting_small_probe(monkeypatch):
  calls = []
  probe = throughput.measure_peak_flops

  def small_probe(devices):
    calls.append(len(devices))
    return probe(devices, size=128, repeats=2)

  monkeypatch.setattr(throughput, "measure_peak_flops", small_probe)
  return calls


def test_cpu_peak_is_measured_once_then_read_from_the_cache(tmp_path,
                                                            monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  calls = _counting_small_probe(monkeypatch)
  devices = jax.local_devices()
  first = throughput.peak_flops_per_device(devices)
  assert math.isfinite(first) and first > 0
  path = tmp_path / "contrastive" / "peak_flops.json"
  assert path == type(path)(throughput.default_cache_path())
  (key, host_peak), = json.loads(path.read_text()).items()
  assert key.startswith("cpu, ") and key.endswith(" host cores")
  # The host's rate, shared equally by the simulated devices.
  assert first == host_peak / len(devices)

  assert throughput.peak_flops_per_device(devices) == first
  assert calls == [len(devices)]  # The second call read the cache.


def test_unreadable_cache_is_measured_again(tmp_path, monkeypatch):
  path = tmp_path / "peak.json"
  path.write_text("{not json")
  calls = _counting_small_probe(monkeypatch)
  peak = throughput.peak_flops_per_device(cache_path=str(path))
  assert peak > 0 and len(calls) == 1
  assert len(json.loads(path.read_text())) == 1


def test_flops_of_a_compiled_matmul_are_2mnk():
  m, k, n = 64, 32, 16
  matmul = jax.jit(jnp.matmul)
  a, b = jnp.ones((m, k)), jnp.ones((k, n))
  matmul(a, b)
  assert throughput.flops_per_device(matmul, a, b) == 2 * m * n * k


def test_flops_of_a_sharded_step_are_per_device():
  devices = jax.devices()
  mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
  m, k, n = 64 * len(devices), 32, 16
  a = jax.device_put(jnp.ones((m, k)), NamedSharding(mesh, P("data")))
  b = jax.device_put(jnp.ones((k, n)), NamedSharding(mesh, P()))
  flops = throughput.flops_per_device(jax.jit(jnp.matmul), a, b)
  assert flops == 2 * m * n * k / len(devices)


def _slow_batches(wait):
  while True:
    time.sleep(wait)
    yield np.zeros(2)


def test_timer_splits_input_wait_from_the_rest():
  wait, work, steps = 0.03, 0.02, 4
  batches = _slow_batches(wait)
  timer = throughput.StepTimer()
  for _ in range(steps):
    timer.next_batch(batches)
    time.sleep(work)  # Stands for the step.
  interval = timer.lap()
  # Sleeps last at least as long as asked: lower bounds only.
  assert interval.steps == steps
  assert interval.input_wait_sec >= steps * wait
  assert interval.wall_sec - interval.input_wait_sec >= steps * work
  timer.restart()
  assert timer.lap().steps == 0 and timer.lap().input_wait_sec == 0


def test_interval_metrics_are_per_step_averages():
  interval = throughput.Interval(steps=4, wall_sec=2.0, input_wait_sec=0.5)
  metrics = throughput.interval_metrics(
      interval, images_per_step=64, num_devices=8,
      flops_per_step_per_device=1e9, peak_flops_per_device=1e10)
  assert metrics == pytest.approx({
      "images_per_sec": 128.0, "images_per_sec_per_device": 16.0,
      "step_time_sec": 0.5, "input_wait_sec": 0.125,
      "compute_time_sec": 0.375, "input_wait_fraction": 0.25,
      "flops_per_step_per_device": 1e9, "peak_flops_per_device": 1e10,
      "mfu": 0.2})
  # No steps since the timer restarted (a log step right after compiling),
  # or no FLOP count: NaN, not an error.
  empty = throughput.interval_metrics(
      throughput.Interval(0, 0.1, 0.0), images_per_step=64, num_devices=8,
      flops_per_step_per_device=1e9, peak_flops_per_device=1e10)
  assert math.isnan(empty["mfu"]) and math.isnan(empty["step_time_sec"])
  no_flops = throughput.interval_metrics(
      interval, images_per_step=64, num_devices=8,
      flops_per_step_per_device=None, peak_flops_per_device=1e10)
  assert math.isnan(no_flops["mfu"]) and no_flops["step_time_sec"] == 0.5


@pytest.mark.slow
def test_training_run_logs_throughput_and_mfu(tmp_path, monkeypatch):
  source = tmp_path / "fashion_mnist_src"
  source.mkdir()
  fake_fashion_mnist.write(source, num_train=64, num_test=16)
  monkeypatch.setenv(fashion_mnist.ENV_VAR, str(source))
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  # A fixed host peak: no probe, and the per-device share is known.
  monkeypatch.setattr(throughput, "measure_peak_flops", lambda devices: 8e9)
  config = smoke_fashion_mnist.get_config("simclr")
  config.model.update(depth=10, width=0.125)
  config.model.head.update(hidden_dims=(32,), out_dim=16)
  config.input.update(data_dir=str(tmp_path / "tfds"), batch_size=16,
                      shuffle_buffer=64)
  config.total_steps = 3
  config.log_every_steps = 1
  config.checkpoint_every_steps = 100
  config.linear_eval.enabled = False
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))

  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [row["step"] for row in rows] == [1, 2, 3]
  for key in (*throughput.TIMING_METRICS, "flops_per_step_per_device"):
    assert all(key in row for row in rows), key
  # Step 1 compiles and is left out, so its interval has no steps.
  assert math.isnan(rows[0]["mfu"])
  for row in rows[1:]:
    assert row["peak_flops_per_device"] == 8e9 / jax.local_device_count()
    assert row["flops_per_step_per_device"] > 0
    assert 0 <= row["input_wait_sec"] <= row["step_time_sec"]
    assert row["compute_time_sec"] == pytest.approx(
        row["step_time_sec"] - row["input_wait_sec"])
    assert row["mfu"] == pytest.approx(
        row["flops_per_step_per_device"] / row["step_time_sec"]
        / row["peak_flops_per_device"])
    assert row["images_per_sec"] == pytest.approx(16 / row["step_time_sec"])
