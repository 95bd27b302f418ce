"""Tiny Fashion-MNIST stand-in: real IDX gzip files with a few images.

Used by tests that must not depend on Debian's package. Images are random
(so each is distinct and identifies its example) plus a class-dependent
stripe, so a classifier has something to learn.
"""

import gzip
import os
import struct

import numpy as np

from contrastive.data import fashion_mnist


def write_idx(path, array: np.ndarray, magic: int | None = None) -> None:
  if magic is None:
    magic = 0x0800 | array.ndim  # 0x08 = unsigned byte.
  header = struct.pack(f">{1 + array.ndim}I", magic, *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def write(folder, num_train: int = 40, num_test: int = 12, seed: int = 0
          ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Writes the four IDX files into `folder`; returns {split: (x, y)}."""
  rng = np.random.default_rng(seed)
  data = {}
  for split, size in (("train", num_train), ("test", num_test)):
    labels = rng.integers(0, 10, size, dtype=np.uint8)
    images = rng.integers(0, 128, (size, 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
      images[i, 2 * label:2 * label + 3, :] += 120
    images_file, labels_file = fashion_mnist.SPLIT_FILES[split]
    write_idx(os.path.join(folder, images_file), images)
    write_idx(os.path.join(folder, labels_file), labels)
    data[split] = images, labels
  return data
