r"""Entry point: train (resuming from --workdir), then evaluate.

  python -m contrastive.main --config=configs/smoke_fashion_mnist.py:simclr \
      --workdir=/tmp/smoke [--config.total_steps=100 ...]

This file is intentionally short; `config.trainer` picks the logic:
`train.py` (contrastive pretraining) or `supervised.py` (cross-entropy
baseline and fine-tuning).
"""

import json
import os
import sys
import time

# The run's clock starts here, or where `make smoke` started (the variable
# below, in Unix seconds), so that the set-up phase counts the venv and data.
_STARTED = time.time()
STARTED_AT_ENV = "CONTRASTIVE_STARTED_AT"

from contrastive import xla_cpu  # pylint: disable=g-import-not-at-top

# Before JAX reads XLA_FLAGS (its first backend), hence before its import.
xla_cpu.add_cpu_flags()

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags
import tensorflow as tf

from contrastive import supervised
from contrastive import train
from contrastive.data import prepare

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with ':arg'.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints and metrics go; reused to resume.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0, for multi-process CPU/GPU runs (on a multi-host "
    "TPU slice this is detected automatically).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index in a multi-process run.")
flags.mark_flags_as_required(["config", "workdir"])


# config.trainer -> train_and_evaluate(config, workdir) -> result dict.
TRAINERS = {
    "contrastive": train.train_and_evaluate,
    "supervised": supervised.train_and_evaluate,
}


def get_trainer(name: str):
  """The `train_and_evaluate` of `config.trainer`; ValueError if unknown."""
  if name not in TRAINERS:
    raise ValueError(f"config.trainer={name!r} is not one of "
                     f"{sorted(TRAINERS)}; set --config.trainer=contrastive "
                     "or --config.trainer=supervised.")
  return TRAINERS[name]


def _on_cloud_tpu_vm() -> bool:
  """Whether JAX found TPU chips and libtpu on this host (checked on import)."""
  # No public API exposes this; `jax.distributed.initialize()` relies on the
  # same flag to read a GCE TPU VM's topology from the metadata server, where
  # TPU_WORKER_HOSTNAMES is not set.
  from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  return getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False)


def _initialize_distributed() -> None:
  if _COORDINATOR.value:
    # CPU processes need a cross-process collectives backend (GPUs use NCCL
    # and ignore this).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif (_on_cloud_tpu_vm() or
        os.environ.get("TPU_WORKER_HOSTNAMES", "localhost").count(",") > 0):
    # TPU VM (GCE or GKE), one host or a slice: JAX reads the topology from
    # the TPU metadata. Required on multi-host slices, harmless on one host.
    jax.distributed.initialize()


def _result_table(result) -> str:
  evaluation = result["linear_eval"]
  knn_keys = sorted((k for k in evaluation if k.startswith("knn")),
                    key=lambda k: int(k[3:].split("_")[0]))
  header = "| representation | linear top-1 | linear top-5 |" + "".join(
      f" kNN top-1 (k={k[3:].split('_')[0]}) |" for k in knn_keys)
  lines = [header, "|---" * (3 + len(knn_keys)) + "|"]

  def row(name, scores):
    cells = [f"{100 * scores['top1']:.2f}", f"{100 * scores['top5']:.2f}"]
    cells += [f"{100 * scores[k]:.2f}" if k in scores else "-"
              for k in knn_keys]
    return f"| {name} | " + " | ".join(cells) + " |"

  if "raw_pixels" in evaluation:
    raw = evaluation["raw_pixels"]
    lines.append(row(f"raw pixels ({raw['feature_dim']}-d)", raw))
  lines.append(row(f"frozen encoder ({evaluation['feature_dim']}-d) after "
                   f"{result['step']} steps", evaluation))
  return "\n".join(lines)


def _started_at(environ=os.environ) -> float:
  try:
    return min(float(environ[STARTED_AT_ENV]), _STARTED)
  except (KeyError, ValueError):
    return _STARTED


def time_budget(seconds: dict[str, float], total: float) -> dict[str, float]:
  """Set-up, training, evaluation and total seconds of the run.

  `seconds` holds the trainer's "training" and "evaluation"; set-up is the
  rest of `total` (imports, data preparation, state creation or restore).
  """
  training, evaluation = seconds["training"], seconds["evaluation"]
  return {"setup": max(0.0, total - training - evaluation),
          "training": training, "evaluation": evaluation, "total": total}


def time_budget_line(budget: dict[str, float]) -> str:
  return "Time budget: " + ", ".join(
      f"{name} {budget[key] / 60:.1f} min" for name, key in (
          ("set-up", "setup"), ("training", "training"),
          ("evaluation", "evaluation"), ("total", "total")))


def _parse_flags(argv):
  """absl's parser, with a mistyped `--config.x` reported in one line."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    # ml_collections raises these for a key the locked config lacks, with
    # a "Did you mean" hint in the message.
    detail = " ".join(str(e.args[0] if e.args else e).replace(
        "\\n", " ").replace("\\'", "").strip("'\"").split())
    key, _, hint = detail.partition(" ")
    sys.exit(f"FATAL Config override error: unknown config key '{key}'. "
             f"{hint + ' ' if hint else ''}Every key is listed in "
             "configs/common.py.")


def expand_paths(config: ml_collections.ConfigDict) -> None:
  """Expands `~` and `$VARIABLES` in every path-valued key, in place.

  A shell expands `~` only at the start of a word, so in
  `--config.input.data_dir=~/tensorflow_datasets` it reaches us unexpanded.
  Path-valued keys are those named `*_dir`, `*_path` or `*_from`.
  """
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      expand_paths(value)
    elif isinstance(value, str) and key.endswith(("_dir", "_path", "_from")):
      config[key] = prepare.expand_path(value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  expand_paths(config)
  workdir = prepare.expand_path(_WORKDIR.value)
  try:  # Before any set-up: a mistyped trainer fails at once.
    trainer = get_trainer(config.trainer)
  except ValueError as e:
    sys.exit(f"FATAL {e}")
  # TF only feeds data; keep it off accelerators that JAX owns.
  tf.config.set_visible_devices([], "GPU")
  _initialize_distributed()
  logging.info("JAX process %d/%d, %d local / %d global devices",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  try:
    result = trainer(config, workdir)
  except prepare.DatasetNotPreparedError as e:
    # The message says what to run; a traceback would bury it.
    sys.exit(f"FATAL {e}")
  if result.get("preempted"):
    # Exit 0: the scheduler restarts the same command, which resumes.
    if jax.process_index() == 0:
      print(f"Preempted: checkpointed step {result['step']} in "
            f"{workdir}; run the same command again to resume.")
    return
  if jax.process_index() == 0 and "classifier" in result:
    classifier = result["classifier"]
    print(f"\nClassifier after {result['step']} steps on "
          f"{classifier['dataset']} {classifier['split']} "
          f"({classifier['num_test']} images): top-1 "
          f"{100 * classifier['top1']:.2f}, top-5 "
          f"{100 * classifier['top5']:.2f}")
  if jax.process_index() == 0 and "linear_eval" in result:
    print(f"\nLinear evaluation on {result['linear_eval']['dataset']} "
          f"{result['linear_eval']['split']} "
          f"({result['linear_eval']['num_test']} images):")
    print(_result_table(result))
    print(json.dumps({"workdir": workdir,
                      "images_per_sec": result["train"].get("images_per_sec")}))
  if jax.process_index() == 0 and "seconds" in result:
    # Last, so that the next regression is seen the day it happens.
    budget = time_budget(result["seconds"], time.time() - _started_at())
    print(time_budget_line(budget))
    with tf.io.gfile.GFile(os.path.join(workdir, "time_budget.json"),
                           "w") as f:
      json.dump(budget, f, indent=2)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
