"""RandAugment (Cubuk et al., 2020) as stateless TF ops, keyed by seeds.

RandAugment applies N layers; each picks one of 14 image ops uniformly at
random and applies it at one global magnitude m, so the whole policy has two
hyperparameters, N and m, instead of AutoAugment's searched sub-policies.
Here, as in timm, each layer also draws a sign for the signed ops and applies
its op only with probability `prob` (timm's 0.5; the paper's is 1).

Magnitudes are on the TF/timm scale: `magnitude` in [0, MAX_MAGNITUDE = 10],
m = magnitude / 10, so `randaugment(..., num_layers=2, magnitude=10)` is
timm's `rand-n2-m10` (up to the increasing-severity conventions below). Every
op is the identity at magnitude 0, except identity, auto_contrast and
equalize, which have no magnitude. The ops follow PIL's ImageOps and
ImageEnhance, as timm's do, rewritten for float32 [H, W, C] images in [0, 1]
(C = 1 or 3):

  identity: the image.
  auto_contrast: each channel's [min, max] stretched to [0, 1] (constant
    channels unchanged).
  equalize: PIL's per-channel histogram equalization of round(255 x).
  rotate: by sign * 30 m degrees, counter-clockwise about the centre.
  solarize: inverts x >= (256 / 255) (1 - m), i.e. uint8 values at or above
    256 (1 - m): nothing at m = 0, everything at m = 1 (timm's
    SolarizeIncreasing).
  color, contrast, brightness, sharpness: PIL's blend of a degenerate image
    with the image by factor 1 + sign * 0.9 m, in [0.1, 1.9].
  posterize: keeps the top 8 - floor(4 m) bits of round(255 x): 8 bits (the
    identity) at m = 0, 4 at m = 1.
  shear_x, shear_y: shear sign * 0.3 m about the top-left corner.
  translate_x, translate_y: by sign * 0.45 m of the width (height).

Geometric ops sample bilinearly and fill what the image does not cover with
FILL_VALUE (timm's grey 128). As in `augment.py`, every random choice is a
`tf.random.stateless_*` op on an explicit [2] seed, so an augmented image is
a pure function of (image, seed), eagerly and inside tf.data.
"""

import math

import numpy as np
import tensorflow as tf

Seed = tf.Tensor

OPS = ("identity", "auto_contrast", "equalize", "rotate", "solarize",
       "color", "posterize", "contrast", "brightness", "sharpness",
       "shear_x", "shear_y", "translate_x", "translate_y")
MAX_MAGNITUDE = 10.0
FILL_VALUE = 0.5

# Each op's amount at m = 1: degrees, enhancement factor spread, shear,
# fraction of the side (timm's RandAugment ranges).
MAX_ROTATE_DEGREES = 30.0
MAX_ENHANCE = 0.9
MAX_SHEAR = 0.3
MAX_TRANSLATE = 0.45
# PIL's RGB -> L weights, L = (299 R + 587 G + 114 B) / 1000, which Color and
# Contrast degenerate to (not `augment.LUMA_WEIGHTS`, tf.image's rounding).
PIL_LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# ImageFilter.SMOOTH, the degenerate image of ImageEnhance.Sharpness.
SMOOTH_KERNEL = ((1.0, 1.0, 1.0), (1.0, 5.0, 1.0), (1.0, 1.0, 1.0))


def _split(seed: Seed, num: int) -> list[Seed]:
  return tf.unstack(tf.random.experimental.stateless_split(seed, num=num))


def _quantize(image: tf.Tensor) -> tf.Tensor:
  """The uint8 values PIL would see, as int32."""
  return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0),
                 tf.int32)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
  """PIL's "L" of an RGB image (unrounded), [H, W, 1]."""
  return tf.tensordot(image, tf.constant(PIL_LUMA_WEIGHTS), axes=[[2], [0]]
                      )[..., None]


def _blend(degenerate: tf.Tensor, image: tf.Tensor,
           factor: tf.Tensor) -> tf.Tensor:
  """PIL's Image.blend(degenerate, image, factor), clipped to [0, 1].

  Written as image + (factor - 1) (image - degenerate), equal to PIL's
  degenerate + factor (image - degenerate) but exactly the image at factor 1.
  """
  return tf.clip_by_value(image + (factor - 1.0) * (image - degenerate),
                          0.0, 1.0)


def _auto_contrast(image: tf.Tensor) -> tf.Tensor:
  low = tf.reduce_min(image, axis=[0, 1])
  high = tf.reduce_max(image, axis=[0, 1])
  spread = high - low
  # PIL leaves a constant channel alone rather than dividing by zero.
  scale = tf.where(spread > 0, 1.0 / tf.where(spread > 0, spread, 1.0), 1.0)
  low = tf.where(spread > 0, low, 0.0)
  return tf.clip_by_value((image - low) * scale, 0.0, 1.0)


def _equalize(image: tf.Tensor) -> tf.Tensor:
  """PIL's ImageOps.equalize of round(255 x), channel by channel."""
  channels = image.shape[-1]
  levels = _quantize(image)
  # One histogram for all channels: channel c's values go to bins 256 c + v.
  binned = tf.reshape(levels + 256 * tf.range(channels), [-1])
  histogram = tf.reshape(
      tf.math.bincount(binned, minlength=256 * channels,
                       maxlength=256 * channels), [channels, 256])
  bins = tf.range(256)
  last = tf.reduce_max(tf.where(histogram > 0, bins, -1), axis=1)
  last_count = tf.gather(histogram, last, batch_dims=1)
  # PIL spreads all pixels but those of the brightest level over 255 steps.
  step = (tf.reduce_sum(histogram, axis=1) - last_count) // 255
  safe_step = tf.maximum(step, 1)[:, None]
  before = tf.cumsum(histogram, axis=1, exclusive=True)
  lut = tf.minimum(255, (before + safe_step // 2) // safe_step)
  equalized = tf.gather(tf.reshape(lut, [-1]), binned)
  equalized = tf.reshape(tf.cast(equalized, tf.float32) / 255.0, image.shape)
  # A step of 0 (one level, or nearly all pixels at the brightest) makes PIL
  # return the channel as it is.
  return tf.where(step > 0, equalized, image)


def _solarize(image: tf.Tensor, m: tf.Tensor) -> tf.Tensor:
  # uint8 threshold 256 (1 - m), as PIL's solarize(img, 256 (1 - m)) inverts
  # the values >= it: at m = 0 the threshold is above every value. The 1e-6
  # keeps float rounding of v / 255 from moving a uint8 value v across a
  # threshold equal to it (uint8 levels are 1 / 255 apart).
  threshold = (256.0 / 255.0) * (1.0 - m) - 1e-6
  return tf.where(image >= threshold, 1.0 - image, image)


def _posterize(image: tf.Tensor, dropped: tf.Tensor) -> tf.Tensor:
  """PIL's posterize keeping 8 - `dropped` bits of round(255 x)."""
  quantum = tf.pow(2.0, dropped)
  levels = tf.cast(_quantize(image), tf.float32)
  posterized = tf.floor(levels / quantum) * quantum / 255.0
  # All 8 bits kept: the image itself, not its uint8 rounding, so that
  # magnitude 0 is the identity on any float image.
  return tf.where(dropped > 0, posterized, image)


def _smooth(image: tf.Tensor) -> tf.Tensor:
  """PIL's ImageFilter.SMOOTH: a 3 x 3 mean, the border pixels kept."""
  height, width, channels = image.shape
  if height < 3 or width < 3:
    return image
  kernel = tf.constant(SMOOTH_KERNEL) / float(np.sum(SMOOTH_KERNEL))
  filters = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
  inner = tf.nn.depthwise_conv2d(image[None], filters, [1, 1, 1, 1],
                                 "VALID")[0]
  interior = np.zeros([height, width, 1], bool)
  interior[1:-1, 1:-1] = True
  return tf.where(interior, tf.pad(inner, [[1, 1], [1, 1], [0, 0]]), image)


def _affine(image: tf.Tensor, coeffs: list[tf.Tensor]) -> tf.Tensor:
  """PIL's Image.transform(AFFINE, coeffs), bilinear, filled with grey.

  PIL maps the centre (x + 0.5, y + 0.5) of output pixel (x, y) to the input
  point (a (x + 0.5) + b (y + 0.5) + c, d (x + 0.5) + e (y + 0.5) + f), in
  coordinates where pixel i spans [i, i + 1). ImageProjectiveTransformV3
  maps pixel indices to pixel indices (pixel i centred at i), so with
  u = 0.5 (a + b - 1) and v = 0.5 (d + e - 1) PIL's (a, b, c, d, e, f) is its
  (a, b, c + u, d, e, f + v): the same sampling point for every pixel.

  Borders differ from PIL's: each of the 4 bilinear neighbours that lies
  outside the image counts as FILL_VALUE, so the image fades into the fill
  over one pixel, where PIL repeats the edge pixel for points within the
  image's [0, W) x [0, H) and fills outside it. Inside, the two agree.

  Args:
    image: float32 [H, W, C].
    coeffs: PIL's (a, b, c, d, e, f), float32 scalars.

  Returns:
    The transformed image, float32 [H, W, C] in [0, 1].
  """
  a, b, c, d, e, f = coeffs
  transform = tf.stack([a, b, c + 0.5 * (a + b - 1.0),
                        d, e, f + 0.5 * (d + e - 1.0), 0.0, 0.0])
  height, width, _ = image.shape
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=transform[None],
      output_shape=tf.constant([height, width], tf.int32),
      fill_value=tf.constant(FILL_VALUE, tf.float32),
      interpolation="BILINEAR", fill_mode="CONSTANT")[0]
  out = tf.ensure_shape(out, image.shape)
  # Bilinear weights can overshoot [0, 1] by rounding.
  return tf.clip_by_value(out, 0.0, 1.0)


def _rotate(image: tf.Tensor, degrees: tf.Tensor) -> tf.Tensor:
  """PIL's Image.rotate(degrees): counter-clockwise about (W / 2, H / 2)."""
  height, width, _ = image.shape
  center_x, center_y = width / 2.0, height / 2.0
  # Output point p samples input R(-degrees) (p - centre) + centre; on
  # screen (y down) that turns the picture counter-clockwise.
  angle = degrees * (math.pi / 180.0)
  cos, sin = tf.cos(angle), tf.sin(angle)
  return _affine(image, [cos, -sin,
                         center_x - cos * center_x + sin * center_y,
                         sin, cos,
                         center_y - sin * center_x - cos * center_y])


def _check_image(image: tf.Tensor) -> None:
  if image.shape.rank != 3 or not image.shape.is_fully_defined():
    raise ValueError(f"RandAugment needs a static [H, W, C] image shape, "
                     f"got {image.shape}.")
  if image.shape[-1] not in (1, 3):
    raise ValueError(f"RandAugment needs 1 or 3 channels, got "
                     f"{image.shape[-1]}.")


def _check_magnitude(magnitude: float) -> None:
  if not 0.0 <= magnitude <= MAX_MAGNITUDE:
    raise ValueError(f"magnitude must be in [0, {MAX_MAGNITUDE}], got "
                     f"{magnitude}.")


def apply_op(image: tf.Tensor, name: str, magnitude, sign) -> tf.Tensor:
  """Applies RandAugment op `name` at `magnitude`, deterministically.

  Args:
    image: float32 [H, W, C] in [0, 1], static shape, C = 1 or 3.
    name: one of `OPS`.
    magnitude: float scalar (Python or tensor) in [0, MAX_MAGNITUDE]; the
      ops' amounts at magnitude 10 are in the module docstring.
    sign: float scalar +1 or -1, the direction of rotate, shear, translate
      and the enhancement factors; the other ops ignore it.

  Returns:
    float32 [H, W, C] in [0, 1]. Color is the identity on 1 channel.

  Raises:
    ValueError: for an unknown op, a non-static image shape or a static
      magnitude outside [0, 10].
  """
  if name not in OPS:
    raise ValueError(f"Unknown RandAugment op {name!r}; ops are {OPS}.")
  image = tf.convert_to_tensor(image, tf.float32)
  _check_image(image)
  static = tf.get_static_value(magnitude)
  if static is not None:
    _check_magnitude(float(static))
  magnitude = tf.convert_to_tensor(magnitude, tf.float32)
  sign = tf.convert_to_tensor(sign, tf.float32)
  m = magnitude / MAX_MAGNITUDE
  factor = 1.0 + sign * MAX_ENHANCE * m
  shear = sign * MAX_SHEAR * m
  height, width, channels = image.shape
  zero, one = tf.constant(0.0), tf.constant(1.0)

  if name == "identity":
    return image
  if name == "auto_contrast":
    return _auto_contrast(image)
  if name == "equalize":
    return _equalize(image)
  if name == "rotate":
    return _rotate(image, sign * MAX_ROTATE_DEGREES * m)
  if name == "solarize":
    return _solarize(image, m)
  if name == "posterize":
    # 4 m is a whole number only at magnitudes 0, 2.5, 5, 7.5, 10, where m
    # is exact in float32, so the floor cannot fall a bit short.
    return _posterize(image, tf.floor(4.0 * m))
  if name == "color":
    if channels == 1:
      return image
    return _blend(_grayscale(image), image, factor)
  if name == "contrast":
    gray = _grayscale(image) if channels == 3 else image
    return _blend(tf.reduce_mean(gray), image, factor)
  if name == "brightness":
    return _blend(zero, image, factor)
  if name == "sharpness":
    return _blend(_smooth(image), image, factor)
  if name == "shear_x":
    return _affine(image, [one, shear, zero, zero, one, zero])
  if name == "shear_y":
    return _affine(image, [one, zero, zero, shear, one, zero])
  if name == "translate_x":
    shift = sign * MAX_TRANSLATE * m * width
    return _affine(image, [one, zero, shift, zero, one, zero])
  assert name == "translate_y", name
  shift = sign * MAX_TRANSLATE * m * height
  return _affine(image, [one, zero, zero, zero, one, shift])


def _check_layers(num_layers: int, prob: float) -> None:
  if (isinstance(num_layers, bool) or not isinstance(num_layers, int)
      or num_layers < 0):
    raise ValueError(f"num_layers must be an int >= 0, got {num_layers!r}.")
  if not 0.0 <= prob <= 1.0:
    raise ValueError(f"prob must be in [0, 1], got {prob}.")


def layer_choices(seed: Seed, *, num_layers: int,
                  prob: float) -> dict[str, tf.Tensor]:
  """The random draws of `randaugment`'s layers for `seed`.

  Layer i draws from the i-th of `num_layers` splits of `seed`, itself split
  three ways: its op, its sign and whether it applies.

  Args:
    seed: [2] int32/int64 seed.
    num_layers: N.
    prob: probability that a layer applies its op.

  Returns:
    "ops": int32 [N], indices into `OPS`, uniform; "signs": float32 [N],
    +1 or -1 with probability 1/2 each; "applied": bool [N], True with
    probability `prob` (constant for `prob` 0 or 1).
  """
  _check_layers(num_layers, prob)
  if num_layers == 0:
    return {"ops": tf.zeros([0], tf.int32), "signs": tf.zeros([0]),
            "applied": tf.zeros([0], tf.bool)}
  ops, signs, applied = [], [], []
  for layer_seed in _split(seed, num_layers):
    op_seed, sign_seed, apply_seed = _split(layer_seed, 3)
    ops.append(tf.random.stateless_uniform(
        [], op_seed, minval=0, maxval=len(OPS), dtype=tf.int32))
    signs.append(tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5,
                          1.0, -1.0))
    if 0 < prob < 1:
      applied.append(tf.random.stateless_uniform([], apply_seed) < prob)
  if not 0 < prob < 1:
    # Constant, so that `randaugment` leaves the tf.cond out of the graph.
    applied = [tf.constant(prob >= 1)] * num_layers
  return {"ops": tf.stack(ops), "signs": tf.stack(signs),
          "applied": tf.stack(applied)}


def randaugment(image: tf.Tensor, seed: Seed, *, num_layers: int,
                magnitude: float, prob: float = 0.5) -> tf.Tensor:
  """RandAugment: `num_layers` random ops at `magnitude`, each maybe applied.

  Each layer applies one op of `OPS`, drawn uniformly (with replacement
  across layers), with a random sign, with probability `prob`; the draws are
  `layer_choices(seed, ...)`. Each layer holds every op once in a
  `tf.switch_case`, so the graph has N x 14 ops and runs N of them.

  Args:
    image: float32 [H, W, C] in [0, 1], static shape, C = 1 or 3.
    seed: [2] int32/int64 seed.
    num_layers: N >= 0; 0 returns the image.
    magnitude: m in [0, MAX_MAGNITUDE], shared by all layers.
    prob: probability that a layer applies its op (timm 0.5, paper 1).

  Returns:
    The augmented image, float32 [H, W, C] in [0, 1], same static shape.

  Raises:
    ValueError: for num_layers not an int >= 0, magnitude outside [0, 10],
      prob outside [0, 1], or an image without static [H, W, 1 or 3] shape.
  """
  _check_layers(num_layers, prob)
  _check_magnitude(magnitude)
  image = tf.convert_to_tensor(image, tf.float32)
  _check_image(image)
  choices = layer_choices(seed, num_layers=num_layers, prob=prob)
  shape = image.shape
  for layer in range(num_layers):

    def augment(x, op=choices["ops"][layer], sign=choices["signs"][layer]):
      branches = [lambda name=name: apply_op(x, name, magnitude, sign)
                  for name in OPS]
      return tf.switch_case(op, branches)

    if prob >= 1:
      image = augment(image)
    elif prob > 0:
      image = tf.cond(choices["applied"][layer],
                      lambda x=image, fn=augment: fn(x), lambda x=image: x)
    image = tf.ensure_shape(image, shape)
  return image
