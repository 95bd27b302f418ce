"""The result-table command runs its rows and writes the table and plot."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import fake_fashion_mnist
from contrastive import result_table
from contrastive.data import fashion_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _result(name, linear, curve, raw=None):
  result = {"name": name, "label": name.upper(), "loss": "x",
            "linear_top1": linear, "knn20_top1": linear - 0.01,
            "knn200_top1": None, "classifier_top1": None, "epochs": 2.0,
            "train_seconds": 600.0, "run_seconds": 700.0, "curve": curve}
  if raw:
    result["raw_pixels"] = raw
  return result


def test_markdown_lists_every_row_and_raw_pixels(tmp_path):
  results = [
      _result("simclr", 0.8644, [(100.0, 0.8, 0.7), (600.0, 0.85, 0.8)]),
      _result("supcon", 0.8920, [(100.0, 0.85, None)],
              raw={"top1": 0.8392, "knn20_top1": 0.8459, "feature_dim": 784}),
  ]
  table = result_table.markdown(results, total_seconds=1400)
  lines = [line for line in table.splitlines() if line.startswith("| ")]
  assert lines[0].startswith("| method | objective | linear top-1 |")
  assert lines[1] == "| Raw pixels (784-d), no training | - | 83.92 | 84.59 | - | - | - | - | - |"
  assert lines[2] == ("| SIMCLR | x | 86.44 | 85.44 | - | - | 2.0 | 10.0 min | "
                      "11.7 min |")
  assert lines[3].startswith("| SUPCON | x | 89.20 |")
  assert "23 min in all" in table
  path = tmp_path / "table.png"
  result_table.plot(results, str(path))
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_gives_each_row_its_own_style_and_keeps_the_legend_outside():
  results = [_result(f"m{i}", 0.80 + i / 100, [(60.0 * i + 60, 0.8, 0.7)])
             for i in range(24)]
  results[0]["raw_pixels"] = {"top1": 0.84, "feature_dim": 784}
  styles = result_table.method_styles(24)
  assert len(set(styles)) == 24
  assert len({colour for colour, _, _ in styles[:20]}) == 20
  # A row past the 20th shares its colour but neither its line nor marker.
  assert styles[21][0] == styles[1][0]
  assert styles[21][1:] != styles[1][1:]
  colours = [colour for colour, _, _ in styles]
  figure = result_table.figure_of(results, "title")
  try:
    axis, = figure.axes
    legend = axis.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == (
        [f"M{i}" for i in range(24)] + ["kNN top-1 (k=20), online",
                                        "linear top-1, final (the row's "
                                        "marker)",
                                        "Raw pixels (linear)"])
    assert [(tuple(h.get_color()), h.get_linestyle(), h.get_marker())
            for h in legend.legend_handles[:24]] == [
                (tuple(c), s, m) for c, s, m in styles]
    # Each row's final point carries its colour and marker.
    finals = axis.collections
    assert len(finals) == 24
    assert (tuple(finals[21].get_facecolor()[0][:3]) ==
            tuple(colours[1][:3]))
    assert (finals[21].get_paths()[0].vertices.tolist() !=
            finals[1].get_paths()[0].vertices.tolist())
    # Each row's curve carries its colour and line style.
    assert tuple(axis.lines[5].get_color()) == tuple(colours[5])
    assert (tuple(axis.lines[21].get_color()), axis.lines[21].get_linestyle()
            ) == (tuple(colours[1]), "--")
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    assert (legend.get_window_extent(renderer).x0
            >= axis.get_window_extent(renderer).x1)
  finally:
    result_table.plt.close(figure)
  with pytest.raises(ValueError, match="at most 60 rows"):
    result_table.method_styles(61)


def test_merge_keeps_earlier_rows_in_table_order_and_dates_the_table():
  earlier = [dict(_result("simclr", 0.86, []), measured="2026-11-27"),
             dict(_result("gone", 0.5, []), measured="2026-11-27"),
             dict(_result("supcon", 0.89, []), measured="2026-11-27")]
  remeasured = dict(_result("simclr", 0.88, []), measured="2026-11-29")
  merged = result_table.merge(earlier, [remeasured],
                              ["random_init", "supcon", "simclr"])
  assert [(r["name"], r["linear_top1"]) for r in merged] == [
      ("supcon", 0.89), ("simclr", 0.88)]
  assert "Measured 2026-11-27 to 2026-11-29 by" in result_table.markdown(
      merged, total_seconds=1400)


def test_resumed_metrics_keep_the_last_row_per_step(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0},
          {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.0}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert [r["loss"] for r in result_table._read_jsonl(str(path))] == [
      3.0, 1.5, 1.0]


def test_training_time_adds_up_over_resumed_processes(tmp_path):
  # Process 1 logs steps 20..60 and is killed; process 2 resumes from the
  # step-40 checkpoint (its clock from 0) and re-logs 60; process 3 resumes
  # at 80.
  logged = [(20, 10.0), (40, 20.0), (60, 30.0),
            (60, 9.0), (80, 19.0), (100, 4.0), (120, 14.0)]
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "train_time_sec": t}) + "\n"
                          for s, t in logged)
                  + json.dumps({"step": 100, "eval": 1.0,
                                "train_time_sec": 4.0}) + "\n"
                  + '{"step": 130, "train_ti\n')  # Cut short by a kill.
  rows = result_table._read_jsonl(str(path))
  assert [(r["step"], r["train_time_sec"]) for r in rows] == [
      (20, 10.0), (40, 20.0), (60, 29.0), (80, 39.0), (100, 43.0),
      (120, 53.0)]
  # The last process resumed from the step-80 checkpoint: the ones before
  # it trained for 39 s of the final model.
  log = "I1130 checkpoint.py:201] Restoring checkpoint of step 80 from /w\n"
  assert result_table.earlier_train_seconds(rows, log) == 39.0


def test_run_time_adds_the_training_before_the_last_resume():
  # The trainer continues the clock: process 1 logs steps 20..60 and is
  # killed; process 2 tries the step-60 checkpoint, finds it unreadable and
  # resumes from step 40, its clock from 20 s.
  rows = [{"step": s, "train_time_sec": t}
          for s, t in [(20, 10.0), (40, 20.0), (60, 29.0), (80, 39.0)]]
  log = ("Restoring checkpoint of step 60 from /w/checkpoints/60\n"
         "W checkpoint unreadable\n"
         "Restoring checkpoint of step 40 from /w/checkpoints/40\n")
  assert result_table.restored_step(log) == 40
  assert result_table.earlier_train_seconds(rows, log) == 20.0
  # A process that started afresh is the whole run.
  assert result_table.restored_step("I1130 Starting\n") is None
  assert result_table.earlier_train_seconds(rows, "I1130 Starting\n") == 0.0


def test_a_label_names_the_overrides_of_its_run():
  row = result_table.Row("SimCLR, LARS lr 10", "x", "configs/x.py",
                         ("--config.optim.lr=10.0",))
  assert result_table.labelled_with_overrides(row, []) == row.label
  # The row's own lr wins over the override, so only tau is named.
  assert result_table.labelled_with_overrides(
      row, ["--config.optim.lr=5.0", "--config.loss.temperature=0.3"]
  ) == "SimCLR, LARS lr 10 (loss.temperature=0.3)"


@pytest.mark.slow
def test_command_runs_rows_and_reuses_finished_ones(tmp_path):
  source = tmp_path / "fashion_mnist_src"
  source.mkdir()
  fake_fashion_mnist.write(source, num_train=96, num_test=40)
  out = tmp_path / "results"
  command = [
      sys.executable, "-m", "contrastive.result_table",
      f"--workdir={tmp_path / 'table'}", f"--data_dir={tmp_path / 'tfds'}",
      f"--out={out}", "--eval_every=1",
      "--override=--config.total_steps=2",
      "--override=--config.input.batch_size=16",
      "--override=--config.model.depth=10",
      "--override=--config.model.width=0.125",
      "--override=--config.linear_eval.batch_size=16",
      "--override=--config.linear_eval.steps=10",
      "--override=--config.linear_eval.knn_k=(5,)",
      "--override=--config.online_eval.knn_k=5",
      # The fake split has 96 images, not the 10k the table's kNN uses.
      "--override=--config.online_eval.knn_train_split=train"]
  both_rows = command + ["--rows=random_init,simclr"]
  env = {**os.environ, fashion_mnist.ENV_VAR: str(source)}
  proc = subprocess.run(both_rows, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  table = (out / "fashion_mnist.md").read_text()
  # Each label names the overrides its run was launched with, but not the
  # ones the row sets itself (random_init's total_steps=0 wins).
  assert "| Random init (no training) (input.batch_size=16," in table
  assert "| SimCLR (total_steps=2, input.batch_size=16," in table
  results = json.loads((out / "fashion_mnist.json").read_text())
  assert [r["name"] for r in results] == ["random_init", "simclr"]
  random_init, simclr = results
  assert random_init["epochs"] == 0 and random_init["curve"] == []
  # Online evaluation at both steps of the SimCLR run.
  assert len(simclr["curve"]) == 2
  assert (out / "fashion_mnist.png").stat().st_size > 0
  # A second call reuses the finished runs.
  proc = subprocess.run(both_rows, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count("reusing the finished run") == 2
  # With --merge, a row whose workdir is gone keeps its recorded result.
  shutil.rmtree(tmp_path / "table" / "random_init")
  proc = subprocess.run(command + ["--rows=simclr", "--merge"], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count("reusing the finished run") == 1
  assert json.loads((out / "fashion_mnist.json").read_text()) == results


@pytest.mark.slow
def test_biased_table_trains_fairkl_with_bias_labels(tmp_path):
  """The debiasing table end to end: the biased builder, bias labels
  through the pipeline into the FairKL loss, scored on the unbiased split."""
  source = tmp_path / "fashion_mnist_src"
  source.mkdir()
  fake_fashion_mnist.write(source, num_train=96, num_test=40)
  out = tmp_path / "results"
  command = [
      sys.executable, "-m", "contrastive.result_table",
      "--table=biased_fashion_mnist", f"--workdir={tmp_path / 'table'}",
      f"--data_dir={tmp_path / 'tfds'}", f"--out={out}",
      "--rows=fairkl_rho0.99", "--eval_every=2",
      "--override=--config.total_steps=2",
      "--override=--config.log_every_steps=1",
      "--override=--config.input.batch_size=16",
      "--override=--config.model.depth=10",
      "--override=--config.model.width=0.125",
      "--override=--config.linear_eval.batch_size=16",
      "--override=--config.linear_eval.steps=10",
      "--override=--config.linear_eval.knn_k=(5,)",
      "--override=--config.online_eval.knn_k=5",
      "--override=--config.online_eval.knn_train_split=train"]
  env = {**os.environ, fashion_mnist.ENV_VAR: str(source)}
  proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  table = (out / "biased_fashion_mnist.md").read_text()
  assert "| unbiased linear top-1 |" in table
  assert "| epsilon-SupInfoNCE + FairKL, rho 0.99 (total_steps=2," in table
  metrics = [json.loads(line) for line in
             (tmp_path / "table" / "fairkl_rho0.99" / "metrics.jsonl")
             .read_text().splitlines()]
  # The regulariser ran on the bias labels: logged, finite, not constant 0.
  fairkl = [m["fairkl"] for m in metrics if "fairkl" in m]
  assert len(fairkl) == 2 and all(np.isfinite(fairkl))
  assert any(value != 0.0 for value in fairkl)


def test_long_tailed_table_adds_many_medium_few_columns():
  result = _result("rescom", 0.75, [])
  result.update(
      classifier_top1=0.7,
      linear_long_tail={"many_top1": 0.9, "medium_top1": 0.7,
                        "few_top1": 0.55},
      classifier_long_tail={"many_top1": 0.8, "medium_top1": 0.65,
                            "few_top1": None})
  table = result_table.markdown([result], total_seconds=700,
                                table=result_table.TABLES["fashion_mnist_lt"])
  lines = [line for line in table.splitlines() if line.startswith("| ")]
  assert lines[0].endswith("| linear many / medium / few | own classifier "
                           "many / medium / few |")
  assert "|---" * 11 + "|" in table.splitlines()
  assert lines[1].endswith("| 90.00 / 70.00 / 55.00 | 80.00 / 65.00 / - |")
  # The balanced tables keep their nine columns.
  assert "many" not in result_table.markdown([_result("a", 0.5, [])], 1)


def test_open_world_table_adds_the_clustering_column():
  result = _result("opencon", 0.8, [])
  result["clustering"] = {"all_top1": 0.6, "seen_top1": 0.9,
                          "novel_top1": 0.45}
  table = result_table.markdown([result], total_seconds=600,
                                table=result_table.TABLES["open_world"])
  lines = [line for line in table.splitlines() if line.startswith("| ")]
  assert lines[0].endswith("| clustering all / seen / novel |")
  assert "|---" * 10 + "|" in table.splitlines()
  assert lines[1].endswith("| 60.00 / 90.00 / 45.00 |")
