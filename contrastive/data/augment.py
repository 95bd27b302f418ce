"""SimCLR view augmentations and eval preprocessing, in TF, keyed by seeds.

Every random choice is a `tf.random.stateless_*` op on an explicit seed (an
int32/int64 tensor of shape [2]), so a view is a pure function of (image,
seed): the same seed gives the same view eagerly and inside tf.data, on any
host and after any restart. Ops take float32 images in [0, 1] of shape
[H, W, C] with a static C of 1 or 3 and return the same; colour ops that need
RGB are skipped on 1-channel images.
"""

import functools
from typing import Callable

import tensorflow as tf

Seed = tf.Tensor
_Op = Callable[[tf.Tensor], tf.Tensor]

_BLUR_SIGMA_RANGE = (0.1, 2.0)
_SOLARIZE_THRESHOLD = 0.5
EVAL_CROP_FRACTION = 0.875


def to_float(image: tf.Tensor) -> tf.Tensor:
  """Converts uint8 [0, 255] (or float [0, 1]) pixels to float32 [0, 1]."""
  if image.dtype == tf.uint8:
    return tf.cast(image, tf.float32) / 255.0
  return tf.cast(image, tf.float32)


def _split(seed: Seed, num: int) -> list[Seed]:
  return tf.unstack(tf.random.experimental.stateless_split(seed, num=num))


def _maybe_apply(op: _Op, image: tf.Tensor, prob: float,
                 seed: Seed) -> tf.Tensor:
  """Applies `op` with probability `prob`, decided by `seed`."""
  # Static short cuts keep disabled ops out of the tf.data graph entirely.
  if prob <= 0:
    return image
  if prob >= 1:
    return op(image)
  apply = tf.random.stateless_uniform([], seed) < prob
  return tf.cond(apply, lambda: op(image), lambda: image)


def _resize(image: tf.Tensor, size: int) -> tf.Tensor:
  """Resizes to [size, size] (bicubic, as SimCLR) and clips the overshoot."""
  resized = tf.image.resize(image, [size, size],
                            method=tf.image.ResizeMethod.BICUBIC)
  return tf.clip_by_value(resized, 0.0, 1.0)


def _sample_crop(image_shape: tf.Tensor, seed: Seed,
                 area_range: tuple[float, float],
                 aspect_range: tuple[float, float]) -> tuple[tf.Tensor, ...]:
  """Samples a crop window; returns (offset_y, offset_x, height, width)."""
  whole_image = tf.constant([[[0.0, 0.0, 1.0, 1.0]]])
  # `area_range` alone bounds the crop: with the whole image as the box,
  # `min_object_covered` would be a second, redundant area bound.
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_shape, bounding_boxes=whole_image, seed=seed,
      min_object_covered=0.0, aspect_ratio_range=aspect_range,
      area_range=area_range, max_attempts=100,
      use_image_if_no_bounding_boxes=True)
  offset_y, offset_x, _ = tf.unstack(begin)
  height, width, _ = tf.unstack(size)
  return offset_y, offset_x, height, width


def random_resized_crop(image: tf.Tensor, seed: Seed, *, size: int,
                        area_range: tuple[float, float] = (0.08, 1.0),
                        aspect_range: tuple[float, float] = (3 / 4, 4 / 3)
                        ) -> tf.Tensor:
  """Crops a random area/aspect window of a decoded image, resizes to size.

  Args:
    image: [H, W, C] uint8 or float image.
    seed: [2] seed choosing the window.
    size: output side S.
    area_range: range of the crop's fraction of the image area.
    aspect_range: range of the crop's width / height.

  Returns:
    float32 [S, S, C] in [0, 1]. If no window fits after 100 tries (tiny
    images, extreme ranges), the whole image is used.
  """
  offset_y, offset_x, height, width = _sample_crop(
      tf.shape(image), seed, area_range, aspect_range)
  crop = tf.slice(image, [offset_y, offset_x, 0], [height, width, -1])
  crop.set_shape([None, None, image.shape[-1]])
  return _resize(to_float(crop), size)


def decode_and_random_resized_crop(
    encoded: tf.Tensor, seed: Seed, *, size: int,
    area_range: tuple[float, float] = (0.08, 1.0),
    aspect_range: tuple[float, float] = (3 / 4, 4 / 3),
    channels: int = 3) -> tf.Tensor:
  """As `random_resized_crop`, on JPEG bytes, decoding only the window.

  Args:
    encoded: scalar string tensor holding a JPEG.
    seed: [2] seed choosing the window.
    size: output side S.
    area_range: range of the crop's fraction of the image area.
    aspect_range: range of the crop's width / height.
    channels: channels to decode to.

  Returns:
    float32 [S, S, channels] in [0, 1].
  """
  window = _sample_crop(tf.image.extract_jpeg_shape(encoded), seed,
                        area_range, aspect_range)
  crop = tf.image.decode_and_crop_jpeg(encoded, tf.stack(window),
                                       channels=channels)
  return _resize(to_float(crop), size)


def random_flip(image: tf.Tensor, seed: Seed) -> tf.Tensor:
  """Flips left-right with probability 1/2."""
  return tf.image.stateless_random_flip_left_right(image, seed)


def _brightness(image: tf.Tensor, seed: Seed, delta: float) -> tf.Tensor:
  # SimCLR v2 scales brightness rather than shifting it.
  factor = tf.random.stateless_uniform([], seed, max(0.0, 1.0 - delta),
                                       1.0 + delta)
  return image * factor


def color_jitter(image: tf.Tensor, seed: Seed, *,
                 strength: float) -> tf.Tensor:
  """SimCLR's colour jitter at strength s, its ops in random order.

  Brightness 0.8s, contrast 0.8s, saturation 0.8s, hue 0.2s; saturation and
  hue need RGB, so a 1-channel image gets brightness and contrast only.

  Args:
    image: float32 [H, W, C] in [0, 1], C static (1 or 3).
    seed: [2] seed for the order and each op's amount.
    strength: s.

  Returns:
    The jittered image, clipped to [0, 1] after each op as SimCLR does.
  """
  low, high = max(0.0, 1.0 - 0.8 * strength), 1.0 + 0.8 * strength
  ops = [
      functools.partial(_brightness, delta=0.8 * strength),
      lambda x, s: tf.image.stateless_random_contrast(x, low, high, s),
  ]
  if image.shape[-1] == 3:
    ops += [
        lambda x, s: tf.image.stateless_random_saturation(x, low, high, s),
        lambda x, s: tf.image.stateless_random_hue(
            x, min(0.5, 0.2 * strength), s),
    ]
  *op_seeds, order_seed = _split(seed, len(ops) + 1)
  order = tf.argsort(tf.random.stateless_uniform([len(ops)], order_seed))
  for position in range(len(ops)):
    branches = [functools.partial(op, image, op_seed)
                for op, op_seed in zip(ops, op_seeds)]
    image = tf.clip_by_value(tf.switch_case(order[position], branches),
                             0.0, 1.0)
  return image


def random_color_jitter(image: tf.Tensor, seed: Seed, *, strength: float,
                        prob: float = 0.8) -> tf.Tensor:
  """Applies `color_jitter` with probability `prob`."""
  if strength <= 0:
    return image
  apply_seed, jitter_seed = _split(seed, 2)
  return _maybe_apply(
      functools.partial(color_jitter, seed=jitter_seed, strength=strength),
      image, prob, apply_seed)


def to_grayscale(image: tf.Tensor) -> tf.Tensor:
  """RGB to luma, kept as 3 channels; 1-channel images are returned as is."""
  if image.shape[-1] != 3:
    return image
  return tf.tile(tf.image.rgb_to_grayscale(image), [1, 1, 3])


def random_grayscale(image: tf.Tensor, seed: Seed, *,
                     prob: float = 0.2) -> tf.Tensor:
  """Converts to grayscale with probability `prob` (no-op on 1 channel)."""
  if image.shape[-1] != 3:
    return image
  return _maybe_apply(to_grayscale, image, prob, seed)


def gaussian_blur(image: tf.Tensor, sigma: tf.Tensor, *,
                  radius: int) -> tf.Tensor:
  """Separable Gaussian blur with a (2 radius + 1)-tap kernel.

  Args:
    image: float32 [H, W, C], H and W > radius.
    sigma: scalar standard deviation in pixels.
    radius: kernel half-width.

  Returns:
    The blurred image. Borders are reflected rather than zero-padded so the
    image does not darken at its edges.
  """
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernel = tf.exp(-tf.square(x) / (2.0 * tf.square(sigma)))
  kernel /= tf.reduce_sum(kernel)
  channels = image.shape[-1]
  vertical = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, channels, 1])
  horizontal = tf.reshape(vertical, [1, -1, channels, 1])
  padded = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius],
                                [0, 0]], mode="REFLECT")
  blurred = tf.nn.depthwise_conv2d(padded, vertical, [1, 1, 1, 1], "VALID")
  blurred = tf.nn.depthwise_conv2d(blurred, horizontal, [1, 1, 1, 1], "VALID")
  return blurred[0]


def random_blur(image: tf.Tensor, seed: Seed, *, prob: float) -> tf.Tensor:
  """With probability `prob`, blurs with sigma ~ U[0.1, 2.0] (SimCLR).

  Args:
    image: float32 [S, S, C] with static S (blur runs after the crop).
    seed: [2] seed for whether to blur and sigma.
    prob: probability of blurring.

  Returns:
    The maybe-blurred image. The kernel spans ~10% of the side, as SimCLR.
  """
  apply_seed, sigma_seed = _split(seed, 2)
  radius = max(1, image.shape[0] // 20)

  def blur(x):
    sigma = tf.random.stateless_uniform([], sigma_seed, *_BLUR_SIGMA_RANGE)
    return gaussian_blur(x, sigma, radius=radius)

  return _maybe_apply(blur, image, prob, apply_seed)


def solarize(image: tf.Tensor) -> tf.Tensor:
  """Inverts the pixels at or above 0.5."""
  return tf.where(image < _SOLARIZE_THRESHOLD, image, 1.0 - image)


def random_solarize(image: tf.Tensor, seed: Seed, *,
                    prob: float) -> tf.Tensor:
  """Solarizes with probability `prob`."""
  return _maybe_apply(solarize, image, prob, seed)


def simclr_view(image: tf.Tensor, seed: Seed, *, size: int,
                area_range: tuple[float, float] = (0.08, 1.0),
                aspect_range: tuple[float, float] = (3 / 4, 4 / 3),
                flip: bool = True, color_jitter_prob: float = 0.8,
                color_strength: float = 1.0, grayscale_prob: float = 0.2,
                blur_prob: float = 0.5, solarize_prob: float = 0.0,
                encoded: bool = False, channels: int = 3) -> tf.Tensor:
  """One SimCLR view: crop, flip, colour jitter, grayscale, blur, solarize.

  Args:
    image: [H, W, C] uint8/float image, or with `encoded` a JPEG string.
    seed: [2] seed; distinct seeds give independent views.
    size: output side S.
    area_range: random crop's area fraction range.
    aspect_range: random crop's aspect ratio range.
    flip: whether to flip left-right with probability 1/2.
    color_jitter_prob: probability of colour jitter.
    color_strength: colour jitter strength s (0 disables it).
    grayscale_prob: probability of grayscale (ignored on 1 channel).
    blur_prob: probability of Gaussian blur.
    solarize_prob: probability of solarization.
    encoded: whether `image` is JPEG bytes (decoded fused with the crop).
    channels: channels to decode JPEG bytes to.

  Returns:
    float32 [S, S, C] in [0, 1].
  """
  crop_seed, flip_seed, jitter_seed, gray_seed, blur_seed, solarize_seed = (
      _split(seed, 6))
  if encoded:
    view = decode_and_random_resized_crop(
        image, crop_seed, size=size, area_range=area_range,
        aspect_range=aspect_range, channels=channels)
  else:
    view = random_resized_crop(image, crop_seed, size=size,
                               area_range=area_range,
                               aspect_range=aspect_range)
  if flip:
    view = random_flip(view, flip_seed)
  view = random_color_jitter(view, jitter_seed, strength=color_strength,
                             prob=color_jitter_prob)
  view = random_grayscale(view, gray_seed, prob=grayscale_prob)
  view = random_blur(view, blur_seed, prob=blur_prob)
  view = random_solarize(view, solarize_seed, prob=solarize_prob)
  return tf.clip_by_value(view, 0.0, 1.0)


def _center_crop_window(height: tf.Tensor, width: tf.Tensor,
                        fraction: float) -> tf.Tensor:
  """Centred square window, `fraction` of the short side, as SimCLR eval."""
  short_side = tf.cast(tf.minimum(height, width), tf.float32)
  side = tf.cast(tf.round(fraction * short_side), tf.int32)
  return tf.stack([(height - side + 1) // 2, (width - side + 1) // 2,
                   side, side])


def eval_view(image: tf.Tensor, *, size: int,
              crop_fraction: float | None = None, encoded: bool = False,
              channels: int = 3) -> tf.Tensor:
  """Deterministic eval preprocessing: optional centre crop, then resize.

  Args:
    image: [H, W, C] uint8/float image, or with `encoded` a JPEG string.
    size: output side S.
    crop_fraction: if set (large photos, e.g. 0.875 for ImageNet), the
      centred square of this fraction of the short side is kept first;
      if None (small images) the whole image is resized, when its size
      differs from S.
    encoded: whether `image` is JPEG bytes (decoded fused with the crop).
    channels: channels to decode JPEG bytes to.

  Returns:
    float32 [S, S, C] in [0, 1].
  """
  if encoded:
    if crop_fraction is None:
      image = tf.io.decode_jpeg(image, channels=channels)
    else:
      height, width, _ = tf.unstack(tf.image.extract_jpeg_shape(image))
      image = tf.image.decode_and_crop_jpeg(
          image, _center_crop_window(height, width, crop_fraction),
          channels=channels)
  elif crop_fraction is not None:
    height, width, _ = tf.unstack(tf.shape(image))
    offset_y, offset_x, side, _ = tf.unstack(
        _center_crop_window(height, width, crop_fraction))
    num_channels = image.shape[-1]
    image = tf.slice(image, [offset_y, offset_x, 0], [side, side, -1])
    image.set_shape([None, None, num_channels])
  image = to_float(image)
  if image.shape[:2] != (size, size):
    image = _resize(image, size)
  return tf.clip_by_value(image, 0.0, 1.0)
