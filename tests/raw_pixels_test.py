"""The raw-pixel baseline: keyed by its setting, read back, not recomputed."""

import json
import os
import shutil
import subprocess
import sys

import jax
import pytest

import fake_fashion_mnist
from configs import smoke_fashion_mnist
from contrastive.data import fashion_mnist
from contrastive.evaluation import raw_pixels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fake_source(tmp_path_factory):
  folder = tmp_path_factory.mktemp("fashion_mnist_src")
  fake_fashion_mnist.write(folder, num_train=48, num_test=16)
  return str(folder)


@pytest.fixture
def config(fake_source, tmp_path, monkeypatch):
  monkeypatch.setenv(fashion_mnist.ENV_VAR, fake_source)
  config = smoke_fashion_mnist.get_config("supcon")
  config.input.data_dir = str(tmp_path / "tfds")
  return config


def _key(config):
  return raw_pixels.key(raw_pixels.setting(config, config.input.dataset))


def test_the_key_follows_the_split_probe_and_grid_only(config):
  base = _key(config)
  assert _key(config) == base
  # What the raw pixels' scores do not depend on: the method, the encoder,
  # the extraction batch.
  other = config.copy_and_resolve_references()
  other.loss.temperature = 0.5
  other.model.width = 2.0
  other.input.augment.color_strength = 1.0
  other.linear_eval.batch_size = 128
  assert _key(other) == base
  for change in (
      lambda c: c.linear_eval.update(test_split="train[:16]"),
      lambda c: c.linear_eval.update(train_split="train[:32]"),
      lambda c: c.linear_eval.update(l2_grid=(1e-4,)),
      lambda c: c.linear_eval.update(steps=100),
      lambda c: c.linear_eval.update(knn_k=(5,)),
      lambda c: c.linear_eval.update(protocol="simclr"),
      lambda c: c.input.update(image_size=32),
      lambda c: c.update(seed=1)):
    changed = config.copy_and_resolve_references()
    change(changed)
    assert _key(changed) != base


def test_computed_once_then_read_from_the_data_dir(config):
  calls = []

  def compute():
    calls.append(1)
    return {"top1": 0.5, "top5": 0.9, "feature_dim": 784, "knn20_top1": 0.4}

  dataset = config.input.dataset
  first = raw_pixels.baseline(config, dataset, compute)
  assert calls == [1] and first["source"] == "computed"
  second = raw_pixels.baseline(config, dataset, compute)
  assert calls == [1], "recomputed although an entry matched"
  assert second["source"].startswith(
      os.path.join(config.input.data_dir, raw_pixels.CACHE_FOLDER))
  assert {k: v for k, v in second.items() if k != "source"} == {
      k: v for k, v in first.items() if k != "source"}
  # Another grid is another entry: computed, and the first one is kept.
  config.linear_eval.l2_grid = (1e-3,)
  assert raw_pixels.baseline(config, dataset, compute)["source"] == "computed"
  assert calls == [1, 1]
  assert len(os.listdir(os.path.join(config.input.data_dir,
                                     raw_pixels.CACHE_FOLDER))) == 2


def test_an_entry_of_another_setting_under_the_same_name_is_ignored(config):
  dataset = config.input.dataset
  setting = raw_pixels.setting(config, dataset)
  wrong = dict(setting, version="0.0.0")
  path = raw_pixels.write(
      os.path.join(config.input.data_dir, raw_pixels.CACHE_FOLDER), wrong,
      {"top1": 0.99})
  # Planted under this setting's name, as a hash collision would be.
  os.rename(path, os.path.join(os.path.dirname(path),
                               raw_pixels._file_name(setting)))
  result = raw_pixels.baseline(config, dataset, lambda: {"top1": 0.5})
  assert result == {"top1": 0.5, "source": "computed"}


def test_several_processes_do_not_use_the_data_dir_cache(config, monkeypatch):
  # Another host may not share the data_dir: all compute (a collective) or
  # all read the shipped constants.
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  dataset = config.input.dataset
  for _ in range(2):
    assert raw_pixels.baseline(config, dataset,
                               lambda: {"top1": 0.5})["source"] == "computed"
  assert not os.path.exists(
      os.path.join(config.input.data_dir, raw_pixels.CACHE_FOLDER))


@pytest.mark.slow
def test_the_smoke_runs_baseline_is_shipped(tmp_path, installed_fashion_mnist):
  """`make smoke` reads its raw-pixel row instead of recomputing it."""
  config = smoke_fashion_mnist.get_config("supcon")
  config.input.data_dir = str(tmp_path)
  setting = raw_pixels.setting(config, config.input.dataset)
  path = os.path.join(raw_pixels.SHIPPED_DIR, raw_pixels._file_name(setting))
  assert os.path.exists(path), (
      f"No shipped entry {path} for the smoke config; make it with the "
      "command in contrastive/evaluation/raw_pixels.py.")
  with open(path) as f:
    entry = json.load(f)
  assert entry["setting"] == setting
  assert entry["result"]["feature_dim"] == 784
  assert 0.8 < entry["result"]["top1"] < 0.9
  # And the smoke config's other variants share it.
  simclr = smoke_fashion_mnist.get_config("simclr")
  simclr.input.data_dir = str(tmp_path)
  assert raw_pixels.setting(simclr, simclr.input.dataset) == setting


@pytest.mark.slow
def test_command_line_writes_an_entry_the_run_then_reads(config, fake_source,
                                                         tmp_path):
  """The command that makes a shipped constant, into another folder."""
  out = tmp_path / "entries"
  overrides = ["--config.linear_eval.steps=5", "--config.linear_eval.knn_k=(5,)",
               "--config.linear_eval.l2_grid=(1e-3,)"]
  proc = subprocess.run(
      [sys.executable, "-m", "contrastive.evaluation.raw_pixels",
       "--config=configs/smoke_fashion_mnist.py:supcon",
       f"--config.input.data_dir={config.input.data_dir}", *overrides,
       f"--out={out}"],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
      env={**os.environ, fashion_mnist.ENV_VAR: fake_source,
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  printed = json.loads(proc.stdout.strip().splitlines()[-1])
  config.linear_eval.update(steps=5, knn_k=(5,), l2_grid=(1e-3,))
  setting = raw_pixels.setting(config, config.input.dataset)
  assert printed["path"] == str(out / raw_pixels._file_name(setting))
  with open(printed["path"]) as f:
    entry = json.load(f)
  assert entry["setting"] == setting
  assert entry["devices"] == "8 x cpu"
  assert entry["command"].startswith("python -m contrastive.evaluation.")
  assert "--out" not in entry["command"]
  assert entry["result"]["feature_dim"] == 28 * 28
  assert 0 <= entry["result"]["top1"] <= entry["result"]["top5"] <= 1
  assert "knn5_top1" in entry["result"]
  # Copied into the data_dir cache, it is what a run reads back.
  cache = os.path.join(config.input.data_dir, raw_pixels.CACHE_FOLDER)
  os.makedirs(cache)
  shutil.copy(printed["path"], cache)
  read = raw_pixels.baseline(config, config.input.dataset,
                             lambda: pytest.fail("recomputed"))
  assert read["top1"] == entry["result"]["top1"]
