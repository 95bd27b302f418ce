r"""Per-device memory of a whole train step with and without GradCache.

Compiles the SupCon train step (smoke model: ResNet-18, CIFAR stem, width
1/4 by default) from `jax.ShapeDtypeStruct`s over simulated devices and
prints, for each number of GradCache chunks, the compiled per-device
`temp_size_in_bytes` and its share of the plain step's. Nothing is
allocated, so batches far beyond this machine's RAM can be sized.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    .venv/bin/python benchmarks/grad_cache_memory.py --batch 1024
"""

import argparse
import functools
import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")

# pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from configs import smoke_fashion_mnist
from contrastive import losses
from contrastive import models
from contrastive import optim
from contrastive import sharding
from contrastive import state as state_lib
from contrastive import train

MIB = 2**20


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=1024,
                      help="Global batch in images (2 views each).")
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--width", type=float, default=0.25)
  parser.add_argument("--depth", type=int, default=18)
  parser.add_argument("--chunks", type=int, nargs="+", default=[0, 2, 4, 8])
  parser.add_argument("--loss_impl", default="ring")
  args = parser.parse_args()

  config = smoke_fashion_mnist.get_config("supcon")
  config.model.width = args.width
  config.model.depth = args.depth
  config.loss.loss_impl = args.loss_impl
  model = models.create(config.model)
  schedule = optim.learning_rate_schedule(config.optim, args.batch, 100, 10)
  tx = optim.create(config.optim, schedule)
  mesh = sharding.make_mesh()
  image_shape = (args.image_size, args.image_size, 3)
  abstract_state = state_lib.abstract_train_state(model, tx, image_shape,
                                                  mesh)
  spec = sharding.batch_sharding(mesh)
  batch = {
      "image": jax.ShapeDtypeStruct((args.batch, 2, *image_shape),
                                    jnp.float32, sharding=spec),
      "label": jax.ShapeDtypeStruct((args.batch,), jnp.int32, sharding=spec),
  }
  print(f"SupCon train step, ResNet-{args.depth} width {args.width:g} "
        f"(CIFAR stem), {args.image_size}px, global batch {args.batch} x 2 "
        f"views, loss_impl={args.loss_impl}, {mesh.size} devices "
        f"({jax.devices()[0].platform}), jax {jax.__version__}\n")
  print("| grad_cache_chunks | images / chunk / device | temp MiB / device "
        "| vs plain |")
  print("|---:|---:|---:|---:|")
  plain = None
  for chunks in args.chunks:
    step = jax.jit(functools.partial(
        train.train_step, model=model, tx=tx,
        loss_fn=losses.get_with_metrics("supcon"), loss_config=config.loss,
        schedule=schedule, grad_cache_chunks=chunks), donate_argnums=0)
    with jax.set_mesh(mesh):
      temp = step.lower(abstract_state, batch).compile().memory_analysis(
      ).temp_size_in_bytes / MIB
    plain = temp if plain is None else plain
    per_chunk = args.batch // mesh.size // max(chunks, 1)
    print(f"| {chunks} | {per_chunk} | {temp:,.1f} | {temp / plain:.3f} |",
          flush=True)


if __name__ == "__main__":
  main()
