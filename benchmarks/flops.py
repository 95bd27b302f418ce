r"""FLOPs per image of the forward pass and the train step, per model.

For each model, compiles (XLA:CPU, one device) the forward pass of the
encoder + projection head and the whole SimCLR train step (2 views per
image), and prints FLOPs per image from two independent counts:

- XLA: `compiled.cost_analysis()["flops"]` of the optimised HLO;
- jaxpr: 2 x multiply-adds of every convolution and matmul in the traced
  program (forward, and for the step also the backward convolutions), read
  from the shapes alone. Elementwise ops (BN, ReLU, the optimizer) are left
  out, so this is the "model FLOPs" MFU is quoted against.

The rule of thumb "train step = 3 x forward" is printed alongside.

  .venv/bin/python benchmarks/flops.py                # R18/R50/R200
  .venv/bin/python benchmarks/flops.py --models r50_224
"""

import argparse
import functools
import math
import os
import sys

# pylint: disable=g-import-not-at-top
import jax
import jax.extend
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from configs import common
from contrastive import losses
from contrastive import models
from contrastive import optim
from contrastive import sharding
from contrastive import state as state_lib
from contrastive import train

GFLOP = 1e9

# name: (depth, width, cifar_stem, image_size, head hidden dims)
MODELS = {
    "r18_cifar_32": (18, 1.0, True, 32, (512,)),
    "r18_smoke_28": (18, 0.25, True, 28, (512,)),
    "r50_cifar_32": (50, 1.0, True, 32, (2048,)),
    "r50_224": (50, 1.0, False, 224, (2048, 2048)),
    "r200_224": (200, 1.0, False, 224, (2048, 2048)),
}


def _conv_flops(eqn) -> int:
  out = eqn.outvars[0].aval.shape
  kernel = eqn.invars[1].aval.shape
  spec = eqn.params["dimension_numbers"]
  out_features = kernel[spec.rhs_spec[0]]
  # Multiply-adds per output element: the kernel's size per output feature
  # (spatial x input features / groups).
  per_output = math.prod(kernel) // out_features
  # The input gradient of a strided convolution is a convolution over the
  # zero-dilated output gradient: only 1 / prod(dilation) of its products
  # touch non-zeros, and only those are work.
  dilation = math.prod(eqn.params.get("lhs_dilation") or (1,))
  return 2 * math.prod(out) * per_output // dilation


def _dot_flops(eqn) -> int:
  (contracting, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval.shape
  return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
      lhs[d] for d in contracting)


def jaxpr_flops(jaxpr) -> int:
  """Convolution + matmul FLOPs of a (closed) jaxpr, sub-jaxprs included."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif eqn.primitive.name == "dot_general":
      total += _dot_flops(eqn)
  for sub in jax.extend.core.subjaxprs(jaxpr):
    total += jaxpr_flops(sub)
  return total


def _closed(jaxpr):
  return jaxpr.jaxpr if hasattr(jaxpr, "jaxpr") else jaxpr


def measure(name: str, batch: int) -> dict[str, float]:
  depth, width, cifar_stem, size, hidden = MODELS[name]
  config = common.base_config()
  config.model.update(depth=depth, width=width, cifar_stem=cifar_stem)
  config.model.head.update(hidden_dims=hidden)
  model = models.create(config.model)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  schedule = optim.learning_rate_schedule(config.optim, batch, 100, 10)
  tx = optim.create(config.optim, schedule)
  image_shape = (size, size, 3)
  state = state_lib.abstract_train_state(model, tx, image_shape, mesh)
  variables = {"params": state.params, "batch_stats": state.batch_stats}

  def forward(variables, images):
    return model.apply(variables, images, train=False)

  images = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
  step = functools.partial(
      train.train_step, model=model, tx=tx,
      loss_fn=losses.get_with_metrics("simclr"), loss_config=config.loss,
      schedule=schedule)
  views = jax.ShapeDtypeStruct((batch, 2, *image_shape), jnp.float32)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  result = {}
  with jax.set_mesh(mesh):
    for kind, fn, args, per in (
        ("forward", forward, (variables, images), batch),
        ("step", step, (state, {"image": views, "label": labels}),
         2 * batch)):
      compiled = jax.jit(fn).lower(*args).compile()
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, list) else cost
      result[f"{kind}_xla"] = cost["flops"] / per / GFLOP
      result[f"{kind}_jaxpr"] = jaxpr_flops(
          _closed(jax.make_jaxpr(fn)(*args))) / per / GFLOP
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", nargs="+", default=list(MODELS),
                      choices=list(MODELS))
  parser.add_argument("--batch", type=int, default=8,
                      help="Images per compiled batch (FLOPs are per image).")
  args = parser.parse_args()
  print("| model | forward GFLOP/image (XLA / jaxpr) | train step GFLOP/view "
        "(XLA / jaxpr) | 3 x forward (jaxpr) |")
  print("|---|---|---|---|")
  for name in args.models:
    r = measure(name, args.batch)
    print(f"| {name} | {r['forward_xla']:.3f} / {r['forward_jaxpr']:.3f} | "
          f"{r['step_xla']:.3f} / {r['step_jaxpr']:.3f} | "
          f"{3 * r['forward_jaxpr']:.3f} |", flush=True)


if __name__ == "__main__":
  main()
