"""Throughput, input wait and MFU of training steps.

  peak = throughput.peak_flops_per_device()  # Vendor table, or probe + cache.
  timer = throughput.StepTimer()
  for step_number in ...:
    batch = timer.next_batch(batches)
    state, metrics = step_fn(state, batch)
    if step_number == first:
      jax.block_until_ready(state)  # Leave compilation out.
      flops = throughput.flops_per_device(step_fn, state, batch)
      timer.restart()
    if step_number % log_every == 0:
      metrics = jax.device_get(metrics)  # The sync that makes lap() honest.
      metrics |= throughput.interval_metrics(
          timer.lap(), images_per_step=..., num_devices=...,
          flops_per_step_per_device=flops, peak_flops_per_device=peak)
      timer.restart()

MFU = flops_per_step_per_device / step_time_sec / peak_flops_per_device,
with the FLOPs from XLA's cost analysis of the compiled step (1 multiply-add
= 2 FLOPs) and the peak from the vendor's bf16 dense figure per JAX device,
or, for CPUs and unknown accelerators, from a timed matmul probe cached in
`$XDG_CACHE_HOME/contrastive/peak_flops.json` (default `~/.cache/...`).
"""

from collections.abc import Iterator, Sequence
import dataclasses
import json
import math
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

# Vendor peak bf16 dense FLOP/s per *JAX device*, by exact `device_kind`.
# TPU v2/v3 chips hold 2 TensorCores and JAX makes each a device, so their
# per-chip figures are halved; from v4 on, a JAX device is a chip.
TPU_PEAK_FLOPS = {
    "TPU v2": 45e12 / 2,  # 45 TF/s per chip (cloud.google.com/tpu/docs/v2)
    "TPU v3": 123e12 / 2,  # 123 TF/s per chip (cloud.google.com/tpu/docs/v3)
    "TPU v4": 275e12,  # cloud.google.com/tpu/docs/v4
    "TPU v5 lite": 197e12,  # v5e, cloud.google.com/tpu/docs/v5e
    "TPU v5": 459e12,  # v5p, cloud.google.com/tpu/docs/v5p
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # v6e, cloud.google.com/tpu/docs/v6e
}
# NVIDIA datasheets quote bf16 "with sparsity"; dense is half. GPU device
# kinds carry memory and form factor ("NVIDIA H100 80GB HBM3"), so they are
# matched by substring, most specific first. V100 has no bf16: fp16 tensor.
GPU_PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # SXM; also GH200, whose GPU is an H100/H200
    ("GB200", 2500e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("V100", 125e12),
)

# Metrics that measure time (or a peak measured on this machine): they differ
# between two runs of the same computation.
TIMING_METRICS = ("images_per_sec", "images_per_sec_per_device",
                  "step_time_sec", "input_wait_sec", "compute_time_sec",
                  "input_wait_fraction", "peak_flops_per_device", "mfu")


def peak_flops_from_table(device_kind: str) -> float | None:
  """Vendor peak bf16 FLOP/s of one device of `device_kind`; None if unknown."""
  if device_kind in TPU_PEAK_FLOPS:
    return TPU_PEAK_FLOPS[device_kind]
  if device_kind.startswith("TPU"):
    return None  # Never let a GPU substring match a TPU kind.
  for name, peak in GPU_PEAK_FLOPS:
    if name in device_kind:
      return peak
  return None


def measure_peak_flops(devices: Sequence[jax.Device], *,
                       size: int | None = None, repeats: int = 5) -> float:
  """FLOP/s of `devices` together on a compute-bound matmul, best of `repeats`.

  Each device multiplies its own `size` x `size` matrices, all at once: the
  simulated devices of a CPU host share its cores, so the probe must keep all
  of them busy, as training does. float32 on CPU (its bf16 is emulated and
  slower), bf16 elsewhere (the precision of the table's figures).
  """
  devices = list(devices)
  on_cpu = devices[0].platform == "cpu"
  dtype = jnp.float32 if on_cpu else jnp.bfloat16
  size = size or (1024 if on_cpu else 8192)
  mesh = jax.sharding.Mesh(np.asarray(devices), ("probe",))
  shards = NamedSharding(mesh, P("probe"))
  shape = (len(devices), size, size)
  matrices = jax.jit(lambda: jnp.ones(shape, dtype), out_shardings=shards)()
  matmul = jax.jit(lambda x: jnp.einsum("dij,djk->dik", x, x),
                   out_shardings=shards)
  matmul(matrices).block_until_ready()  # Compile outside the timing.
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(matrices).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return len(devices) * 2 * size**3 / best


def default_cache_path() -> str:
  root = (os.environ.get("XDG_CACHE_HOME")
          or os.path.join(os.path.expanduser("~"), ".cache"))
  return os.path.join(root, "contrastive", "peak_flops.json")


def _host_cores() -> int:
  # The cores this process may use (a container may get fewer than exist).
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def _read_cache(path: str) -> dict[str, float]:
  try:
    with open(path) as f:
      cached = json.load(f)
  except FileNotFoundError:
    return {}
  except (OSError, ValueError) as e:
    logging.warning("Ignoring unreadable peak FLOP/s cache %s: %s", path, e)
    return {}
  return cached if isinstance(cached, dict) else {}


def _write_cache(path: str, cached: dict[str, float]) -> None:
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Through a temporary file: concurrent runs never read a half-written one.
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
      json.dump(cached, f, indent=1, sort_keys=True)
    os.replace(temporary, path)
  except OSError as e:  # A read-only home must not stop training.
    logging.warning("Could not cache the peak FLOP/s in %s: %s", path, e)


def peak_flops_per_device(devices: Sequence[jax.Device] | None = None, *,
                          cache_path: str | None = None) -> float:
  """Peak FLOP/s of one of `devices` (default: this process's devices).

  Known accelerators: the vendor table. Otherwise (CPU, unknown kinds) the
  probe's FLOP/s of all local devices together, measured once per device
  kind and host core count and cached in `cache_path` (default
  `default_cache_path()`), divided by the number of local devices: simulated
  CPU devices split the host's cores, so each gets an equal share (with one
  JAX process per host, as in real runs). Delete the cache file to measure
  again (e.g. if it was measured on a busy machine, which inflates MFU).
  """
  devices = list(devices or jax.local_devices())
  kind = devices[0].device_kind
  peak = peak_flops_from_table(kind)
  if peak is not None:
    return peak
  path = cache_path or default_cache_path()
  key = f"{kind}, {_host_cores()} host cores"
  cached = _read_cache(path)
  if key not in cached:
    logging.info("Measuring the peak FLOP/s of %d '%s' device(s) with a "
                 "matmul probe (cached in %s).", len(devices), kind, path)
    cached[key] = measure_peak_flops(devices)
    _write_cache(path, cached)
  return cached[key] / len(devices)


def flops_per_device(jitted: Any, *args: Any) -> float | None:
  """FLOPs of one call of `jitted(*args)` per device, by XLA's cost analysis.

  Under SPMD XLA compiles the per-device program, so the count is per device
  (verified on 8 simulated CPU devices: a batch-sharded matmul reports
  2*m*n*k / 8). Called with the arguments of a call already made, the
  compiled executable comes from JAX's cache: nothing compiles again.
  Caveats: the body of a `lax.scan` / `fori_loop` counts once, not once per
  iteration (e.g. the streaming losses' blocks); on GPU, library custom calls
  have reported -1 or no FLOPs, and then this returns None.
  """
  analysis = jitted.lower(*args).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):  # JAX < 0.4.30: one per program.
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  if flops is None or not math.isfinite(flops) or flops <= 0:
    logging.warning("XLA's cost analysis gave no FLOP count (%r); MFU will "
                    "be NaN.", flops)
    return None
  return float(flops)


@dataclasses.dataclass(frozen=True)
class Interval:
  steps: int  # Steps taken since the timer (re)started.
  wall_sec: float  # Host wall time since then.
  input_wait_sec: float  # Of which blocked in `next(batches)`.


class StepTimer:
  """Splits the wall time of training steps into input wait and the rest.

  Input wait is the host's time blocked in `next(batches)`: the input
  pipeline and starting the host->device copy. Dispatch is asynchronous, so
  the device's time shows up only where the host waits for it, i.e. at the
  sync of a log step: read `lap()` after one, never per step (a per-step
  `block_until_ready` would stall accelerators). The rest of the wall time is
  then device time not hidden behind input, plus dispatch and logging.
  """

  def __init__(self):
    self.restart()

  def restart(self) -> None:
    self._start = time.perf_counter()
    self._steps = 0
    self._input_wait = 0.0

  def next_batch(self, batches: Iterator[Any]) -> Any:
    start = time.perf_counter()
    batch = next(batches)
    self._input_wait += time.perf_counter() - start
    self._steps += 1
    return batch

  def lap(self) -> Interval:
    """The interval since the last restart (which it does not end)."""
    return Interval(self._steps, time.perf_counter() - self._start,
                    self._input_wait)


def interval_metrics(interval: Interval, *, images_per_step: int,
                     num_devices: int, flops_per_step_per_device: float | None,
                     peak_flops_per_device: float) -> dict[str, float]:
  """Per-step averages over `interval`; NaN where it has no steps."""
  nan = float("nan")
  step_time = interval.wall_sec / interval.steps if interval.steps else nan
  wait = interval.input_wait_sec / interval.steps if interval.steps else nan
  flops = flops_per_step_per_device or nan
  images_per_sec = images_per_step / step_time
  return {
      "images_per_sec": images_per_sec,
      "images_per_sec_per_device": images_per_sec / num_devices,
      "step_time_sec": step_time,
      "input_wait_sec": wait,
      "compute_time_sec": step_time - wait,
      "input_wait_fraction": wait / step_time,
      "flops_per_step_per_device": flops,
      "peak_flops_per_device": peak_flops_per_device,
      "mfu": flops / step_time / peak_flops_per_device,
  }
