"""The loop both trainers share: steps, logging, online evaluation, saves.

`train.py` (contrastive) and `supervised.py` (cross-entropy) differ in their
step and state; everything around the step is here, so that both resume,
checkpoint, guard against non-finite steps, stop on SIGTERM and log the
same way:

  state, last_metrics, preempted = training_loop.run(
      config, step, state, state_shardings, mesh=mesh, manager=manager,
      logger=logger, total_steps=..., steps_per_epoch=...,
      evaluate_online=lambda state: {...}, headline_metric="train_top1")

A run resumed after any interruption is bitwise the run that was never
interrupted: the state comes from the checkpoint, the batch of step s is a
pure function of (seed, s) (see `input_pipeline`), and the step itself uses
no other randomness.
"""

from collections.abc import Callable, Iterator
import math
from typing import Any

from absl import logging
from clu import periodic_actions
import jax
import ml_collections

from contrastive import checkpoint
from contrastive import metric_logging
from contrastive import nonfinite
from contrastive import preemption
from contrastive import sharding
from contrastive import throughput
from contrastive.data import device_augment
from contrastive.data import input_pipeline


def steps_for(config: ml_collections.ConfigDict,
              num_train_examples: int) -> tuple[int, int, int]:
  """(total_steps, warmup_steps, steps_per_epoch) from epochs or steps."""
  steps_per_epoch = max(num_train_examples // config.input.batch_size, 1)
  total = (config.total_steps if config.total_steps is not None
           else math.ceil(config.total_epochs * steps_per_epoch))
  warmup = math.ceil(config.optim.warmup_epochs * steps_per_epoch)
  if 0 < total <= warmup:
    logging.warning(
        "The warm-up (optim.warmup_epochs=%s, %d steps) is not shorter than "
        "the run (%d steps): the whole run is warm-up, the learning rate "
        "never reaches its peak or decays. Lower optim.warmup_epochs or "
        "train longer.", config.optim.warmup_epochs, warmup, total)
    warmup = total  # What the schedule does (optim.learning_rate_schedule).
  return total, warmup, steps_per_epoch


def device_prefetch(iterator, mesh, size: int = 2) -> Iterator[Any]:
  """Keeps `size` global batches in flight so host->device copies overlap."""
  queue = []
  for local in iterator:
    queue.append(sharding.make_global_batch(mesh, local))
    if len(queue) > size:
      yield queue.pop(0)
  yield from queue


def run(config: ml_collections.ConfigDict, step: Callable[..., Any], state,
        state_shardings, *, mesh: jax.sharding.Mesh, manager,
        logger: metric_logging.MetricLogger, total_steps: int,
        steps_per_epoch: int,
        evaluate_online: Callable[[Any], dict[str, float]],
        headline_metric: str,
        refresh: tuple[int, Callable[[Any, int], Any]] | None = None
        ) -> tuple[Any, dict[str, float], bool]:
  """Trains `state` from its step to `total_steps`; returns the outcome.

  Args:
    config: the run's config (input, logging and checkpoint cadence,
      `nonfinite`, `online_eval.every_steps`).
    step: the pure `(state, batch) -> (state, metrics)`; jitted here over
      the mesh with the state donated and the batch sharded on `data`.
    state: the state to continue from (restored or new).
    state_shardings: the state's shardings.
    mesh: the device mesh.
    manager: the Orbax checkpoint manager of the workdir.
    logger: where metrics go (metrics.jsonl and TensorBoard).
    total_steps: the step to stop at.
    steps_per_epoch: for the `epoch` metric.
    evaluate_online: `state -> metrics` run every `online_eval.every_steps`
      and at the last step, outside the training time.
    headline_metric: the metric logged next to the loss.
    refresh: (every, fn) or None: `state = fn(state, step)` after every
      `every` steps (IFND's re-clustering), outside the training time. Its
      result is checkpointed with the rest, so a resumed run continues from
      the same refreshed state.

  Returns:
    (state, the last logged metrics, whether SIGTERM stopped the run). The
    final state is checkpointed either way.
  """
  start_step = int(jax.device_get(state.step))
  replicated = sharding.replicated(mesh)
  tally = jax.device_put(nonfinite.initial_tally(), replicated)
  # With `input.augment.on_device`, the step finishes the views first.
  step = device_augment.with_device_augment(step, config.input.augment)
  step_fn = jax.jit(
      nonfinite.guard(step, config.nonfinite),
      in_shardings=(state_shardings, replicated,
                    sharding.batch_sharding(mesh)),
      out_shardings=(state_shardings, replicated, replicated),
      donate_argnums=(0, 1))
  # Before the input pipeline starts: on CPU the peak may be a timed probe.
  peak_flops = throughput.peak_flops_per_device()
  flops_per_step = None  # Per device, from the compiled step.

  # Batches are indexed by step, so a resumed run continues the same order.
  dataset = input_pipeline.pretrain_dataset(
      config.input, seed=config.seed, start_step=start_step)
  batches = device_prefetch(dataset.as_numpy_iterator(), mesh)

  def save(*, force=False):
    # Never checkpoint a state that went through a non-finite step.
    nonfinite.check(tally, config.nonfinite)
    checkpoint.save(manager, state, force=force)

  report_progress = periodic_actions.ReportProgress(
      num_train_steps=total_steps, writer=logger.writer)
  images_per_step = config.input.batch_size
  eval_every = config.online_eval.every_steps
  last_metrics = {}
  preempted = False
  # Training wall time: excludes compiling the first step and the periodic
  # evaluation (the time axis of accuracy-vs-time plots); a resumed run
  # continues from the time logged at or before its checkpoint.
  train_seconds = (logger.last_value("train_time_sec", start_step) or 0.0
                   if start_step > 0 else 0.0)
  with jax.set_mesh(mesh), preemption.Watcher() as watcher:
    timer = throughput.StepTimer()
    for step_number in range(start_step + 1, total_steps + 1):
      done = step_number - 1
      if refresh is not None and done > 0 and done % refresh[0] == 0:
        # Between steps, off the clock: the steps so far count, the pause
        # does not.
        jax.block_until_ready(state)
        train_seconds += timer.lap().wall_sec
        state = refresh[1](state, done)
        timer.restart()
      batch = timer.next_batch(batches)
      with jax.profiler.StepTraceAnnotation("train", step_num=step_number):
        state, tally, metrics = step_fn(state, tally, batch)
      report_progress(step_number)
      if step_number == start_step + 1:
        # Keep compilation out of the throughput and time figures.
        jax.block_until_ready(state)
        # The new state and tally stand in for the donated inputs (same
        # shapes and shardings): the compiled step is reused, not rebuilt.
        flops_per_step = throughput.flops_per_device(step_fn, state, tally,
                                                     batch)
        timer.restart()
      last = step_number == total_steps
      log_now = step_number % config.log_every_steps == 0 or last
      eval_now = eval_every > 0 and (step_number % eval_every == 0 or last)
      if log_now or eval_now:
        bad_steps = nonfinite.check(tally, config.nonfinite)
        metrics = jax.device_get(metrics)
        interval = timer.lap()
        train_seconds += interval.wall_sec
        metrics.update(throughput.interval_metrics(
            interval, images_per_step=images_per_step, num_devices=mesh.size,
            flops_per_step_per_device=flops_per_step,
            peak_flops_per_device=peak_flops))
        metrics.update(epoch=step_number / steps_per_epoch,
                       train_time_sec=train_seconds)
        if config.nonfinite == "skip":
          metrics["skipped_steps"] = bad_steps
        if eval_now:
          metrics.update(evaluate_online(state))
        logger.write(step_number, metrics)
        last_metrics = metrics
        logging.info("step %d/%d: loss %.4f, %s %.3f, %.1f images/s, MFU "
                     "%.1f%%, input wait %.0f%%", step_number, total_steps,
                     metrics["loss"], headline_metric,
                     metrics[headline_metric], metrics["images_per_sec"],
                     100 * metrics["mfu"],
                     100 * metrics["input_wait_fraction"])
        timer.restart()
      if watcher.reached(step_number) and not last:
        preempted = True
        break
      if step_number % config.checkpoint_every_steps == 0 and not last:
        save()
    # Stop the input pipeline's background threads before evaluating.
    batches.close()
    save(force=True)
    manager.wait_until_finished()
  if preempted:
    logging.warning("Preempted: saved the checkpoint of step %d in %s; run "
                    "the same command again to resume.",
                    int(jax.device_get(state.step)), manager.directory)
  return state, last_metrics, preempted
