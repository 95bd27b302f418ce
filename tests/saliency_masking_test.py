"""ReLICv2's saliency masking: masks follow the crops, coins are per view,
and the pipeline reads masks from a dataset's "saliency" feature."""

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from contrastive.data import augment
from contrastive.data import input_pipeline

_SIDE = 32
_CROP = dict(area_range=(0.08, 1.0), aspect_range=(3 / 4, 4 / 3))
# Crop only: the masked pixels keep the fill, the others the image.
_NO_COLOUR = dict(color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0,
                  flip=False)


def _image_and_mask(seed=0, channels=3):
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, (_SIDE, _SIDE + 8, channels), dtype=np.uint8)
  mask = np.zeros((_SIDE, _SIDE + 8, 1), np.uint8)
  mask[4:24, 6:30] = 255
  return image, mask


def _seeds(count, seed=1):
  return tf.constant(np.random.default_rng(seed).integers(0, 2**31,
                                                          (count, 2)),
                     tf.int64)


def _crop_seeds(seeds):
  # A view's crop seed is the first of its six (`augment.simclr_views`).
  return [tf.unstack(tf.random.experimental.stateless_split(s, num=6))[0]
          for s in tf.unstack(seeds)]


@pytest.mark.parametrize("encoded", [False, True])
def test_masked_views_keep_the_salient_pixels_and_fill_the_rest(encoded):
  image, mask = _image_and_mask()
  source = tf.io.encode_jpeg(image) if encoded else tf.constant(image)
  seeds = _seeds(6)
  kwargs = dict(size=20, encoded=encoded, **_CROP, **_NO_COLOUR)
  plain = augment.simclr_views(source, seeds, **kwargs).numpy()
  masked = augment.simclr_views(source, seeds, saliency=tf.constant(mask),
                                saliency_prob=1.0, saliency_fill=0.25,
                                **kwargs).numpy()
  # The mask's crops, cut from the mask alone with the same windows; their
  # coverage varies from view to view, so the windows really differ.
  crops = augment.saliency_crops(tf.constant(mask), tf.shape(image),
                                 _crop_seeds(seeds), size=20, **_CROP)
  salient = np.stack([c.numpy()[..., 0] >= 0.5 for c in crops])
  assert 0 < salient.mean() < 1 and len(set(salient.mean((1, 2)))) > 1
  for v in range(6):
    np.testing.assert_array_equal(masked[v][salient[v]], plain[v][salient[v]])
    np.testing.assert_array_equal(masked[v][~salient[v]], 0.25)


def test_whole_image_crop_masks_exactly_the_mask():
  image, mask = _image_and_mask(channels=1)
  image, mask = image[:, :_SIDE], mask[:, :_SIDE]
  view = augment.simclr_views(
      tf.constant(image), _seeds(1), size=_SIDE, area_range=(1.0, 1.0),
      aspect_range=(1.0, 1.0), saliency=tf.constant(mask),
      saliency_prob=1.0, saliency_fill=0.0, **_NO_COLOUR).numpy()[0]
  expected = np.where(mask >= 128, image / 255.0, 0.0)
  np.testing.assert_allclose(view, expected, atol=1e-6)


@pytest.mark.slow
def test_each_view_flips_its_own_coin_and_nothing_else_changes():
  image, mask = _image_and_mask(seed=3)
  views = 400
  seeds = _seeds(views, seed=4)
  kwargs = dict(size=12, area_range=(0.5, 1.0), aspect_range=(3 / 4, 4 / 3))
  full = augment.simclr_views(tf.constant(image), seeds, **kwargs).numpy()
  # prob 0: not a single draw moves (the coin has its own stream).
  unmasked = augment.simclr_views(tf.constant(image), seeds,
                                  saliency=tf.constant(mask),
                                  saliency_prob=0.0, **kwargs).numpy()
  np.testing.assert_array_equal(unmasked, full)
  # The colour ops run after the masking, so a view is either exactly the
  # unmasked one or has changed.
  masked = augment.simclr_views(tf.constant(image), seeds,
                                saliency=tf.constant(mask),
                                saliency_prob=0.3, **kwargs).numpy()
  changed = np.abs(masked - full).max(axis=(1, 2, 3)) > 0
  standard_error = np.sqrt(0.3 * 0.7 / views)
  assert abs(changed.mean() - 0.3) < 5 * standard_error


def test_a_mask_of_another_size_is_refused():
  image, mask = _image_and_mask()
  with pytest.raises(tf.errors.InvalidArgumentError, match="saliency mask"):
    augment.simclr_views(tf.constant(image), _seeds(2), size=12,
                         saliency=tf.constant(mask[:-1]), saliency_prob=1.0)


# The pipeline, on a dataset that carries masks.


class SaliencyImages(tfds.core.GeneratorBasedBuilder):
  """16 random images; even ones wholly salient, odd ones wholly background."""

  VERSION = tfds.core.Version("1.0.0")
  WITH_MASKS = True

  def _info(self):
    features = {"image": tfds.features.Image(shape=(_SIDE, _SIDE, 3)),
                "label": tfds.features.ClassLabel(num_classes=2)}
    if self.WITH_MASKS:
      features["saliency"] = tfds.features.Image(shape=(_SIDE, _SIDE, 1))
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for i in range(16):
      # Never all-grey: a wholly masked view is the only constant one.
      image = rng.integers(0, 256, (_SIDE, _SIDE, 3), dtype=np.uint8)
      salient = np.full((_SIDE, _SIDE, 1), 255 if i % 2 == 0 else 0,
                        np.uint8)
      example = {"image": image, "label": i % 2, "saliency": salient}
      if not self.WITH_MASKS:
        del example["saliency"]
      yield i, example


class ImagesWithoutMasks(SaliencyImages):
  WITH_MASKS = False


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("tfds_saliency"))
  SaliencyImages(data_dir=folder).download_and_prepare()
  ImagesWithoutMasks(data_dir=folder).download_and_prepare()
  return folder


def _config(data_dir, dataset="saliency_images", **augment_options):
  return ml_collections.ConfigDict(dict(
      dataset=dataset, data_dir=data_dir, train_split="train", batch_size=8,
      views=2, image_size=16, shuffle_buffer=16, small_views=1,
      small_image_size=8, small_crop_area=(0.2, 0.5),
      augment=dict(crop_area_min=0.3, crop_area_max=1.0,
                   crop_aspect_min=3 / 4, crop_aspect_max=4 / 3, flip=True,
                   color_jitter_prob=0.0, color_strength=1.0,
                   grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0,
                   **augment_options)))


def test_pipeline_masks_the_large_views_from_the_dataset_masks(data_dir):
  config = _config(data_dir, saliency_prob=1.0, saliency_fill=0.5)
  batch = next(input_pipeline.pretrain_dataset(config, seed=0)
               .as_numpy_iterator())
  assert input_pipeline.SALIENCY_KEY not in batch
  background = batch["label"] == 1
  assert background.any() and (~background).any()
  # Wholly background images: every large view is the fill.
  np.testing.assert_array_equal(batch["image"][background], 0.5)
  # Wholly salient ones are untouched, as without masking.
  plain = next(input_pipeline.pretrain_dataset(
      _config(data_dir), seed=0).as_numpy_iterator())
  np.testing.assert_array_equal(batch["image"][~background],
                                plain["image"][~background])
  # The small views are never masked.
  np.testing.assert_array_equal(batch["image_small"], plain["image_small"])
  assert (batch["image_small"][background].std(axis=(1, 2, 3, 4)) > 0).all()


def test_pipeline_refuses_masking_without_masks(data_dir):
  config = _config(data_dir, dataset="images_without_masks",
                   saliency_prob=0.1)
  with pytest.raises(ValueError, match="needs a 'saliency' feature"):
    input_pipeline.pretrain_dataset(config, seed=0)
  # Without masking the same dataset is fine.
  config.augment.saliency_prob = 0.0
  batch = next(input_pipeline.pretrain_dataset(config, seed=0)
               .as_numpy_iterator())
  assert batch["image"].shape == (8, 2, 16, 16, 3)


def test_bad_saliency_options_are_refused(data_dir):
  with pytest.raises(ValueError, match="saliency_prob must be in"):
    input_pipeline.pretrain_dataset(_config(data_dir, saliency_prob=1.5),
                                    seed=0)
