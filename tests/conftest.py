"""Test set-up: 8 simulated CPU devices, set before JAX is imported anywhere."""

import os
import tempfile

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
from contrastive import xla_cpu  # pylint: disable=g-import-not-at-top
xla_cpu.add_cpu_flags()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The tests compile hundreds of programs that then run for a few steps, where
# XLA's optimization passes cost more than they save: without them, on 2 CPU
# cores, a multi-crop momentum train-step test took 55 s instead of 96 s and
# a command-line training run 61 s instead of 83 s. Tests of what the
# compiled program needs (memory, collectives) are marked `optimized_xla` and
# compile as users do. Subprocesses the tests start inherit the setting.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# TF must not grab accelerators that JAX needs; on CPU machines this is a no-op.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# The CPU peak-FLOP/s probe caches its figure (contrastive/throughput.py); one
# measured under a loaded test run must not reach the user's real runs.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="contrastive_test_cache_")

import jax  # pylint: disable=g-import-not-at-top

jax.config.update("jax_enable_x64", False)


@pytest.fixture(autouse=True)
def _optimized_xla_when_marked(request):
  """Compiles with XLA's full optimizations in tests marked `optimized_xla`."""
  if request.node.get_closest_marker("optimized_xla") is None:
    yield
    return
  disabled = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", disabled)
