r"""Per-device memory, FLOPs and wall time of the SupCon loss + gradient.

For each global number of views N and each `loss_impl`, compiles
`jax.value_and_grad` of the SupCon L_out loss (labels, 2 views, D = 128,
float32) over simulated devices from `jax.ShapeDtypeStruct`s (nothing is
allocated), and prints a markdown table of the compiled per-device
`temp_size_in_bytes`, the analytic per-device loss FLOPs, and (for N up to
--time_max_views) the median wall time of interleaved runs on this CPU.
Then, by the same compiled analysis, the largest N each impl fits in a 16 GiB
chip (TPU v5e) budget.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    .venv/bin/python benchmarks/loss_memory.py

`cost_analysis` counts a loop body once, so FLOPs are counted analytically:
a forward logit matmul is 2*n*N*D per device (n local anchors); the gather
backward adds two more (4*n*N*D); the streamed impls recompute the logits in
the backward pass (one more 2*n*N*D, 8*n*N*D in all).
"""

import argparse
import functools
import os
import statistics
import sys
import time

if "--xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")

# pylint: disable=g-import-not-at-top
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from contrastive import losses
from contrastive import sharding

MIB = 2**20
IMPLS = ("gather", "blockwise", "ring")


def _loss_and_grad(impl: str, block_size: int | None):
  def loss(z, labels):
    return losses.get("supcon")(z, labels, temperature=0.1, loss_impl=impl,
                                block_size=block_size)
  return jax.value_and_grad(loss)


def compiled(mesh, impl: str, views: int, dim: int,
             block_size: int | None = None):
  """The compiled loss + gradient for `views` global views, from shapes."""
  batch = views // 2
  z = jax.ShapeDtypeStruct((batch, 2, dim), np.float32,
                           sharding=NamedSharding(mesh, P(sharding.DATA_AXIS)))
  labels = jax.ShapeDtypeStruct(
      (batch,), np.int32, sharding=NamedSharding(mesh, P(sharding.DATA_AXIS)))
  with jax.set_mesh(mesh):
    return jax.jit(_loss_and_grad(impl, block_size)).lower(z, labels).compile()


def temp_mib(mesh, impl: str, views: int, dim: int) -> float:
  return compiled(mesh, impl, views, dim).memory_analysis(
  ).temp_size_in_bytes / MIB


def analytic_gflops(impl: str, views: int, dim: int, devices: int) -> float:
  """Per-device loss + gradient GFLOPs (matmuls only)."""
  local = views // devices
  matmuls = 3 if impl == "gather" else 4
  return matmuls * 2 * local * views * dim / 1e9


def wall_ms(mesh, views: int, dim: int, repeats: int) -> dict[str, float]:
  """Median wall ms per impl, runs interleaved so that load hits all alike."""
  rng = np.random.default_rng(0)
  z = rng.normal(size=(views // 2, 2, dim)).astype(np.float32)
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  labels = rng.integers(0, 100, size=views // 2).astype(np.int32)
  with jax.set_mesh(mesh):
    z, labels = sharding.make_global_batch(mesh, (z, labels))
    fns = {impl: jax.jit(_loss_and_grad(impl, None)) for impl in IMPLS}
    for fn in fns.values():
      jax.block_until_ready(fn(z, labels))
    times = {impl: [] for impl in IMPLS}
    for _ in range(repeats):
      for impl, fn in fns.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(z, labels))
        times[impl].append(1e3 * (time.perf_counter() - start))
  return {impl: statistics.median(t) for impl, t in times.items()}


def largest_views(mesh, impl: str, dim: int, budget_mib: float,
                  start: int) -> int:
  """Largest N (a multiple of 2 * devices) whose temp + arguments fit."""
  quantum = 2 * mesh.size

  def fits(views):
    analysis = compiled(mesh, impl, views, dim).memory_analysis()
    used = (analysis.temp_size_in_bytes + analysis.argument_size_in_bytes +
            analysis.output_size_in_bytes)
    return used / MIB <= budget_mib

  low, high = 0, start
  while fits(high):
    low, high = high, high * 2
  while high - low > max(quantum, low // 64):
    middle = (low + high) // 2 // quantum * quantum
    if fits(middle):
      low = middle
    else:
      high = middle
  return low


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--views", type=int, nargs="+",
                      default=[4096, 8192, 16384, 32768, 131072])
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--time_max_views", type=int, default=16384)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--budget_gib", type=float, default=16.0)
  parser.add_argument("--skip_largest", action="store_true")
  args = parser.parse_args()

  mesh = sharding.make_mesh()
  devices = mesh.size
  print(f"SupCon L_out loss + gradient, D = {args.dim}, float32, {devices} "
        f"devices ({jax.devices()[0].platform}), jax {jax.__version__}\n")
  print("| N (global views) | impl | temp MiB / device | GFLOPs / device "
        "(analytic) | wall ms (median) | wall / gather |")
  print("|---:|---|---:|---:|---:|---:|")
  for views in args.views:
    times = (wall_ms(mesh, views, args.dim, args.repeats)
             if views <= args.time_max_views else {})
    for impl in IMPLS:
      if impl == "gather" and views > 65536:
        # Compiles, but the n x N buffers exceed this machine's RAM to run;
        # the memory figure below is still exact.
        pass
      mib = temp_mib(mesh, impl, views, args.dim)
      ms = f"{times[impl]:.1f}" if impl in times else "-"
      ratio = (f"{times[impl] / times['gather']:.3f}" if impl in times
               else "-")
      print(f"| {views:,} | {impl} | {mib:,.1f} | "
            f"{analytic_gflops(impl, views, args.dim, devices):.2f} | {ms} | "
            f"{ratio} |", flush=True)

  if not args.skip_largest:
    print(f"\nLargest N whose loss + gradient fits {args.budget_gib:g} GiB "
          f"per device (temp + arguments + outputs, compiled for {devices} "
          f"devices):\n")
    print("| impl | largest N | per device n |")
    print("|---|---:|---:|")
    for impl in IMPLS:
      views = largest_views(mesh, impl, args.dim, args.budget_gib * 1024,
                            start=65536)
      print(f"| {impl} | {views:,} | {views // devices:,} |", flush=True)


if __name__ == "__main__":
  main()
