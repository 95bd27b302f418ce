"""`python -m contrastive.data.prepare`, and paths and errors on the way in.

ImageNet is tested on a miniature in the official manual-download format:
ILSVRC2012_img_train.tar holding one tar per synset, ILSVRC2012_img_val.tar
holding ILSVRC2012_val_*.JPEG, with a grayscale JPEG and the one PNG that the
official archive names `.JPEG`, read by TFDS's own `imagenet2012` builder.
"""

import io
import os
import subprocess
import sys
import tarfile

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from contrastive import main as main_lib
from contrastive.data import input_pipeline
from contrastive.data import prepare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The first three labels of TFDS's validation_labels.txt, which labels the
# validation images by their position in the sorted file names.
VAL_SYNSETS = ("n01751748", "n09193705", "n02105855")
# In the official train tar, this file is a PNG (TFDS converts it).
PNG_NAMED_JPEG = "n02105855_2933.JPEG"


def _image_bytes(rng, fmt, mode="RGB", size=(20, 16)):
  shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
  pixels = rng.integers(0, 256, shape, dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels, mode).save(buffer, format=fmt)
  return buffer.getvalue()


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_miniature_imagenet(folder):
  """Train: 2 + 1 images of two synsets; validation: the first 3 images."""
  rng = np.random.default_rng(0)
  os.makedirs(folder, exist_ok=True)
  classes = {
      "n02105855": [(PNG_NAMED_JPEG, _image_bytes(rng, "PNG")),
                    ("n02105855_1.JPEG", _image_bytes(rng, "JPEG", "L"))],
      "n01751748": [("n01751748_1.JPEG", _image_bytes(rng, "JPEG"))],
  }
  with tarfile.open(os.path.join(folder, "ILSVRC2012_img_train.tar"),
                    "w") as train:
    for synset, images in classes.items():
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as class_tar:
        for name, data in images:
          _add(class_tar, name, data)
      _add(train, f"{synset}.tar", inner.getvalue())
  with tarfile.open(os.path.join(folder, "ILSVRC2012_img_val.tar"), "w") as val:
    for i in range(len(VAL_SYNSETS)):
      _add(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG",
           _image_bytes(rng, "JPEG", "L" if i == 0 else "RGB"))


def _prepare_command(*args):
  return subprocess.run(
      [sys.executable, "-m", "contrastive.data.prepare", *args], cwd=REPO,
      capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow
def test_command_prepares_imagenet_from_the_official_tars(tmp_path):
  manual = tmp_path / "imagenet_tars"
  write_miniature_imagenet(manual)
  data_dir = tmp_path / "tfds"
  proc = _prepare_command("imagenet2012", f"--data_dir={data_dir}",
                          f"--manual_dir={manual}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Prepared imagenet2012/" in proc.stdout
  assert "train 3, validation 3" in proc.stdout

  # Training reads it through the same pipeline, no further preparation.
  assert input_pipeline.num_examples("imagenet2012", "train",
                                     str(data_dir)) == 3
  builder = tfds.builder("imagenet2012", data_dir=str(data_dir))
  names = builder.info.features["label"].names
  val = {ex["file_name"].decode(): ex for ex in
         tfds.as_numpy(builder.as_dataset(split="validation"))}
  assert [names[val[f"ILSVRC2012_val_{i + 1:08d}.JPEG"]["label"]]
          for i in range(3)] == list(VAL_SYNSETS)
  train = {ex["file_name"].decode(): ex for ex in
           tfds.as_numpy(builder.as_dataset(split="train"))}
  assert names[train[PNG_NAMED_JPEG]["label"]] == "n02105855"
  for example in [*train.values(), *val.values()]:  # Grayscale became RGB.
    assert example["image"].shape == (16, 20, 3)


@pytest.mark.slow
def test_command_without_the_tars_says_where_to_put_them(tmp_path):
  proc = _prepare_command("imagenet2012", f"--data_dir={tmp_path}",
                          f"--manual_dir={tmp_path / 'nowhere'}")
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  message = proc.stderr.strip().splitlines()[-1]
  assert message.startswith("FATAL TFDS dataset 'imagenet2012' needs manually")
  assert str(tmp_path / "nowhere") in message
  assert "ILSVRC2012_img_train.tar" in message


def test_expands_home_and_variables_in_path_keys(monkeypatch):
  monkeypatch.setenv("HOME", "/home/someone")
  monkeypatch.setenv("BUCKET", "gs://bucket")
  config = ml_collections.ConfigDict({
      "input": {"data_dir": "~/tensorflow_datasets", "dataset": "~x"},
      "supervised": {"init_from": "$BUCKET/run"},
      "other_dir": "gs://kept/as/is",
      "count": 3,
  })
  config.lock()
  main_lib.expand_paths(config)
  assert config.input.data_dir == "/home/someone/tensorflow_datasets"
  assert config.input.dataset == "~x"  # Not a path key.
  assert config.supervised.init_from == "gs://bucket/run"
  assert config.other_dir == "gs://kept/as/is"
  assert config.count == 3


def test_pipeline_expands_a_home_data_dir(tmp_path, monkeypatch):
  """A `~` reaching the pipeline from Python (not the command line) too."""
  monkeypatch.setenv("HOME", str(tmp_path))
  with pytest.raises(prepare.DatasetNotPreparedError) as error:
    input_pipeline.dataset_info("imagenet2012", "~/tfds")
  assert f"data_dir={tmp_path}/tfds" in str(error.value)
  assert "~" not in str(error.value).split(".")[0]


@pytest.mark.slow
def test_training_on_an_unprepared_dataset_fails_in_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "contrastive.main",
       "--config=configs/smoke_fashion_mnist.py:simclr",
       f"--workdir={tmp_path / 'run'}",
       "--config.input.dataset=imagenet2012",
       "--config.input.data_dir=~/no_tensorflow_datasets_here"],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
      env={**os.environ, "HOME": str(tmp_path),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  message = proc.stderr.strip().splitlines()[-1]
  assert message.startswith("FATAL TFDS dataset 'imagenet2012' is not "
                            f"prepared in data_dir={tmp_path}/no_tensorflow")
  assert ("`python -m contrastive.data.prepare imagenet2012 "
          f"--data_dir={tmp_path}/no_tensorflow_datasets_here") in message
