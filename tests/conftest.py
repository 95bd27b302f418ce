"""Test set-up: 8 simulated CPU devices, set before JAX is imported anywhere."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
from contrastive import xla_cpu  # pylint: disable=g-import-not-at-top
xla_cpu.add_cpu_flags()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TF must not grab accelerators that JAX needs; on CPU machines this is a no-op.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# The CPU peak-FLOP/s probe caches its figure (contrastive/throughput.py); one
# measured under a loaded test run must not reach the user's real runs.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="contrastive_test_cache_")

import jax  # pylint: disable=g-import-not-at-top

jax.config.update("jax_enable_x64", False)
