"""TFDS builder `fashion_mnist_idx`: Fashion-MNIST from local IDX gzip files.

TFDS's own `fashion_mnist` downloads the files and rejects other copies by
checksum; this builder instead reads the four original files from a folder
(`$FASHION_MNIST_DIR`, else where Debian's `dataset-fashion-mnist` puts them),
so preparing needs no network.
"""

import gzip
import math
import os
import struct

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from contrastive.data import prepare

ENV_VAR = "FASHION_MNIST_DIR"
DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGE_SIDE = 28

# split -> (images file, labels file), as the Fashion-MNIST authors name them.
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# IDX magic: two zero bytes, a type code (0x08 = unsigned byte), the rank.
_UBYTE_TYPE_CODE = 0x08

_CITATION = """\
@article{DBLP:journals/corr/abs-1708-07747,
  author  = {Han Xiao and Kashif Rasul and Roland Vollgraf},
  title   = {Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine
             Learning Algorithms},
  journal = {CoRR},
  volume  = {abs/1708.07747},
  year    = {2017},
  url     = {https://arxiv.org/abs/1708.07747},
}
"""


def source_dir() -> epath.Path:
  """Returns the folder the IDX files are read from."""
  return epath.Path(os.environ.get(ENV_VAR) or DEFAULT_DIR)


def checked_source_dir() -> epath.Path:
  """`source_dir()`, after checking that it holds the four IDX files (the
  builders derived from Fashion-MNIST share this advice on getting them)."""
  folder = source_dir()
  missing = [name for pair in SPLIT_FILES.values() for name in pair
             if not (folder / name).exists()]
  if missing:
    raise prepare.DatasetNotPreparedError(
        _missing_files_message(folder, missing))
  return folder


def _missing_files_message(folder: epath.Path, missing: list[str]) -> str:
  all_files = [name for pair in SPLIT_FILES.values() for name in pair]
  where = (f"${ENV_VAR}={folder}" if os.environ.get(ENV_VAR) else
           f"{folder} (the default; ${ENV_VAR} is not set)")
  return (
      f"Fashion-MNIST IDX files missing from {where}: {', '.join(missing)}. "
      "Get them with `sudo apt-get install dataset-fashion-mnist` (or "
      f"`make data`), which installs them in {DEFAULT_DIR}, or set "
      f"{ENV_VAR} to a folder holding the four files {', '.join(all_files)}.")


def read_idx_ubyte(path: epath.PathLike, rank: int) -> np.ndarray:
  """Reads a gzipped IDX file of unsigned bytes with the given rank.

  Args:
    path: the `.gz` file.
    rank: the number of dimensions the file must declare (1 for labels, 3 for
      images).

  Returns:
    A uint8 array of the shape the header declares.

  Raises:
    ValueError: if the file is not gzip, its magic number is not that of a
      rank-`rank` unsigned-byte IDX file, or its size disagrees with its
      header.
  """
  path = epath.Path(path)
  try:
    with path.open("rb") as raw, gzip.GzipFile(fileobj=raw) as f:
      data = f.read()
  except (gzip.BadGzipFile, EOFError) as e:
    raise ValueError(f"{path} is not a complete gzip file: {e}") from e
  expected_magic = (_UBYTE_TYPE_CODE << 8) | rank
  header_size = 4 + 4 * rank
  if len(data) < header_size:
    raise ValueError(f"{path} is too short ({len(data)} bytes) for the "
                     f"{header_size}-byte header of a rank-{rank} IDX file.")
  magic, *dims = struct.unpack(f">{1 + rank}I", data[:header_size])
  if magic != expected_magic:
    raise ValueError(
        f"{path} has IDX magic number 0x{magic:08x}; expected "
        f"0x{expected_magic:08x} (unsigned bytes, rank {rank}). Is it the "
        "right file, or was it corrupted?")
  payload = len(data) - header_size
  if payload != math.prod(dims):
    raise ValueError(
        f"{path} declares dims {tuple(dims)} ({math.prod(dims)} bytes of data) "
        f"but holds {payload} bytes after its header; it is truncated or "
        "corrupted.")
  return np.frombuffer(data, np.uint8, offset=header_size).reshape(dims)


def read_split(folder: epath.PathLike,
               split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads and checks one split's images `[n, 28, 28]` and labels `[n]`."""
  folder = epath.Path(folder)
  images_name, labels_name = SPLIT_FILES[split]
  images = read_idx_ubyte(folder / images_name, rank=3)
  labels = read_idx_ubyte(folder / labels_name, rank=1)
  if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
    raise ValueError(f"{folder / images_name} holds images of shape "
                     f"{images.shape[1:]}; Fashion-MNIST's are "
                     f"{(IMAGE_SIDE, IMAGE_SIDE)}.")
  if len(images) != len(labels):
    raise ValueError(f"{images_name} holds {len(images)} images but "
                     f"{labels_name} {len(labels)} labels (in {folder}).")
  if labels.size and labels.max() >= len(CLASS_NAMES):
    raise ValueError(f"{folder / labels_name} holds label {labels.max()}; "
                     f"Fashion-MNIST has {len(CLASS_NAMES)} classes.")
  return images, labels


class FashionMnistIdx(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST (60k train, 10k test, 28x28x1) from local IDX files."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release, from the original IDX files."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Zalando's Fashion-MNIST article images (28x28 grayscale, 10 "
            "classes), read from the original IDX files in a local folder."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(IMAGE_SIDE, IMAGE_SIDE, 1)),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    folder = checked_source_dir()
    return {split: self._generate_examples(folder, split)
            for split in SPLIT_FILES}

  def _generate_examples(self, folder: epath.Path, split: str):
    images, labels = read_split(folder, split)
    for index, (image, label) in enumerate(zip(images, labels)):
      yield index, {"image": image[..., None], "label": int(label)}
