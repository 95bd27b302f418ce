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

from contrastive.data import randaugment

Seed = tf.Tensor
_Op = Callable[[tf.Tensor], tf.Tensor]

BLUR_SIGMA_RANGE = (0.1, 2.0)
SOLARIZE_THRESHOLD = 0.5
# tf.image.rgb_to_grayscale's weights of R, G, B.
LUMA_WEIGHTS = (0.2989, 0.5870, 0.1140)
EVAL_CROP_FRACTION = 0.875
# Folded into a view's seed for its saliency-masking coin, so that turning
# masking on leaves every other draw of the view unchanged.
_SALIENCY_STREAM = 0x5A11
# Likewise for RandAugment's draws, folded into the view's flip seed.
_RANDAUGMENT_STREAM = 0x0A2A


def to_float(image: tf.Tensor) -> tf.Tensor:
  """Converts uint8 [0, 255] (or float [0, 1]) pixels to float32 [0, 1]."""
  if image.dtype == tf.uint8:
    return tf.cast(image, tf.float32) / 255.0
  return tf.cast(image, tf.float32)


def _split(seed: Seed, num: int) -> list[Seed]:
  return tf.unstack(tf.random.experimental.stateless_split(seed, num=num))


def _coin(seed: Seed, prob: float) -> tf.Tensor:
  """A bool scalar, True with probability `prob`, decided by `seed`.

  Constant for `prob` <= 0 or >= 1, so that `_apply_if` keeps the op out of
  the graph (or its `tf.cond`) entirely.
  """
  if prob <= 0:
    return tf.constant(False)
  if prob >= 1:
    return tf.constant(True)
  return tf.random.stateless_uniform([], seed) < prob


def _apply_if(apply: tf.Tensor, op: _Op, image: tf.Tensor) -> tf.Tensor:
  """`op(image)` where `apply`, with static short cuts for constants."""
  constant = tf.get_static_value(apply)
  if constant is not None:
    return op(image) if constant else image
  return tf.cond(apply, lambda: op(image), lambda: image)


def _maybe_apply(op: _Op, image: tf.Tensor, prob: float,
                 seed: Seed) -> tf.Tensor:
  """Applies `op` with probability `prob`, decided by `seed`."""
  return _apply_if(_coin(seed, prob), op, image)


def _resize(image: tf.Tensor, size: int) -> tf.Tensor:
  """Resizes to [size, size] (bicubic, as SimCLR) and clips the overshoot."""
  resized = tf.image.resize(image, [size, size],
                            method=tf.image.ResizeMethod.BICUBIC)
  return tf.clip_by_value(resized, 0.0, 1.0)


def _sample_crop(image_shape: tf.Tensor, seed: Seed,
                 area_range: tuple[float, float],
                 aspect_range: tuple[float, float]) -> tuple[tf.Tensor, ...]:
  """Samples a crop window; returns (offset_y, offset_x, height, width).

  `image_shape` is [H, W, C] (of a decoded image, or of a JPEG from
  `tf.image.extract_jpeg_shape`): the window depends on the shape alone, so
  a JPEG and its decoded pixels get the same window from the same seed.
  """
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


def _resize_crop(crop: tf.Tensor, size: int) -> tf.Tensor:
  """uint8 crop -> float32 [size, size, C] in [0, 1].

  Scales to [0, 1] after the resize (linear, so the same up to rounding):
  the output is ~half the pixels of the mean crop at SimCLR's crop areas.
  The crop is cast first: TF's bicubic resize of uint8 is slower.
  """
  resized = tf.image.resize(tf.cast(crop, tf.float32), [size, size],
                            method=tf.image.ResizeMethod.BICUBIC)
  return tf.clip_by_value(resized * (1.0 / 255.0), 0.0, 1.0)


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
  return _resize_crop(crop, size)


def decode_and_random_resized_crops(
    encoded: tf.Tensor, seeds: list[Seed], *, size: int,
    area_range: tuple[float, float] = (0.08, 1.0),
    aspect_range: tuple[float, float] = (3 / 4, 4 / 3),
    channels: int = 3) -> list[tf.Tensor]:
  """Several random resized crops of one JPEG, decoding it at most once.

  Each view's window is sampled from the JPEG header's shape exactly as
  `decode_and_random_resized_crop` samples it from the same seed; then only
  the smallest box holding all windows is decoded
  (`tf.image.decode_and_crop_jpeg`), and each window is sliced out of it as
  uint8 before the resize. One fused decode of the union costs less than one
  per window (each pays a fixed share: the entropy decoding of the rows it
  skips) and no more than a full decode. A view equals the single-window
  fused decode but near a window's edges, where libjpeg's chroma upsampling
  sees different neighbours (4:2:0 JPEGs; exact for 4:4:4).

  Args:
    encoded: scalar string tensor holding a JPEG.
    seeds: one [2] seed per view, each choosing that view's window.
    size: output side S.
    area_range: range of a crop's fraction of the image area.
    aspect_range: range of a crop's width / height.
    channels: channels to decode to.

  Returns:
    One float32 [S, S, channels] view in [0, 1] per seed.
  """
  shape = tf.image.extract_jpeg_shape(encoded)
  windows = tf.stack([tf.stack(_sample_crop(shape, seed, area_range,
                                            aspect_range))
                      for seed in seeds])  # [V, 4]: y, x, h, w.
  top_left = tf.reduce_min(windows[:, :2], axis=0)
  bottom_right = tf.reduce_max(windows[:, :2] + windows[:, 2:], axis=0)
  union = tf.image.decode_and_crop_jpeg(
      encoded, tf.concat([top_left, bottom_right - top_left], axis=0),
      channels=channels)
  views = []
  for v in range(len(seeds)):
    crop = tf.slice(union, tf.concat([windows[v, :2] - top_left, [0]], 0),
                    tf.concat([windows[v, 2:], [-1]], 0))
    crop.set_shape([None, None, channels])
    views.append(_resize_crop(crop, size))
  return views


def saliency_crops(saliency: tf.Tensor, image_shape: tf.Tensor,
                   seeds: list[Seed], *, size: int,
                   area_range: tuple[float, float],
                   aspect_range: tuple[float, float]) -> list[tf.Tensor]:
  """The crops of a saliency mask that go with the image's crops.

  The windows are those `random_resized_crop` and
  `decode_and_random_resized_crops` sample from the same seeds: they depend
  on the image's shape alone.

  Args:
    saliency: uint8 [H, W, 1] mask of the image (255: salient).
    image_shape: [H, W, C] of the image (of the JPEG header if encoded).
    seeds: the views' crop seeds.
    size: output side S.
    area_range: range of a crop's fraction of the image area.
    aspect_range: range of a crop's width / height.

  Returns:
    One float32 [S, S, 1] mask in [0, 1] per seed.
  """
  with tf.control_dependencies([tf.debugging.assert_equal(
      tf.shape(saliency)[:2], tf.cast(image_shape[:2], tf.int32),
      message="The saliency mask's height and width differ from its "
      "image's.")]):
    saliency = tf.identity(saliency)
  crops = []
  for seed in seeds:
    offset_y, offset_x, height, width = _sample_crop(
        image_shape, seed, area_range, aspect_range)
    crop = tf.slice(saliency, [offset_y, offset_x, 0], [height, width, -1])
    crop.set_shape([None, None, 1])
    crops.append(_resize(to_float(crop), size))
  return crops


def remove_background(image: tf.Tensor, saliency: tf.Tensor,
                      fill: float) -> tf.Tensor:
  """Pixels whose mask is below 1/2 become `fill` (ReLICv2's masking)."""
  return tf.where(saliency >= 0.5, image, tf.cast(fill, image.dtype))


def random_flip(image: tf.Tensor, seed: Seed) -> tf.Tensor:
  """Flips left-right with probability 1/2."""
  return tf.image.stateless_random_flip_left_right(image, seed)


def _clip_if(image: tf.Tensor, needed: tf.Tensor) -> tf.Tensor:
  """Clips to [0, 1] only if `needed`: the clip is a full pass over pixels."""
  return tf.cond(needed, lambda: tf.clip_by_value(image, 0.0, 1.0),
                 lambda: image)


def _brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  # SimCLR v2 scales brightness rather than shifting it. Only a factor above
  # 1 can leave [0, 1].
  return _clip_if(image * factor, factor > 1.0)


def _contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  # Below 1, pixels move towards their mean: they stay in [0, 1] (up to
  # rounding, which the final clip of `color_jitter` catches).
  return _clip_if(tf.image.adjust_contrast(image, factor), factor > 1.0)


# The jitter ops in the order `color_jitter_params` indexes them; the last
# two need RGB.
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


def jitter_ranges(strength: float, channels: int
                  ) -> dict[str, tuple[float, float]]:
  """The uniform range of each jitter op's amount at strength s.

  Brightness, contrast and saturation factors in [max(0, 1 - 0.8s),
  1 + 0.8s], the hue shift in [-min(0.5, 0.2s), min(0.5, 0.2s)] (SimCLR);
  1-channel images get brightness and contrast only.
  """
  low, high = max(0.0, 1.0 - 0.8 * strength), 1.0 + 0.8 * strength
  hue = min(0.5, 0.2 * strength)
  ranges = {"brightness": (low, high), "contrast": (low, high),
            "saturation": (low, high), "hue": (-hue, hue)}
  return {op: ranges[op] for op in JITTER_OPS[:4 if channels == 3 else 2]}


def color_jitter_params(seed: Seed, *, strength: float,
                        channels: int) -> dict[str, tf.Tensor]:
  """The amounts and order of `color_jitter` for `seed`.

  Returns:
    {op: float32 scalar amount} for the ops of `jitter_ranges`, and
    "order": int32 [ops], the op indices (into `JITTER_OPS`) in the order
    they apply, a uniformly random permutation.
  """
  ranges = jitter_ranges(strength, channels)
  *op_seeds, order_seed = _split(seed, len(ranges) + 1)
  params = {op: tf.random.stateless_uniform([], op_seed, *bounds)
            for (op, bounds), op_seed in zip(ranges.items(), op_seeds)}
  params["order"] = tf.argsort(
      tf.random.stateless_uniform([len(ranges)], order_seed))
  return params


def apply_color_jitter(image: tf.Tensor,
                       params: dict[str, tf.Tensor]) -> tf.Tensor:
  """Applies the jitter `params` (from `color_jitter_params`) in order."""
  ops = {
      "brightness": _brightness,
      "contrast": _contrast,
      "saturation": tf.image.adjust_saturation,
      "hue": tf.image.adjust_hue,
  }
  names = [op for op in JITTER_OPS if op in params]
  for position in range(len(names)):
    branches = [functools.partial(ops[op], image, params[op])
                for op in names]
    image = tf.switch_case(params["order"][position], branches)
  return tf.clip_by_value(image, 0.0, 1.0)


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
    The jittered image, in [0, 1] after each op as SimCLR clips it. Clips
    run only where an op can leave [0, 1] (brightness or contrast above 1;
    saturation and hue keep HSV values in range), and once at the end for
    rounding: the same images (to rounding) as clipping after every op,
    at half the clips.
  """
  return apply_color_jitter(image, color_jitter_params(
      seed, strength=strength, channels=image.shape[-1]))


def random_color_jitter(image: tf.Tensor, seed: Seed, *, strength: float,
                        prob: float = 0.8) -> tf.Tensor:
  """Applies `color_jitter` with probability `prob`."""
  params = _jitter_draws(seed, prob=prob, strength=strength,
                         channels=image.shape[-1])
  return _apply_jitter_draws(image, params)


def _jitter_draws(seed: Seed, *, prob: float, strength: float,
                  channels: int) -> dict[str, tf.Tensor]:
  """{"jitter": whether, **color_jitter_params} (nothing if disabled)."""
  if strength <= 0 or prob <= 0:
    return {}
  apply_seed, jitter_seed = _split(seed, 2)
  return {"jitter": _coin(apply_seed, prob),
          **color_jitter_params(jitter_seed, strength=strength,
                                channels=channels)}


def _apply_jitter_draws(image: tf.Tensor,
                        params: dict[str, tf.Tensor]) -> tf.Tensor:
  if "jitter" not in params:
    return image
  amounts = {key: value for key, value in params.items()
             if key in JITTER_OPS or key == "order"}
  return _apply_if(params["jitter"],
                   functools.partial(apply_color_jitter, params=amounts),
                   image)


def to_grayscale(image: tf.Tensor) -> tf.Tensor:
  """RGB to luma, kept as 3 channels; 1-channel images are returned as is."""
  if image.shape[-1] != 3:
    return image
  # One [pixels, 3] x [3, 3] matmul whose three columns are the luma weights
  # of `tf.image.rgb_to_grayscale`: the same values (to rounding) at a third
  # of the cost of its tensordot followed by a tile.
  luma = tf.constant(LUMA_WEIGHTS)
  gray = tf.matmul(tf.reshape(image, [-1, 3]), tf.tile(luma[:, None], [1, 3]))
  shape = (image.shape if image.shape.is_fully_defined()
           else tf.shape(image))
  return tf.reshape(gray, shape)


def random_grayscale(image: tf.Tensor, seed: Seed, *,
                     prob: float = 0.2) -> tf.Tensor:
  """Converts to grayscale with probability `prob` (no-op on 1 channel)."""
  return _apply_grayscale_draws(
      image, _grayscale_draws(seed, prob=prob, channels=image.shape[-1]))


def _grayscale_draws(seed: Seed, *, prob: float,
                     channels: int) -> dict[str, tf.Tensor]:
  if channels != 3 or prob <= 0:
    return {}
  return {"grayscale": _coin(seed, prob)}


def _apply_grayscale_draws(image: tf.Tensor,
                           params: dict[str, tf.Tensor]) -> tf.Tensor:
  if "grayscale" not in params:
    return image
  return _apply_if(params["grayscale"], to_grayscale, image)


def _blur_rows(image: tf.Tensor, kernel: tf.Tensor,
               radius: int) -> tf.Tensor:
  """Convolves the columns of [H, W, C] with `kernel`, rows reflected."""
  height, width, channels = image.shape
  padded = tf.concat([tf.reverse(image[1:radius + 1], [0]), image,
                      tf.reverse(image[height - radius - 1:height - 1], [0])],
                     axis=0)
  # Each of the W * C columns is one channel of a depthwise convolution:
  # contiguous in memory, so the kernel vectorises over hundreds of channels
  # instead of C (3x faster than a [1, H, W, C] depthwise conv, and the
  # slices above cost less than tf.pad's REFLECT mode).
  planes = tf.reshape(padded, [1, height + 2 * radius, 1, width * channels])
  filters = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]),
                    [1, 1, width * channels, 1])
  blurred = tf.nn.depthwise_conv2d(planes, filters, [1, 1, 1, 1], "VALID")
  return tf.reshape(blurred, [height, width, channels])


def gaussian_blur(image: tf.Tensor, sigma: tf.Tensor, *,
                  radius: int) -> tf.Tensor:
  """Separable Gaussian blur with a (2 radius + 1)-tap kernel.

  Args:
    image: float32 [H, W, C], static shape, H and W > radius.
    sigma: scalar standard deviation in pixels.
    radius: kernel half-width.

  Returns:
    The blurred image. Borders are reflected rather than zero-padded so the
    image does not darken at its edges.
  """
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernel = tf.exp(-tf.square(x) / (2.0 * tf.square(sigma)))
  kernel /= tf.reduce_sum(kernel)
  vertical = _blur_rows(image, kernel, radius)
  horizontal = _blur_rows(tf.transpose(vertical, [1, 0, 2]), kernel, radius)
  return tf.transpose(horizontal, [1, 0, 2])


def blur_radius(size: int) -> int:
  """The blur kernel's half-width for S x S views: ~10% of S, as SimCLR."""
  return max(1, size // 20)


def random_blur(image: tf.Tensor, seed: Seed, *, prob: float) -> tf.Tensor:
  """With probability `prob`, blurs with sigma ~ U[0.1, 2.0] (SimCLR).

  Args:
    image: float32 [S, S, C] with static S (blur runs after the crop).
    seed: [2] seed for whether to blur and sigma.
    prob: probability of blurring.

  Returns:
    The maybe-blurred image, in [0, 1] if the input is. The kernel spans
    ~10% of the side (`blur_radius`), as SimCLR.
  """
  return _apply_blur_draws(image, _blur_draws(seed, prob=prob))


def _blur_draws(seed: Seed, *, prob: float) -> dict[str, tf.Tensor]:
  if prob <= 0:
    return {}
  apply_seed, sigma_seed = _split(seed, 2)
  return {"blur": _coin(apply_seed, prob),
          "blur_sigma": tf.random.stateless_uniform([], sigma_seed,
                                                    *BLUR_SIGMA_RANGE)}


def _apply_blur_draws(image: tf.Tensor,
                      params: dict[str, tf.Tensor]) -> tf.Tensor:
  if "blur" not in params:
    return image

  def blur(x):
    blurred = gaussian_blur(x, params["blur_sigma"],
                            radius=blur_radius(image.shape[0]))
    # Rounding can put a weighted mean of pixels in [0, 1] just outside.
    return tf.clip_by_value(blurred, 0.0, 1.0)

  return _apply_if(params["blur"], blur, image)


def solarize(image: tf.Tensor) -> tf.Tensor:
  """Inverts the pixels at or above 0.5."""
  return tf.where(image < SOLARIZE_THRESHOLD, image, 1.0 - image)


def random_solarize(image: tf.Tensor, seed: Seed, *,
                    prob: float) -> tf.Tensor:
  """Solarizes with probability `prob`."""
  return _maybe_apply(solarize, image, prob, seed)


def post_crop_params(seeds: list[Seed], *, channels: int,
                     color_jitter_prob: float, color_strength: float,
                     grayscale_prob: float, blur_prob: float,
                     solarize_prob: float) -> dict[str, tf.Tensor]:
  """Every random choice of the ops after crop and flip, for one view.

  What `apply_post_crop` applies; `contrastive/data/device_augment.py`
  draws the same parameters from the same distributions with JAX, for the
  ops run on the accelerator instead (`input.augment.on_device`).

  Args:
    seeds: the [2] seeds of colour jitter, grayscale, blur and solarize.
    channels: image channels (saturation, hue and grayscale need 3).
    color_jitter_prob: probability of colour jitter.
    color_strength: colour jitter strength s (0 disables it).
    grayscale_prob: probability of grayscale.
    blur_prob: probability of Gaussian blur.
    solarize_prob: probability of solarization.

  Returns:
    Only the enabled ops' entries: "jitter" (bool), the `JITTER_OPS`
    amounts and "order" (see `color_jitter_params`); "grayscale" (bool);
    "blur" (bool) and "blur_sigma"; "solarize" (bool).
  """
  jitter_seed, gray_seed, blur_seed, solarize_seed = seeds
  params = {
      **_jitter_draws(jitter_seed, prob=color_jitter_prob,
                      strength=color_strength, channels=channels),
      **_grayscale_draws(gray_seed, prob=grayscale_prob, channels=channels),
      **_blur_draws(blur_seed, prob=blur_prob),
  }
  if solarize_prob > 0:
    params["solarize"] = _coin(solarize_seed, solarize_prob)
  return params


def apply_post_crop(view: tf.Tensor,
                    params: dict[str, tf.Tensor]) -> tf.Tensor:
  """Colour jitter, grayscale, blur, solarize: the ops `params` holds."""
  view = _apply_jitter_draws(view, params)
  view = _apply_grayscale_draws(view, params)
  view = _apply_blur_draws(view, params)
  if "solarize" in params:
    view = _apply_if(params["solarize"], solarize, view)
  return view


def _finish_view(view: tf.Tensor, seeds: list[Seed], *, flip: bool,
                 color_jitter_prob: float, color_strength: float,
                 grayscale_prob: float, blur_prob: float,
                 solarize_prob: float, randaugment_layers: int = 0,
                 randaugment_magnitude: float = 10.0,
                 randaugment_prob: float = 0.5) -> tf.Tensor:
  """The ops after the crop, each keeping [0, 1]: no final clip is needed.

  RandAugment, when on, comes last, after the colour ops (as PaCo's query
  view: jitter, then `rand-n2-m10`), keyed by its own stream so that the
  other draws do not change.
  """
  flip_seed, *op_seeds = seeds
  if flip:
    view = random_flip(view, flip_seed)
  view = apply_post_crop(view, post_crop_params(
      op_seeds, channels=view.shape[-1], color_jitter_prob=color_jitter_prob,
      color_strength=color_strength, grayscale_prob=grayscale_prob,
      blur_prob=blur_prob, solarize_prob=solarize_prob))
  if randaugment_layers:
    view = randaugment.randaugment(
        view, tf.random.experimental.stateless_fold_in(flip_seed,
                                                       _RANDAUGMENT_STREAM),
        num_layers=randaugment_layers, magnitude=randaugment_magnitude,
        prob=randaugment_prob)
  return view


def simclr_view(image: tf.Tensor, seed: Seed, *, size: int,
                area_range: tuple[float, float] = (0.08, 1.0),
                aspect_range: tuple[float, float] = (3 / 4, 4 / 3),
                flip: bool = True, color_jitter_prob: float = 0.8,
                color_strength: float = 1.0, grayscale_prob: float = 0.2,
                blur_prob: float = 0.5, solarize_prob: float = 0.0,
                randaugment_layers: int = 0,
                randaugment_magnitude: float = 10.0,
                randaugment_prob: float = 0.5,
                encoded: bool = False, channels: int = 3) -> tf.Tensor:
  """One SimCLR view: crop, flip, colour jitter, grayscale, blur, solarize.

  Then, with `randaugment_layers` > 0, RandAugment(N = randaugment_layers,
  M = randaugment_magnitude), each layer applied with `randaugment_prob`
  (`contrastive/data/randaugment.py`).

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
  crop_seed, *op_seeds = _split(seed, 6)
  if encoded:
    view = decode_and_random_resized_crop(
        image, crop_seed, size=size, area_range=area_range,
        aspect_range=aspect_range, channels=channels)
  else:
    view = random_resized_crop(image, crop_seed, size=size,
                               area_range=area_range,
                               aspect_range=aspect_range)
  return _finish_view(
      view, op_seeds, flip=flip, color_jitter_prob=color_jitter_prob,
      color_strength=color_strength, grayscale_prob=grayscale_prob,
      blur_prob=blur_prob, solarize_prob=solarize_prob,
      randaugment_layers=randaugment_layers,
      randaugment_magnitude=randaugment_magnitude,
      randaugment_prob=randaugment_prob)


# The options of the ops after the crop, which views may set differently
# (`simclr_views`' `view_overrides`, `input.augment.per_view`).
POST_CROP_OPTIONS = ("color_jitter_prob", "color_strength", "grayscale_prob",
                     "blur_prob", "solarize_prob", "randaugment_layers",
                     "randaugment_magnitude", "randaugment_prob")
# RandAugment (`contrastive/data/randaugment.py`) runs in tf.data only.
RANDAUGMENT_OPTIONS = ("randaugment_layers", "randaugment_magnitude",
                       "randaugment_prob")


def simclr_views(image: tf.Tensor, seeds: tf.Tensor, *, size: int,
                 area_range: tuple[float, float] = (0.08, 1.0),
                 aspect_range: tuple[float, float] = (3 / 4, 4 / 3),
                 flip: bool = True, color_jitter_prob: float = 0.8,
                 color_strength: float = 1.0, grayscale_prob: float = 0.2,
                 blur_prob: float = 0.5, solarize_prob: float = 0.0,
                 randaugment_layers: int = 0,
                 randaugment_magnitude: float = 10.0,
                 randaugment_prob: float = 0.5,
                 encoded: bool = False, channels: int = 3,
                 view_overrides: tuple[dict, ...] = (),
                 saliency: tf.Tensor | None = None,
                 saliency_prob: float = 0.0,
                 saliency_fill: float = 0.0) -> tf.Tensor:
  """`simclr_view` for each of V seeds, sharing one decode of a JPEG.

  Takes the same arguments as `simclr_view`, but `seeds` [V, 2] with V
  static; `view_overrides[v]` (for the first len(view_overrides) views)
  replaces some `POST_CROP_OPTIONS` for view v, e.g. BYOL's asymmetric
  views ({"blur_prob": 1.0}, {"blur_prob": 0.1, "solarize_prob": 0.2}) or
  PaCo's RandAugment query view ({"randaugment_layers": 2}). View v is
  `simclr_view(image, seeds[v], ...)`: the same parameters
  (window, flip, jitter, grayscale, blur, solarize), and for a decoded
  image the same pixels; for a JPEG, the union of the V windows is decoded
  once (`decode_and_random_resized_crops`), which differs from the
  per-view fused decode only near the windows' edges.

  Saliency masking (ReLICv2): given the image's `saliency` mask (uint8
  [H, W, 1], 255 salient), each view independently, with probability
  `saliency_prob`, has its background (pixels whose cropped, resized mask
  is below 1/2) set to `saliency_fill` right after the crop, before the
  flip and the colour ops. The coin is keyed by the view's seed folded
  with its own stream, so the other draws match the unmasked views'.

  Returns:
    float32 [V, S, S, C] in [0, 1].
  """
  num_views = seeds.shape[0]
  if num_views is None:
    raise ValueError("simclr_views needs a static number of seeds.")
  view_seeds = [_split(seeds[v], 6) for v in range(num_views)]
  crop_seeds = [split[0] for split in view_seeds]
  if encoded:
    views = decode_and_random_resized_crops(
        image, crop_seeds, size=size, area_range=area_range,
        aspect_range=aspect_range, channels=channels)
  else:
    views = [random_resized_crop(image, crop_seed, size=size,
                                 area_range=area_range,
                                 aspect_range=aspect_range)
             for crop_seed in crop_seeds]
  if saliency is not None and saliency_prob > 0:
    image_shape = (tf.image.extract_jpeg_shape(image) if encoded
                   else tf.shape(image))
    masks = saliency_crops(saliency, image_shape, crop_seeds, size=size,
                           area_range=area_range, aspect_range=aspect_range)
    views = [
        _apply_if(
            _coin(tf.random.experimental.stateless_fold_in(
                seeds[v], _SALIENCY_STREAM), saliency_prob),
            functools.partial(remove_background, saliency=mask,
                              fill=saliency_fill), view)
        for v, (view, mask) in enumerate(zip(views, masks))]
  post_crop = dict(color_jitter_prob=color_jitter_prob,
                   color_strength=color_strength,
                   grayscale_prob=grayscale_prob, blur_prob=blur_prob,
                   solarize_prob=solarize_prob,
                   randaugment_layers=randaugment_layers,
                   randaugment_magnitude=randaugment_magnitude,
                   randaugment_prob=randaugment_prob)
  return tf.stack([
      _finish_view(view, split[1:], flip=flip,
                   **{**post_crop, **(view_overrides[v]
                                      if v < len(view_overrides) else {})})
      for v, (view, split) in enumerate(zip(views, view_seeds))])


def deferred_op_keys(seeds: tf.Tensor) -> tf.Tensor:
  """uint32 [V, 2] key data for the views' post-crop ops on the accelerator.

  For `input.augment.on_device` (`contrastive/data/device_augment.py`):
  drawn from each view's colour-jitter seed, which the host then leaves
  unused, so the keys are a pure function of the view seeds [V, 2] and
  independent of the crop and flip.
  """
  return tf.stack([
      tf.random.stateless_uniform([2], _split(seeds[v], 6)[2], minval=None,
                                  maxval=None, dtype=tf.uint32)
      for v in range(seeds.shape[0])])


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
