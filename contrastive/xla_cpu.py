"""XLA:CPU compiler options, set in `XLA_FLAGS` before JAX starts.

By default XLA:CPU hands convolutions to YNNPACK, whose weight-gradient
convolutions run 1.4-5x slower than PyTorch's on this project's ResNets;
keeping YNNPACK for dots and reductions but not for convolutions made the
ResNet-18 SupCon step 1.5-1.8x faster with the same loss
(benchmarks/train_step.py, benchmarks/RESULTS.md). The option is read by
the CPU backend only: TPU and GPU compilations are unchanged. A value the
user already put in `XLA_FLAGS` wins.
"""

import os

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)


def add_cpu_flags(environ=os.environ) -> None:
  """Appends `CPU_FLAGS` to `environ["XLA_FLAGS"]` unless already set there."""
  flags = environ.get("XLA_FLAGS", "")
  for flag in CPU_FLAGS:
    if flag.split("=")[0] not in flags:
      flags = f"{flags} {flag}"
  environ["XLA_FLAGS"] = flags.strip()
