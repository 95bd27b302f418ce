"""Fake TFDS sources for the tests of builders that derive from others
(`contrastive/data/long_tail.py`, `contrastive/data/open_world.py`)."""

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

import fake_fashion_mnist
from contrastive.data import fashion_mnist

NO_GCS = tfds.download.DownloadConfig(try_download_gcs=False)


def fake_split(rng: np.random.Generator, num_classes: int, per_class: int,
               shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """Distinct random uint8 images, `per_class` per class, shuffled."""
  labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
  images = rng.integers(0, 256, (len(labels),) + shape, dtype=np.uint8)
  return images, labels.astype(np.uint8)


def read(builder: tfds.core.DatasetBuilder, split: str):
  examples = builder.as_dataset(split=split, batch_size=-1)
  return tfds.as_numpy(examples)


def source_indices(images: np.ndarray, source_images: np.ndarray):
  """Each image's index in the source (TFDS stores its own order)."""
  lookup = {image.tobytes(): i for i, image in enumerate(source_images)}
  assert len(lookup) == len(source_images), "Test images must be distinct."
  return np.array([lookup[image.tobytes()] for image in images])


def fake_cifar_source(base: type[tfds.core.GeneratorBasedBuilder],
                      data: dict[str, tuple[np.ndarray, np.ndarray]],
                      names: list[str]) -> type[tfds.core.DatasetBuilder]:
  """A stand-in for TFDS's `base` (same name, version, features)."""

  with tfds.core.registered.skip_registration():

    class FakeCifar(base):  # pylint: disable=unused-variable
      name = base.name

      def _split_generators(self, dl_manager):
        del dl_manager
        self.info.features["label"].names = names
        return {split: self._fake_examples(split) for split in data}

      def _fake_examples(self, split):
        images, labels = data[split]
        # TFDS stores examples in an order of its own (hashed keys);
        # the derived builders must put them back in id order, the
        # source's file order.
        for index in range(len(labels)):
          example = {"id": f"{split}_{index:05d}", "image": images[index],
                     "label": int(labels[index])}
          if "coarse_label" in self.info.features:
            example["coarse_label"] = int(labels[index]) % 20
          yield index, example

  return FakeCifar


def write_fashion_mnist(folder, per_class: int, test_per_class: int,
                        seed: int = 0) -> dict[str, tuple[np.ndarray,
                                                          np.ndarray]]:
  """Fashion-MNIST IDX files in `folder` with `per_class` distinct train
  images per class; returns {split: (images, labels)}."""
  rng = np.random.default_rng(seed)
  data = {"train": fake_split(rng, 10, per_class, (28, 28)),
          "test": fake_split(rng, 10, test_per_class, (28, 28))}
  for split, arrays in data.items():
    for name, array in zip(fashion_mnist.SPLIT_FILES[split], arrays):
      fake_fashion_mnist.write_idx(folder / name, array)
  return data


def pretrain_config(dataset: str, data_dir: str,
                    batch_size: int) -> ml_collections.ConfigDict:
  """`config.input` for a few pretraining batches of a derived dataset."""
  return ml_collections.ConfigDict(dict(
      dataset=dataset, data_dir=data_dir, train_split="train",
      batch_size=batch_size, views=2, image_size=28, shuffle_buffer=16,
      augment=dict(crop_area_min=0.08, crop_area_max=1.0,
                   crop_aspect_min=3 / 4, crop_aspect_max=4 / 3, flip=True,
                   color_jitter_prob=0.8, color_strength=1.0,
                   grayscale_prob=0.2, blur_prob=0.5, solarize_prob=0.2)))
