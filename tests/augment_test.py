"""Tests for the fast paths of contrastive/data/augment.py.

Each fast path (one decode of the windows' union, the column-plane blur,
the matmul grayscale, colour jitter with clips only where needed) is checked
against the plain way of doing the same thing, so the augmentation keeps its
distribution; `data_test.py` covers the ops' contracts and the pipelines.
"""

import functools

import numpy as np
import pytest
import tensorflow as tf

from contrastive.data import augment


def _pixels(height: int = 48, width: int = 64, seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3),
                                              dtype=np.uint8)


def _image(side: int = 32, channels: int = 3, seed: int = 0) -> tf.Tensor:
  rng = np.random.default_rng(seed)
  return tf.constant(rng.uniform(size=(side, side, channels)), tf.float32)


_WINDOWS = [(0, 0, 48, 64), (5, 7, 20, 30), (13, 1, 11, 17), (3, 33, 40, 31)]


@pytest.mark.parametrize("window", _WINDOWS)
def test_fused_decode_and_crop_is_decode_then_crop(window):
  pixels = _pixels()
  offset_y, offset_x, height, width = window
  # Without chroma subsampling every pixel is decoded alike: exact.
  jpeg = tf.io.encode_jpeg(pixels, chroma_downsampling=False)
  decoded = tf.io.decode_jpeg(jpeg).numpy()
  expected = decoded[offset_y:offset_y + height, offset_x:offset_x + width]
  np.testing.assert_array_equal(tf.image.decode_and_crop_jpeg(jpeg, window),
                                expected)
  # With 4:2:0 chroma (the usual JPEG) all but the window's last column.
  jpeg = tf.io.encode_jpeg(pixels)
  decoded = tf.io.decode_jpeg(jpeg).numpy()
  expected = decoded[offset_y:offset_y + height, offset_x:offset_x + width]
  fused = tf.image.decode_and_crop_jpeg(jpeg, window).numpy()
  np.testing.assert_array_equal(fused[:, :-1], expected[:, :-1])


def test_union_decode_gives_the_views_of_the_decoded_image():
  pixels = _pixels(96, 128)
  jpeg = tf.io.encode_jpeg(pixels, chroma_downsampling=False)
  decoded = tf.io.decode_jpeg(jpeg)
  seeds = [tf.constant([s, 2 * s + 1], tf.int64) for s in range(6)]
  views = augment.decode_and_random_resized_crops(jpeg, seeds, size=24)
  assert len(views) == len(seeds)
  for seed, view in zip(seeds, views):
    # The window depends on the shape alone: the JPEG header's shape and
    # the decoded image's give the same one, hence the same view.
    expected = augment.random_resized_crop(decoded, seed, size=24)
    np.testing.assert_allclose(view, expected, atol=1e-6)
    single = augment.decode_and_random_resized_crop(jpeg, seed, size=24)
    np.testing.assert_allclose(view, single, atol=1e-6)
  # 4:2:0 chroma: equal but near the windows' edges.
  jpeg = tf.io.encode_jpeg(pixels)
  views = augment.decode_and_random_resized_crops(jpeg, seeds, size=24)
  for seed, view in zip(seeds, views):
    single = augment.decode_and_random_resized_crop(jpeg, seed, size=24)
    assert np.abs(view - single).mean() < 2 / 255


@pytest.mark.parametrize("channels", [1, 3])
def test_simclr_views_are_simclr_view_per_seed(channels):
  image = tf.constant(_pixels(40, 36)[..., :channels])
  seeds = tf.random.experimental.stateless_split(tf.constant([3, 4]), 4)
  kwargs = dict(size=24, solarize_prob=0.3)
  views = augment.simclr_views(image, seeds, **kwargs).numpy()
  assert views.shape == (4, 24, 24, channels)
  assert views.dtype == np.float32
  assert views.min() >= 0.0 and views.max() <= 1.0
  for v in range(4):
    np.testing.assert_array_equal(
        views[v], augment.simclr_view(image, seeds[v], **kwargs))


def test_simclr_views_of_a_jpeg_shapes_dtypes_and_range():
  jpeg = tf.io.encode_jpeg(_pixels(75, 100))
  seeds = tf.random.experimental.stateless_split(tf.constant([1, 2]), 3)
  views = augment.simclr_views(jpeg, seeds, size=32, encoded=True).numpy()
  assert views.shape == (3, 32, 32, 3)
  assert views.dtype == np.float32
  assert views.min() >= 0.0 and views.max() <= 1.0
  assert not np.array_equal(views[0], views[1])
  per_view = np.stack([augment.simclr_view(jpeg, seeds[v], size=32,
                                           encoded=True)
                       for v in range(3)])
  # Same parameters per view; pixels differ only by the decode's edges.
  assert np.abs(views - per_view).mean() < 2 / 255


def _reference_blur(image, sigma, radius):
  """tf.pad REFLECT + [1, H, W, C] depthwise convolutions."""
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernel = tf.exp(-tf.square(x) / (2.0 * tf.square(sigma)))
  kernel /= tf.reduce_sum(kernel)
  channels = image.shape[-1]
  vertical = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, channels, 1])
  horizontal = tf.reshape(vertical, [1, -1, channels, 1])
  padded = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius],
                                [0, 0]], mode="REFLECT")
  out = tf.nn.depthwise_conv2d(padded, vertical, [1, 1, 1, 1], "VALID")
  return tf.nn.depthwise_conv2d(out, horizontal, [1, 1, 1, 1], "VALID")[0]


@pytest.mark.parametrize("side, channels, radius, sigma", [
    (32, 3, 1, 0.1), (32, 3, 3, 1.0), (40, 1, 2, 2.0), (224, 3, 11, 1.7)])
def test_blur_equals_the_reflect_padded_depthwise_blur(side, channels, radius,
                                                       sigma):
  image = _image(side, channels)
  blurred = augment.gaussian_blur(image, tf.constant(sigma), radius=radius)
  assert blurred.shape == image.shape
  np.testing.assert_allclose(
      blurred, _reference_blur(image, tf.constant(sigma), radius), atol=1e-6)


def test_grayscale_equals_tf_image():
  image = _image(40)
  expected = tf.tile(tf.image.rgb_to_grayscale(image), [1, 1, 3])
  gray = augment.to_grayscale(image)
  assert gray.shape == (40, 40, 3)
  np.testing.assert_allclose(gray, expected, atol=1e-6)
  assert gray.numpy().max() <= 1.0


def _reference_jitter(image, seed, strength):
  """SimCLR's colour jitter with TF's random ops, clipped after every op."""
  low, high = max(0.0, 1.0 - 0.8 * strength), 1.0 + 0.8 * strength

  def brightness(x, s):
    return x * tf.random.stateless_uniform([], s, low, high)

  ops = [brightness,
         lambda x, s: tf.image.stateless_random_contrast(x, low, high, s)]
  if image.shape[-1] == 3:
    ops += [
        lambda x, s: tf.image.stateless_random_saturation(x, low, high, s),
        lambda x, s: tf.image.stateless_random_hue(x, 0.2 * strength, s)]
  *op_seeds, order_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, len(ops) + 1))
  order = tf.argsort(tf.random.stateless_uniform([len(ops)], order_seed))
  for position in range(len(ops)):
    branches = [functools.partial(op, image, s)
                for op, s in zip(ops, op_seeds)]
    image = tf.clip_by_value(tf.switch_case(order[position], branches), 0, 1)
  return image


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_colour_jitter_equals_clipping_after_every_op(channels, strength):
  image = _image(24, channels)
  for seed in tf.random.experimental.stateless_split(tf.constant([9, 9]), 16):
    jittered = augment.color_jitter(image, seed, strength=strength)
    np.testing.assert_allclose(
        jittered, _reference_jitter(image, seed, strength), atol=1e-6)
    assert 0.0 <= jittered.numpy().min() and jittered.numpy().max() <= 1.0
