r"""The Fashion-MNIST result table: each method, same encoder and budget.

  make table
  # = XLA_FLAGS=--xla_force_host_platform_device_count=8 \
  #   python -m contrastive.result_table --workdir=/tmp/contrastive/table \
  #       --data_dir=/tmp/contrastive/tensorflow_datasets --out=results

Each row is one run of `contrastive.main` (a subprocess on 8 simulated CPU
devices) into `workdir/<row>`: the same ResNet-18 (CIFAR stem, width 1/4; one
SimCLR row at width 1/2), batch, epochs and input size, from
`configs/smoke_fashion_mnist.py` and `configs/ce_fashion_mnist.py`. Every run
is scored by the same frozen-feature protocols (L-BFGS linear probe, weighted
kNN) and evaluated online every `--eval_every` steps (kNN against 10k training
images), which gives the accuracy-against-training-time curves. Rows whose
workdir already holds a finished run are read, not re-run (`--rerun` re-runs
them; an interrupted run resumes from its checkpoint). `--merge` keeps the rows
of an existing `out/<table>.json` that this call does not run, so rows measured
on different days (whose workdirs may be gone) stay in one table.

Writes `out/fashion_mnist.md` (the table, with the command, machine and
total time) and `out/fashion_mnist.png`. A new method joins the table by
adding a `Row` to `ROWS`.

`--table=biased_fashion_mnist` (`make table-biased`) runs the debiasing
table instead: CE, SupCon, epsilon-SupInfoNCE and FairKL trained on
colour-biased Fashion-MNIST (rho 0.99 and 0.997) and scored on the
unbiased test split (`configs/fairkl_biased_fashion_mnist.py`), written to
`out/biased_fashion_mnist.md` / `.json` / `.png`.

`--table=fashion_mnist_lt` (`make table-lt`) trains CE, SupCon, PaCo and
ResCom on Fashion-MNIST-LT (imbalance 100) and adds the many / medium /
few-shot top-1 of the linear probe and of each model's own classifier.
"""

import dataclasses
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time

from absl import app
from absl import flags
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
from matplotlib import lines as plot_lines  # pylint: disable=g-import-not-at-top


def _define_flags() -> None:
  """Defines the command's flags; only when run as a command, so that
  importing this module next to another absl entry point cannot clash."""
  global _WORKDIR, _OUT, _DATA_DIR, _ROWS, _RERUN, _OVERRIDES, _EVAL_EVERY
  global _EPOCHS, _TABLE, _MERGE
  _TABLE = flags.DEFINE_enum("table", "fashion_mnist", list(TABLES),
                             "Which table to run and write.")
  _WORKDIR = flags.DEFINE_string("workdir", "/tmp/contrastive/table",
                                 "One sub-folder per row.")
  _OUT = flags.DEFINE_string("out", "results", "Where the .md and .png go.")
  _DATA_DIR = flags.DEFINE_string(
      "data_dir", None, "TFDS data_dir (the prepared Fashion-MNIST builder).")
  _ROWS = flags.DEFINE_list("rows", None, "Rows to run (default: all).")
  _RERUN = flags.DEFINE_bool("rerun", False, "Re-run rows that finished.")
  _MERGE = flags.DEFINE_bool(
      "merge", False, "Keep the rows of the existing out/<table>.json that "
      "this call does not run (rows it runs replace their old entries).")
  _OVERRIDES = flags.DEFINE_multi_string(
      "override", [], "Extra `--config.x=y` for every row (a row's own "
      "settings win), e.g. --override=--config.input.batch_size=512.")
  _EPOCHS = flags.DEFINE_float(
      "epochs", None, "The training budget of every trained row; default "
      "the table's own (fashion_mnist: 5, where two epochs left SimCLR 2.45 "
      "points above raw pixels, 2026-11-29; biased_fashion_mnist: 2).")
  _EVAL_EVERY = flags.DEFINE_integer(
      "eval_every", 234, "Online kNN/probe evaluation every this many steps "
      "(234 = about one epoch at batch 256).")


RUN_RECORD = "table_run.json"
RUN_LOG = "table_run.log"  # The last process's output.
RAW_PIXELS = "raw_pixels"


@dataclasses.dataclass(frozen=True)
class Row:
  label: str
  loss: str  # What the table says the objective is.
  config: str  # configs/<file>[:arg]
  overrides: tuple[str, ...] = ()
  # Whether the run scores raw pixels too (one row needs to).
  raw_pixels: bool = False


# Twice the default encoder width: 256-d features instead of 128-d. The
# table's header counts on the label naming the width.
_WIDTH_HALF = "--config.model.width=0.5"
_WIDTH_HALF_LABEL = ", encoder width 1/2 (256-d features)"

ROWS = {
    "random_init": Row(
        "Random init (no training)", "-",
        "configs/smoke_fashion_mnist.py:simclr", ("--config.total_steps=0",)),
    "ce": Row("Supervised cross-entropy (CE)", "cross-entropy",
              "configs/ce_fashion_mnist.py"),
    "simclr": Row("SimCLR", "NT-Xent, tau 0.2",
                  "configs/smoke_fashion_mnist.py:simclr"),
    # SimCLR's learning rate, tuned alone: the other label-free rows keep the
    # shared lr 5, so the "SimCLR" row is the one to compare them with.
    "simclr_lr10": Row("SimCLR, LARS lr 10", "NT-Xent, tau 0.2",
                       "configs/smoke_fashion_mnist.py:simclr",
                       ("--config.optim.lr=10.0",)),
    "simclr_lr20": Row("SimCLR, LARS lr 20", "NT-Xent, tau 0.2",
                       "configs/smoke_fashion_mnist.py:simclr",
                       ("--config.optim.lr=20.0",)),
    # Twice the table's budget: how far SimCLR gets with more epochs, not a
    # same-budget comparison (its row's own epochs win over --epochs).
    "simclr_lr10_10ep": Row("SimCLR, LARS lr 10, 10 epochs",
                            "NT-Xent, tau 0.2",
                            "configs/smoke_fashion_mnist.py:simclr",
                            ("--config.optim.lr=10.0",
                             "--config.total_epochs=10.0")),
    "supcon": Row("SupCon", "SupCon L_out, tau 0.2",
                  "configs/smoke_fashion_mnist.py:supcon", raw_pixels=True),
    # The baselines again at twice the encoder width (256-d features, about
    # 4x the FLOPs), where SimCLR's linear probe is no longer held back by
    # 128-d features; SimCLR keeps the lr tuned for it at width 1/4.
    "random_init_width_half": Row(
        "Random init" + _WIDTH_HALF_LABEL, "-",
        "configs/smoke_fashion_mnist.py:simclr",
        ("--config.total_steps=0", _WIDTH_HALF)),
    "ce_width_half": Row(
        "Supervised cross-entropy (CE)" + _WIDTH_HALF_LABEL,
        "cross-entropy", "configs/ce_fashion_mnist.py", (_WIDTH_HALF,)),
    "simclr_lr10_width_half": Row(
        "SimCLR, LARS lr 10" + _WIDTH_HALF_LABEL,
        "NT-Xent, tau 0.2", "configs/smoke_fashion_mnist.py:simclr",
        ("--config.optim.lr=10.0", _WIDTH_HALF)),
    "supcon_width_half": Row(
        "SupCon" + _WIDTH_HALF_LABEL, "SupCon L_out, tau 0.2",
        "configs/smoke_fashion_mnist.py:supcon", (_WIDTH_HALF,)),
    "dcl": Row("DCL", "decoupled NT-Xent, tau 0.2",
               "configs/smoke_fashion_mnist.py:dcl"),
    "dclw": Row("DCLW", "decoupled NT-Xent, vMF weights, tau 0.2",
                "configs/smoke_fashion_mnist.py:dclw"),
    "eps_supinfonce": Row("epsilon-SupInfoNCE", "tau 0.2, eps 0.25",
                          "configs/smoke_fashion_mnist.py:eps_supinfonce"),
    "eps_supcon": Row("epsilon-SupCon", "tau 0.2, eps 0.25",
                      "configs/smoke_fashion_mnist.py:eps_supcon"),
    "esupcon": Row("ESupCon", "SupCon + class prototypes, tau 0.2",
                   "configs/smoke_fashion_mnist.py:esupcon"),
    "unicon": Row("UniCon", "views vs mixup universum, tau 0.2",
                  "configs/smoke_fashion_mnist.py:unicon"),
    "fnc": Row("FNC", "NT-Xent, 2+2 views, false negatives attracted, tau 0.2",
               "configs/smoke_fashion_mnist.py:fnc"),
    "fn_removal": Row("False-negative removal",
                      "NT-Xent, false negatives removed, tau 0.2",
                      "configs/smoke_fashion_mnist.py:fn_removal"),
    "bregman": Row("Deep Bregman", "NT-Xent + Bregman term, tau 0.2",
                   "configs/smoke_fashion_mnist.py:bregman"),
    "excon": Row("ExCon", "SupCon over Grad-CAM-masked views + background "
                 "negatives, tau 0.2", "configs/smoke_fashion_mnist.py:excon"),
    "moco": Row("MoCo v2 (symmetrised)",
                "InfoNCE vs batch keys + 4096-key queue, EMA key encoder, "
                "tau 0.2", "configs/smoke_fashion_mnist.py:moco"),
    "mochi": Row("MoCHi", "MoCo + synthetic hard negatives (1024, 256, 128)",
                 "configs/smoke_fashion_mnist.py:mochi"),
    "sce": Row("SCE", "MoCo with soft targets, lambda 0.5, tau_m 0.07",
               "configs/smoke_fashion_mnist.py:sce"),
    "relic": Row("ReLIC", "MoCo + invariance KL, alpha 1",
                 "configs/smoke_fashion_mnist.py:relic"),
    "renyicl": Row("RenyiCL", "skew-Renyi surrogate, gamma 2, batch keys",
                   "configs/smoke_fashion_mnist.py:renyicl"),
    "paco": Row("PaCo", "class centres + batch + queue, EMA key encoder",
                "configs/smoke_fashion_mnist.py:paco"),
    "gpaco": Row("GPaCo", "class centres + batch + queue, no key encoder",
                 "configs/smoke_fashion_mnist.py:gpaco"),
    "cmc": Row("CMC", "intensities vs Sobel derivatives, an encoder each, "
               "tau 0.2", "configs/smoke_fashion_mnist.py:cmc"),
    "ifnd": Row("IFND", "NT-Xent without k-means false negatives (k 10 and "
                "30, accepted fraction 0 to 1), tau 0.2",
                "configs/smoke_fashion_mnist.py:ifnd"),
    "interclr": Row("InterCLR", "0.75 MoCo + 0.25 MarginNCE vs a clustered "
                    "60k memory bank", "configs/smoke_fashion_mnist.py:"
                    "interclr"),
}


@dataclasses.dataclass(frozen=True)
class Table:
  title: str
  description: str  # What the rows share and how they are scored.
  rows: dict[str, Row]
  epochs: float  # The default training budget of every trained row.
  linear_column: str = "linear top-1"
  make_target: str = "table"
  # Long-tailed training sets: many / medium / few-shot columns for the
  # linear probe and the model's own classifier.
  long_tail: bool = False
  # Open-world training sets: the all / seen / novel clustering accuracy.
  clustering: bool = False


_BIASED_ROWS = {}
for _rho in ("0.99", "0.997"):
  for _method, _label, _loss in (
      ("ce", "CE", "cross-entropy"),
      ("supcon", "SupCon", "SupCon L_out, tau 0.1"),
      ("eps_supinfonce", "epsilon-SupInfoNCE", "tau 0.1, eps 0.25"),
      ("fairkl", "epsilon-SupInfoNCE + FairKL", "tau 0.1, eps 0.25, "
       "lambda 1")):
    _BIASED_ROWS[f"{_method}_rho{_rho}"] = Row(
        f"{_label}, rho {_rho}", _loss,
        f"configs/fairkl_biased_fashion_mnist.py:{_method},rho={_rho}")

_LT = "dataset=fashion_mnist_lt/if100"
_LT_ROWS = {
    "ce_lt": Row("Cross-entropy (CE)", "cross-entropy",
                 f"configs/ce_fashion_mnist.py:{_LT}"),
    "supcon_lt": Row("SupCon", "SupCon L_out, tau 0.2",
                     f"configs/smoke_fashion_mnist.py:supcon,{_LT}"),
    "paco_lt": Row("PaCo", "class centres + log prior + batch + queue, EMA "
                   "key encoder", f"configs/smoke_fashion_mnist.py:paco,{_LT}",
                   ("--config.loss.class_prior=True",)),
    "rescom": Row("ResCom", "Balanced Softmax + class-balanced SupCon, "
                  "hard mining from 10 keys per class",
                  "configs/smoke_fashion_mnist.py:rescom"),
}

_OPEN_WORLD_ROWS = {
    "opencon": Row("OpenCon", "SimCLR + SupCon (labelled) + prototype "
                   "pseudo-labels (novel), EMA prototypes",
                   "configs/smoke_fashion_mnist.py:opencon"),
}

TABLES = {
    "fashion_mnist": Table(
        "Fashion-MNIST, CPU: linear and kNN evaluation of frozen encoders",
        "Encoder: ResNet-18 (CIFAR stem, width 1/4, 128-d features, unless "
        "the label says width 1/2); batch "
        "256 images; 28 px; the 10k test images. Linear top-1: multinomial "
        "logistic regression (L-BFGS) on frozen, standardised features of "
        "the 60k training images, its L2 strength picked from 1e-6..1e-2 on "
        "a held-out 10% of them (raw pixels too). kNN: cosine, temperature-0.07 weighted "
        "votes (InstDisc). Own classifier: the CE model's softmax layer, "
        "ESupCon's prototypes, PaCo's and GPaCo's linear classifier. "
        "Training time excludes compilation and the online evaluation.",
        ROWS, epochs=5.0),
    "biased_fashion_mnist": Table(
        "Biased Fashion-MNIST, CPU: unbiased test accuracy (FairKL)",
        "Training images carry a background colour that matches their class "
        "with probability rho (`biased_fashion_mnist/rho...`); the 10k test "
        "images have random colours, so their accuracy is the unbiased "
        "accuracy. Encoder: ResNet-18 (CIFAR stem, width 1/4); batch 256; "
        "crop + flip views (no colour augmentation). Unbiased top-1: the "
        "L-BFGS linear probe fitted on the biased training features. "
        "Training time excludes compilation and the online evaluation.",
        _BIASED_ROWS, epochs=2.0, linear_column="unbiased linear top-1",
        make_target="table-biased"),
    "fashion_mnist_lt": Table(
        "Fashion-MNIST-LT (imbalance 100), CPU: long-tailed classification",
        "Training split: `fashion_mnist_lt/if100`, Cao et al.'s exponential "
        "profile from 6000 to 60 images per class (14,886 in all); test: "
        "the balanced 10k images. Many / medium / few-shot: classes with "
        "more than 1000 / 200 to 1000 / fewer than 200 training images (4 "
        "/ 3 / 3 classes). Encoder, batch and input as the Fashion-MNIST "
        "table. Linear top-1: the L-BFGS probe fitted on the long-tailed "
        "training features; own classifier: CE's softmax layer, PaCo's and "
        "ResCom's linear classifier (ResCom's trained with Balanced "
        "Softmax, PaCo's with the log prior). Training time excludes "
        "compilation and the online evaluation.",
        _LT_ROWS, epochs=5.0, make_target="table-lt", long_tail=True),
    "open_world": Table(
        "Open-world Fashion-MNIST, CPU: clustering accuracy of novel classes",
        "Training split: `open_world/fashion_mnist_seen5_labeled50`, classes "
        "0-4 seen with half their images labelled, classes 5-9 novel and "
        "unlabelled; test: the 10k images. Clustering accuracy (ORCA's "
        "protocol): each test image goes to its nearest prototype; all and "
        "novel are Hungarian-matched, seen is plain accuracy. Encoder, batch "
        "and input as the Fashion-MNIST table; the linear probe and kNN use "
        "every training label (an upper reference, not the open-world "
        "metric).", _OPEN_WORLD_ROWS, epochs=5.0,
        make_target="table-open-world", clustering=True),
}


def _epochs(table: Table) -> float:
  return table.epochs if _EPOCHS.value is None else _EPOCHS.value


def _command(row: Row, workdir: str, epochs: float) -> list[str]:
  command = [sys.executable, "-m", "contrastive.main",
             f"--config={row.config}", f"--workdir={workdir}",
             f"--config.linear_eval.raw_pixel_baseline={row.raw_pixels}",
             f"--config.online_eval.every_steps={_EVAL_EVERY.value}",
             "--config.online_eval.knn_train_split=train[:10000]",
             f"--config.total_epochs={epochs}",
             *_OVERRIDES.value, *row.overrides]
  if _DATA_DIR.value:
    command.append(f"--config.input.data_dir={_DATA_DIR.value}")
  return command


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def _read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  rows = {}
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # A line cut short by a kill.
        continue
      rows[row["step"]] = row  # A resumed run repeats steps: keep the last.
  return _cumulative_train_time([rows[step] for step in sorted(rows)])


def _cumulative_train_time(rows: list[dict]) -> list[dict]:
  """Rows whose train_time_sec counts every process of a resumed run.

  The trainer continues the clock of the run it resumes; before 2026-11-30
  each process's clock started at 0, so a fall marks a resume, and the
  earlier processes' last logged times are added to the later ones (steps
  trained after the last log before a kill are not counted, nor are they in
  the final model).
  """
  offset, previous, cumulative = 0.0, 0.0, []
  for row in rows:
    if "train_time_sec" in row:
      if row["train_time_sec"] < previous:
        offset += previous
      previous = row["train_time_sec"]
      row = dict(row, train_time_sec=row["train_time_sec"] + offset)
    cumulative.append(row)
  return cumulative


# What contrastive.checkpoint logs before it restores a checkpoint; a failed
# restore falls back to an older one and logs again, so the last one counts.
_RESTORE_MESSAGE = re.compile(r"Restoring checkpoint of step (\d+)")


def restored_step(log_text: str) -> int | None:
  """The step a logged process resumed from; None if it started afresh."""
  steps = _RESTORE_MESSAGE.findall(log_text)
  return int(steps[-1]) if steps else None


def earlier_train_seconds(metrics: list[dict], run_log: str) -> float:
  """Training time of the processes before the one that wrote run_log.

  The run record times only the last process of a resumed run; the ones
  before it trained up to the step it restored (later steps they logged are
  not in the final model).
  """
  step = restored_step(run_log)
  if step is None:
    return 0.0
  return max((m["train_time_sec"] for m in metrics
              if m["step"] <= step and "train_time_sec" in m), default=0.0)


def run_row(name: str, row: Row, workdir: str, epochs: float) -> dict:
  """Runs (or reuses) one row; returns its record."""
  record_path = os.path.join(workdir, RUN_RECORD)
  if os.path.exists(record_path) and not _RERUN.value:
    print(f"[{name}] reusing the finished run in {workdir}", flush=True)
    return _read_json(record_path)
  command = _command(row, workdir, epochs)
  print(f"[{name}] {' '.join(command)}", flush=True)
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=8")
  start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, RUN_LOG), "w") as log:
    proc = subprocess.run(command, env=env, stdout=log,
                          stderr=subprocess.STDOUT, check=False)
  seconds = time.perf_counter() - start
  if proc.returncode != 0:
    raise RuntimeError(f"Row '{name}' failed (exit {proc.returncode}); see "
                       f"{workdir}/table_run.log and run again to resume.")
  record = {"name": name, "command": command, "seconds": seconds,
            "overrides": list(_OVERRIDES.value)}
  with open(record_path, "w") as f:
    json.dump(record, f, indent=2)
  print(f"[{name}] done in {seconds / 60:.1f} min", flush=True)
  return record


def labelled_with_overrides(row: Row, overrides) -> str:
  """The row's label, naming the `--override`s its run was launched with,
  so that a tried setting is not mistaken for the row's declared one (those
  the row sets itself won and are left out)."""
  own = {o.split("=", 1)[0] for o in row.overrides}
  settings = [o.removeprefix("--config.") for o in overrides
              if o.split("=", 1)[0] not in own]
  return f"{row.label} ({', '.join(settings)})" if settings else row.label


def collect(name: str, row: Row, workdir: str, record: dict) -> dict:
  """The table's numbers for one row, from the files its run wrote."""
  evaluation = _read_json(os.path.join(workdir, "linear_eval.json"))
  metrics = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  run_log_path = os.path.join(workdir, RUN_LOG)
  run_log = ""
  if os.path.exists(run_log_path):
    with open(run_log_path, errors="replace") as f:
      run_log = f.read()
  classifier_path = os.path.join(workdir, "classifier_eval.json")
  record_path = os.path.join(workdir, RUN_RECORD)
  measured = (datetime.date.fromtimestamp(os.path.getmtime(record_path))
              if os.path.exists(record_path) else datetime.date.today())
  result = {
      "name": name,
      "label": labelled_with_overrides(row, record.get("overrides", ())),
      "loss": row.loss,
      "measured": measured.isoformat(),
      "linear_top1": evaluation["top1"],
      "knn20_top1": evaluation.get("knn20_top1"),
      "knn200_top1": evaluation.get("knn200_top1"),
      "classifier_top1": (_read_json(classifier_path)["top1"]
                          if os.path.exists(classifier_path) else None),
      "linear_long_tail": evaluation.get("long_tail"),
      "clustering": (_read_json(os.path.join(workdir, "clustering_eval.json"))
                     if os.path.exists(os.path.join(
                         workdir, "clustering_eval.json")) else None),
      "classifier_long_tail": (
          _read_json(classifier_path).get("long_tail")
          if os.path.exists(classifier_path) else None),
      "epochs": metrics[-1]["epoch"] if metrics else 0.0,
      "train_seconds": metrics[-1]["train_time_sec"] if metrics else 0.0,
      # The record times the last process; earlier ones count their training.
      "run_seconds": record["seconds"] + earlier_train_seconds(metrics,
                                                               run_log),
      "curve": [(m["train_time_sec"], m["online/knn_top1"],
                 m.get("online/probe_top1")) for m in metrics
                if "online/knn_top1" in m],
  }
  if RAW_PIXELS in evaluation:
    result[RAW_PIXELS] = evaluation[RAW_PIXELS]
  return result


def _percent(value) -> str:
  return "-" if value is None else f"{100 * value:.2f}"


def _minutes(seconds) -> str:
  return "-" if not seconds else f"{seconds / 60:.1f} min"


def _shots(long_tail) -> str:
  """'many / medium / few' top-1 of a `long_tail` result, or '-'."""
  if not long_tail:
    return "-"
  return " / ".join(_percent(long_tail.get(f"{group}_top1"))
                    for group in ("many", "medium", "few"))


def merge(previous: list[dict], measured: list[dict],
          row_order: list[str]) -> list[dict]:
  """`previous` rows updated by the `measured` ones, in the table's order.

  Rows no longer in the table are dropped: their method is gone.
  """
  by_name = {r["name"]: r for r in previous}
  by_name.update((r["name"], r) for r in measured)
  return [by_name[name] for name in row_order if name in by_name]


def _measured_dates(results: list[dict]) -> str:
  dates = sorted({r["measured"] for r in results if r.get("measured")})
  if not dates:
    return datetime.date.today().isoformat()
  return dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"


def markdown(results: list[dict], total_seconds: float,
             table: Table = TABLES["fashion_mnist"]) -> str:
  shot_columns = (" linear many / medium / few | own classifier many / "
                  "medium / few |" if table.long_tail else "")
  if table.clustering:
    shot_columns += " clustering all / seen / novel |"
  header = (f"| method | objective | {table.linear_column} | "
            "kNN top-1 (k=20) | "
            "kNN top-1 (k=200) | own classifier top-1 | epochs | "
            "training time | run time (with evaluation) |" + shot_columns)
  columns = 9 + 2 * table.long_tail + table.clustering
  lines = [header, "|---" * columns + "|"]
  for raw in (r[RAW_PIXELS] for r in results if RAW_PIXELS in r):
    lines.append(
        f"| Raw pixels ({raw['feature_dim']}-d), no training | - | "
        f"{_percent(raw['top1'])} | {_percent(raw.get('knn20_top1'))} | "
        f"{_percent(raw.get('knn200_top1'))} | - | - | - | - |"
        + (" - | - |" if table.long_tail else "")
        + (" - |" if table.clustering else ""))
  for r in results:
    shots = (f" {_shots(r.get('linear_long_tail'))} | "
             f"{_shots(r.get('classifier_long_tail'))} |"
             if table.long_tail else "")
    if table.clustering:
      found = r.get("clustering") or {}
      shots += " " + (" / ".join(_percent(found.get(f"{name}_top1"))
                                 for name in ("all", "seen", "novel"))
                      if found else "-") + " |"
    lines.append(
        f"| {r['label']} | {r['loss']} | {_percent(r['linear_top1'])} | "
        f"{_percent(r['knn20_top1'])} | {_percent(r['knn200_top1'])} | "
        f"{_percent(r['classifier_top1'])} | {r['epochs']:.1f} | "
        f"{_minutes(r['train_seconds'])} | {_minutes(r['run_seconds'])} |"
        + shots)
  cpu = platform.processor() or platform.machine()
  return "\n".join([
      f"# {table.title}",
      "",
      f"Measured {_measured_dates(results)} by "
      f"`make {table.make_target}` "
      f"(`python -m contrastive.result_table`) on {os.cpu_count()} CPU "
      f"cores ({cpu}), 8 simulated devices; {total_seconds / 60:.0f} min in "
      "all.",
      "",
      table.description,
      "",
      *lines,
      "",
  ])


LINE_STYLES = ("-", "--", ":")
# The final linear top-1 is a point, which has no line style: past 20 rows
# the marker tells rows of one colour apart.
FINAL_MARKERS = ("*", "D", "P")


def method_styles(count: int) -> list[tuple[tuple[float, ...], str, str]]:
  """`count` distinct (colour, line style, final marker) triples: tab20's
  dark shades first, then its light, solid with stars; past 20 rows the
  colours again, dashed with diamonds, then dotted with plus signs."""
  limit = 20 * len(LINE_STYLES)
  if count > limit:
    raise ValueError(f"The plot tells at most {limit} rows apart, got "
                     f"{count}; plot fewer rows (--rows) or split the table.")
  palette = plt.get_cmap("tab20").colors
  dark_then_light = [palette[2 * j % 20 + 2 * j // 20] for j in range(20)]
  return [(dark_then_light[i % 20], LINE_STYLES[i // 20],
           FINAL_MARKERS[i // 20]) for i in range(count)]


def figure_of(results: list[dict], title: str) -> plt.Figure:
  """Online kNN curves and final linear top-1, one legend entry per row."""
  figure, axis = plt.subplots(figsize=(9, 4.5))
  styles = method_styles(len(results))
  for r, (colour, line_style, marker) in zip(results, styles):
    if r["curve"]:
      times, knn_top1, _ = zip(*r["curve"])
      axis.plot([t / 60 for t in times], [100 * a for a in knn_top1],
                marker="o", markersize=3, color=colour, linestyle=line_style)
    axis.scatter([r["train_seconds"] / 60], [100 * r["linear_top1"]],
                 marker=marker, s=120 if marker == "*" else 60,
                 color=colour, edgecolors="black", linewidths=0.5, zorder=3)
  # One proxy per row (its colour, line style and final mark) and one per
  # mark (its meaning), so that the legend stays a column of rows however
  # many there are.
  handles = [plot_lines.Line2D([], [], color=colour, linestyle=line_style,
                               linewidth=2, marker=marker,
                               markersize=8 if marker == "*" else 5,
                               label=r["label"])
             for r, (colour, line_style, marker) in zip(results, styles)]
  handles += [
      plot_lines.Line2D([], [], color="black", marker="o", markersize=3,
                        label="kNN top-1 (k=20), online"),
      plot_lines.Line2D([], [], color="black", marker="*", markersize=10,
                        linestyle="none",
                        label="linear top-1, final (the row's marker)")]
  for raw in (r[RAW_PIXELS] for r in results if RAW_PIXELS in r):
    handles.append(axis.axhline(100 * raw["top1"], color="grey",
                                linestyle="--", label="Raw pixels (linear)"))
  axis.set_xlabel("training time (min, 2 CPU cores)")
  axis.set_ylabel("test top-1 (%)")
  axis.set_title(title)
  axis.grid(alpha=0.3)
  # Outside the axes: inside, a dozen rows' entries hid the curves.
  axis.legend(handles=handles, fontsize=7, loc="upper left",
              bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
  figure.tight_layout()
  return figure


def plot(results: list[dict], path: str,
         title: str = "Fashion-MNIST: accuracy against training time") -> None:
  figure = figure_of(results, title)
  figure.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(figure)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  table = TABLES[_TABLE.value]
  names = _ROWS.value or list(table.rows)
  unknown = sorted(set(names) - set(table.rows))
  if unknown:
    raise app.UsageError(f"Unknown rows {unknown}; known: "
                         f"{list(table.rows)}.")
  start = time.perf_counter()
  results = []
  for name in names:
    workdir = os.path.join(_WORKDIR.value, name)
    record = run_row(name, table.rows[name], workdir, _epochs(table))
    results.append(collect(name, table.rows[name], workdir, record))
  out = os.path.join(_OUT.value, _TABLE.value)
  if _MERGE.value and os.path.exists(out + ".json"):
    results = merge(_read_json(out + ".json"), results, list(table.rows))
  # Reused rows count with the time they took when they ran.
  total = sum(r["run_seconds"] for r in results)
  os.makedirs(_OUT.value, exist_ok=True)
  text = markdown(results, total, table)
  with open(out + ".md", "w") as f:
    f.write(text)
  with open(out + ".json", "w") as f:
    json.dump(results, f, indent=2)
  plot(results, out + ".png", table.title)
  print(text)
  print(f"Wrote {out}.md and .png "
        f"({(time.perf_counter() - start) / 60:.1f} min this time).")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
