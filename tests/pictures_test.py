"""Pictures of a run: metric rows, curves, t-SNE, and the CLI end to end."""

import json
import os
import subprocess
import sys

from matplotlib import image
import numpy as np
import pytest

import fake_fashion_mnist
import pretrained_test
from contrastive import pictures
from contrastive.data import fashion_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _rows(keys, steps=range(1, 11)):
  return [{"step": s, **{k: 1.0 / s for k in keys}} for s in steps]


def _png_width(path) -> int:
  with open(path, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE
  return image.imread(path).shape[1]


def test_read_metrics_keeps_the_last_row_of_each_step(tmp_path):
  path = tmp_path / "metrics.jsonl"
  lines = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0},
           {"step": 3, "loss": 3.0},
           # Resumed from the checkpoint of step 1: steps 2, 3 again.
           {"step": 2, "loss": 4.5}, {"step": 3, "loss": 3.5, "x": 1.0},
           {"step": 4, "loss": float("nan")}]
  text = "\n".join(json.dumps(line) for line in lines)
  path.write_text(text + '\n\n{"step": 5, "lo')  # Cut short by a crash.

  rows = pictures.read_metrics(str(path))

  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert [r["loss"] for r in rows[:3]] == [5.0, 4.5, 3.5]
  assert rows[2]["x"] == 1.0
  assert np.isnan(rows[3]["loss"])


def test_plot_curves_draws_the_panels_whose_keys_exist(tmp_path):
  rows = _rows(["loss", "probe_train_top1"])
  for row in rows[4::5]:  # Periodic evaluation rows.
    row.update({"online/probe_top1": 0.5, "online/knn_top1": 0.6})
  all_path, loss_path, probe_path = (str(tmp_path / f"{n}.png")
                                     for n in ("all", "loss", "probe"))

  assert pictures.plot_curves(rows, all_path) == ["loss", "probe_top1",
                                                   "knn_top1"]
  assert pictures.plot_curves(_rows(["loss", "learning_rate"]),
                              loss_path) == ["loss"]
  # Online evaluation alone (a run without loss rows is unusual but valid).
  assert pictures.plot_curves(_rows(["online/probe_top1"]),
                              probe_path) == ["probe_top1"]
  for path in (all_path, loss_path, probe_path):
    assert os.path.getsize(path) > 1000
  # One panel per drawn quantity: three panels, three times as wide.
  ratio = _png_width(all_path) / _png_width(loss_path)
  assert 2.5 < ratio < 3.5


def test_plot_curves_without_known_keys_fails(tmp_path):
  with pytest.raises(ValueError, match="No curve"):
    pictures.plot_curves(_rows(["learning_rate"]), str(tmp_path / "x.png"))


def test_tsne_keeps_separated_clusters_apart():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(3, 32)) * 10
  labels = np.repeat(np.arange(3), 40)
  features = centres[labels] + rng.normal(size=(len(labels), 32))

  points = pictures.tsne_embedding(features, seed=0)

  assert points.shape == (120, 2)
  assert points.dtype == np.float32
  centroids = np.stack([points[labels == c].mean(0) for c in range(3)])
  distances = np.linalg.norm(points[:, None] - centroids[None], axis=-1)
  assert np.mean(np.argmin(distances, axis=1) == labels) == 1.0
  # Deterministic for a seed.
  np.testing.assert_array_equal(pictures.tsne_embedding(features, seed=0),
                                points)


@pytest.mark.parametrize("num_classes", [3, 30])
def test_plot_embedding_writes_a_png(tmp_path, num_classes):
  rng = np.random.default_rng(0)
  labels = np.arange(90) % num_classes
  path = str(tmp_path / "embedding.png")
  names = [f"class {c}" for c in range(num_classes)]
  pictures.plot_embedding(rng.normal(size=(90, 2)), labels, names, path)
  assert os.path.getsize(path) > 1000
  _png_width(path)


@pytest.mark.slow
def test_command_line_draws_both_pictures(tmp_path):
  source = tmp_path / "fashion_mnist_src"
  source.mkdir()
  fake_fashion_mnist.write(source, num_train=96, num_test=40)
  workdir = str(tmp_path / "run")
  pretrained_test.train_tiny_run(
      workdir, str(source), str(tmp_path / "tfds"),
      online_eval=dict(every_steps=2))
  out = tmp_path / "pictures"

  proc = subprocess.run(
      [sys.executable, "-m", "contrastive.pictures", f"--workdir={workdir}",
       f"--out={out}", "--tsne_examples=30"],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
      env={**os.environ, fashion_mnist.ENV_VAR: str(source)})

  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "(loss, probe_top1, knn_top1)" in proc.stdout
  assert sorted(os.listdir(out)) == ["curves.png", "embedding.png"]
  for name in ("curves.png", "embedding.png"):
    assert os.path.getsize(out / name) > 1000
