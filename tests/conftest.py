"""Test set-up: 8 simulated CPU devices, set before JAX is imported anywhere."""

import atexit
import os
import shutil
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

# One persistent XLA compilation cache for the whole test run, its pytest-xdist
# workers and every subprocess they start (they inherit the environment):
# most of the suite's time is XLA compiling a program some other test, or the
# same test on another mesh, compiled a moment before. A fresh folder each
# run, so that no run depends on what an earlier one left; entries are keyed
# by the program and every compiler option, so a hit is the same executable.
if "PYTEST_XDIST_WORKER" not in os.environ:
  _XLA_CACHE = tempfile.mkdtemp(prefix="contrastive_test_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
  atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

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


@pytest.fixture
def installed_fashion_mnist(monkeypatch):
  """The real Fashion-MNIST IDX files in Debian's folder, or a skip."""
  from contrastive.data import fashion_mnist  # pylint: disable=g-import-not-at-top
  missing = [name for names in fashion_mnist.SPLIT_FILES.values()
             for name in names
             if not os.path.exists(os.path.join(fashion_mnist.DEFAULT_DIR, name))]
  if missing:
    pytest.skip(f"Fashion-MNIST not installed in {fashion_mnist.DEFAULT_DIR} "
                f"(missing {', '.join(missing)}): `make data` installs it.")
  monkeypatch.delenv(fashion_mnist.ENV_VAR, raising=False)
  return fashion_mnist.DEFAULT_DIR
