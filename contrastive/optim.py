"""Optimizer and learning-rate schedule from `config.optim`.

`config.optim.lr` is a base value; the peak learning rate is
  linear: lr * global_batch / 256      (SimCLR LARS 0.3 -> 4.8 at 4096)
  sqrt:   lr * sqrt(global_batch)      (SimCLR's small-batch rule, 0.075)
  none:   lr
reached after a linear warm-up, then cosine decay to zero.

BN parameters and biases (every parameter with ndim <= 1) are excluded from
weight decay and from LARS's trust-ratio adaptation (solo-learn #305 lost
~4 points of SimCLR ImageNet accuracy by adapting them).
"""

import math

import jax
import ml_collections
import optax


def peak_learning_rate(optim_config: ml_collections.ConfigDict,
                       global_batch: int) -> float:
  scaling = optim_config.lr_scaling
  if scaling == "linear":
    return optim_config.lr * global_batch / 256
  if scaling == "sqrt":
    return optim_config.lr * math.sqrt(global_batch)
  if scaling == "none":
    return optim_config.lr
  raise ValueError(f"config.optim.lr_scaling must be 'linear', 'sqrt' or "
                   f"'none', got '{scaling}'.")


def learning_rate_schedule(optim_config: ml_collections.ConfigDict,
                           global_batch: int, total_steps: int,
                           warmup_steps: int) -> optax.Schedule:
  peak = peak_learning_rate(optim_config, global_batch)
  warmup_steps = min(warmup_steps, total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=0.0)


def decay_mask(params):
  """True for kernels (decayed, adapted); False for BN params and biases."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def _sgd(optim_config, schedule):
  return optax.chain(
      optax.add_decayed_weights(optim_config.weight_decay, mask=decay_mask),
      optax.sgd(schedule, momentum=optim_config.momentum,
                nesterov=optim_config.nesterov))


def _lars(optim_config, schedule):
  return optax.lars(
      schedule, weight_decay=optim_config.weight_decay,
      weight_decay_mask=decay_mask, trust_ratio_mask=decay_mask,
      trust_coefficient=optim_config.trust_coefficient,
      momentum=optim_config.momentum, nesterov=optim_config.nesterov)


def _adamw(optim_config, schedule):
  return optax.adamw(schedule, weight_decay=optim_config.weight_decay,
                     mask=decay_mask)


OPTIMIZERS = {"sgd": _sgd, "lars": _lars, "adamw": _adamw}


def create(optim_config: ml_collections.ConfigDict,
           schedule: optax.Schedule) -> optax.GradientTransformation:
  if optim_config.name not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer '{optim_config.name}'; choose one of "
                     f"{sorted(OPTIMIZERS)} (config.optim.name).")
  return OPTIMIZERS[optim_config.name](optim_config, schedule)
