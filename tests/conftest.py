"""Test set-up: 8 simulated CPU devices, set before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TF must not grab accelerators that JAX needs; on CPU machines this is a no-op.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # pylint: disable=g-import-not-at-top

jax.config.update("jax_enable_x64", False)
