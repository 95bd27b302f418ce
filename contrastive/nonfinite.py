"""Non-finite loss or gradients: caught in the step, checked cheaply on host.

`guard` wraps a train step so that it also returns a small device-side tally
(how many steps were non-finite, and the first), with no host sync per step.
The trainer checks the tally (`check`) when it logs and before every save, so
a non-finite state is never checkpointed. With the "skip" policy the guarded
step keeps the previous parameters, batch statistics and optimizer state when
its loss, gradient norm or new parameters are non-finite (the step counter
still advances: the next step uses the next batch).
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Tally = dict[str, jax.Array]


def initial_tally() -> Tally:
  return {"count": jnp.zeros((), jnp.int32),
          "first_step": jnp.full((), -1, jnp.int32)}


def guard(step_fn: Callable[..., tuple[Any, dict]], policy: str):
  """`(state, tally, batch) -> (state, tally, metrics)` around `step_fn`.

  Args:
    step_fn: `(state, batch) -> (state, metrics)`; metrics hold `loss`,
      `grad_norm` and `param_norm`.
    policy: "raise" (leave the state alone; the host raises at its next
      check) or "skip" (keep the previous state for a non-finite step).

  Returns:
    The guarded step, to be jitted.
  """
  if policy not in ("raise", "skip"):
    raise ValueError(f"Unknown non-finite policy {policy!r}; use 'raise' or "
                     "'skip'.")

  def guarded(state, tally: Tally, batch):
    new_state, metrics = step_fn(state, batch)
    finite = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
              & jnp.isfinite(metrics["param_norm"]))
    if policy == "skip":
      kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                          new_state, state)
      new_state = kept.replace(step=new_state.step)
    step = new_state.step.astype(jnp.int32)
    tally = {
        "count": tally["count"] + (~finite).astype(jnp.int32),
        "first_step": jnp.where((tally["first_step"] < 0) & ~finite, step,
                                tally["first_step"]),
    }
    return new_state, tally, metrics

  return guarded


def check(tally: Tally, policy: str) -> int:
  """Returns the count of non-finite steps; raises under "raise" if any."""
  tally = jax.device_get(tally)
  count = int(tally["count"])
  if count and policy == "raise":
    raise FloatingPointError(
        f"Non-finite loss or gradients at step {int(tally['first_step'])} "
        f"({count} step(s) so far); stopped before checkpointing. Lower the "
        "learning rate, raise the temperature, use float32, or set "
        "--config.nonfinite=skip to skip such steps.")
  return count
