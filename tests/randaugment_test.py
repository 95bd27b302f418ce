"""Tests for contrastive/data/randaugment.py.

Each op is checked against an independent reference: PIL's ImageOps and
ImageEnhance on the uint8 image for the photometric ops (within PIL's own
rounding, bounded case by case below), and a float64 numpy bilinear sampler
written from PIL's affine convention for the geometric ops (plus PIL itself
away from the borders, where the two fill conventions agree).
"""

import fractions
import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from contrastive.data import randaugment

_OPS = randaugment.OPS
_MAGNITUDE_FREE = ("identity", "auto_contrast", "equalize")
_PHOTOMETRIC = ("auto_contrast", "equalize", "solarize", "color", "posterize",
                "contrast", "brightness", "sharpness")
_GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
# Float32 arithmetic on the 0..255 scale.
_EPS = 1e-3


def _uint8_images() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  # Every uint8 level once per channel, in a different order per channel:
  # the LUT ops' every entry, thresholds included, is seen.
  ramp = np.stack([rng.permutation(256) for _ in range(3)], -1)
  return {
      "rgb": rng.integers(0, 256, (17, 23, 3), dtype=np.uint8),
      "low_contrast": rng.integers(100, 141, (17, 23, 3), dtype=np.uint8),
      "ramp": ramp.reshape(16, 16, 3).astype(np.uint8),
      "gray": rng.integers(0, 256, (17, 23, 1), dtype=np.uint8),
      "gray_low_contrast": rng.integers(60, 90, (17, 23, 1), dtype=np.uint8),
  }


_IMAGES = _uint8_images()


def _pil(pixels: np.ndarray) -> Image.Image:
  return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


def _from_pil(image: Image.Image, channels: int) -> np.ndarray:
  pixels = np.asarray(image).astype(np.float64)
  return pixels[..., None] if channels == 1 else pixels


def _apply(pixels: np.ndarray, name: str, magnitude: float,
           sign: float) -> np.ndarray:
  """The op on pixels / 255, back on the 0..255 scale (float64)."""
  image = tf.constant(pixels / 255.0, tf.float32)
  out = randaugment.apply_op(image, name, magnitude, sign)
  assert out.shape == image.shape and out.dtype == tf.float32
  return out.numpy().astype(np.float64) * 255.0


def _m(magnitude: float) -> fractions.Fraction:
  """magnitude / 10, exactly."""
  return fractions.Fraction(str(magnitude)) / 10


@pytest.mark.parametrize("image", sorted(_IMAGES))
def test_equalize_is_pil_exactly(image):
  pixels = _IMAGES[image]
  expected = _from_pil(ImageOps.equalize(_pil(pixels)), pixels.shape[-1])
  np.testing.assert_allclose(_apply(pixels, "equalize", 5, 1), expected,
                             atol=1e-4)


@pytest.mark.parametrize("case", ["step_zero", "lut_past_255", "one_level"])
def test_equalize_edge_cases_are_pil(case):
  if case == "step_zero":
    # All but 200 pixels at the brightest level: step = 200 // 255 = 0,
    # and PIL returns the image.
    flat = np.full(512, 255)
    flat[:200] = np.arange(200)
  elif case == "lut_past_255":
    # 511 pixels below 255 and one at it: step = 2 and the brightest
    # level's (511 + 1) // 2 = 256 is clipped to 255.
    flat = np.concatenate([np.repeat(np.arange(171), 3)[:511], [255]])
  else:
    flat = np.full(512, 77)
  pixels = flat.reshape(16, 32, 1).astype(np.uint8)
  expected = _from_pil(ImageOps.equalize(_pil(pixels)), 1)
  if case != "lut_past_255":
    np.testing.assert_array_equal(expected, pixels)
  np.testing.assert_allclose(_apply(pixels, "equalize", 0, 1), expected,
                             atol=1e-4)


@pytest.mark.parametrize("image", sorted(_IMAGES))
def test_auto_contrast_is_pil_up_to_its_truncation(image):
  pixels = _IMAGES[image]
  expected = _from_pil(ImageOps.autocontrast(_pil(pixels)), pixels.shape[-1])
  # PIL's LUT is int((v - low) 255 / (high - low)): truncated, so below the
  # exact stretch by less than 1.
  diff = _apply(pixels, "auto_contrast", 5, 1) - expected
  assert diff.min() >= -_EPS and diff.max() <= 1 + _EPS


def test_auto_contrast_leaves_a_constant_channel():
  pixels = _IMAGES["rgb"].copy()
  pixels[..., 1] = 200
  image = tf.constant(pixels / 255.0, tf.float32)
  out = randaugment.apply_op(image, "auto_contrast", 5, 1).numpy()
  np.testing.assert_array_equal(out[..., 1], image[..., 1])
  expected = _from_pil(ImageOps.autocontrast(_pil(pixels)), 3)
  np.testing.assert_array_equal(expected[..., 1], 200)
  assert out[..., 0].min() == 0 and out[..., 0].max() == 1


@pytest.mark.parametrize("magnitude", [0, 2.4, 2.5, 5, 7.5, 9.9, 10])
@pytest.mark.parametrize("image", ["rgb", "ramp", "gray"])
def test_posterize_is_pil_exactly(image, magnitude):
  pixels = _IMAGES[image]
  bits = 8 - math.floor(4 * _m(magnitude))
  expected = _from_pil(ImageOps.posterize(_pil(pixels), bits),
                       pixels.shape[-1])
  np.testing.assert_allclose(_apply(pixels, "posterize", magnitude, -1),
                             expected, atol=1e-4)


@pytest.mark.parametrize("magnitude", [0, 1, 2.5, 5, 6.25, 7.3, 10])
@pytest.mark.parametrize("image", ["rgb", "ramp", "gray"])
def test_solarize_is_pil_at_threshold_256_times_1_minus_m(image, magnitude):
  pixels = _IMAGES[image]
  # Magnitudes 2.5, 5 and 6.25 put the threshold on a level (192, 128, 96),
  # which PIL inverts; float32 rounding puts 2.5 and 6.25 above it.
  threshold = float(256 * (1 - _m(magnitude)))
  expected = _from_pil(ImageOps.solarize(_pil(pixels), threshold),
                       pixels.shape[-1])
  np.testing.assert_allclose(_apply(pixels, "solarize", magnitude, 1),
                             expected, atol=1e-3)
  if magnitude == 0:
    np.testing.assert_array_equal(expected, pixels)
  if magnitude == 10:
    np.testing.assert_array_equal(expected, 255 - pixels.astype(int))


_ENHANCERS = {"color": ImageEnhance.Color, "contrast": ImageEnhance.Contrast,
              "brightness": ImageEnhance.Brightness,
              "sharpness": ImageEnhance.Sharpness}
# How far PIL's uint8 degenerate image can be from the exact one, on the
# 0..255 scale: color rounds L (and its fixed-point weights are off by
# < 2e-5 each); contrast rounds the mean, int(mean + 0.5), of rounded L;
# sharpness rounds the smoothed pixels; brightness's zeros are exact.
_DEGENERATE_ERROR = {"color": 0.51, "contrast": 1.01, "brightness": 0.0,
                     "sharpness": 0.51}


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("magnitude", [2.5, 7.3, 10])
@pytest.mark.parametrize("name", sorted(_ENHANCERS))
@pytest.mark.parametrize("image", ["rgb", "low_contrast", "gray",
                                   "gray_low_contrast"])
def test_enhance_ops_are_pil_up_to_its_rounding(image, name, magnitude, sign):
  pixels = _IMAGES[image]
  factor = float(1 + sign * fractions.Fraction(9, 10) * _m(magnitude))
  expected = _from_pil(_ENHANCERS[name](_pil(pixels)).enhance(factor),
                       pixels.shape[-1])
  out = _apply(pixels, name, magnitude, sign)
  if name == "color" and pixels.shape[-1] == 1:
    # PIL's Color of an "L" image blends the image with itself.
    np.testing.assert_array_equal(expected, pixels)
    np.testing.assert_allclose(out, pixels, atol=1e-4)
    return
  # PIL truncates blend(D', x, f) = D' + f (x - D') to uint8 (after clipping
  # to [0, 255]), where its degenerate D' is within `_DEGENERATE_ERROR` of
  # the exact D: the exact blend differs from PIL's unrounded one by at most
  # |1 - f| times that, and the truncation takes up to 1 more off PIL's.
  slack = abs(1 - factor) * _DEGENERATE_ERROR[name] + _EPS
  diff = out - expected
  assert diff.min() >= -slack, diff.min()
  assert diff.max() <= 1 + slack, diff.max()


def _pil_coefficients(name: str, magnitude: float, sign: int, height: int,
                      width: int) -> tuple[float, ...]:
  """PIL's affine (a, b, c, d, e, f) for an op: output -> input point."""
  m = float(_m(magnitude))
  if name == "rotate":
    # Image.rotate(angle): the inverse rotation about (W / 2, H / 2).
    theta = -math.radians(sign * 30 * m)
    a, b, d, e = math.cos(theta), math.sin(theta), -math.sin(theta), \
        math.cos(theta)
    cx, cy = width / 2, height / 2
    return (a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy)
  if name == "shear_x":
    return (1, sign * 0.3 * m, 0, 0, 1, 0)
  if name == "shear_y":
    return (1, 0, 0, sign * 0.3 * m, 1, 0)
  if name == "translate_x":
    return (1, 0, sign * 0.45 * m * width, 0, 1, 0)
  assert name == "translate_y"
  return (1, 0, 0, 0, 1, sign * 0.45 * m * height)


def _sample_points(coeffs, height, width):
  """The input point of each output pixel, in pixel-index coordinates.

  PIL maps the output pixel centre (x + 0.5, y + 0.5) through the affine map
  to a point in coordinates where pixel i spans [i, i + 1); pixel i's centre
  is index i + 0.5 there.
  """
  a, b, c, d, e, f = coeffs
  y, x = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
  return a * x + b * y + c - 0.5, d * x + e * y + f - 0.5


def _bilinear_reference(image: np.ndarray, coeffs) -> np.ndarray:
  """Bilinear inverse mapping, each neighbour outside the image = fill."""
  height, width, _ = image.shape
  u, v = _sample_points(coeffs, height, width)
  x0, y0 = np.floor(u).astype(int), np.floor(v).astype(int)
  wx, wy = (u - x0)[..., None], (v - y0)[..., None]

  def pixel(yy, xx):
    inside = (xx >= 0) & (xx < width) & (yy >= 0) & (yy < height)
    value = image[np.clip(yy, 0, height - 1), np.clip(xx, 0, width - 1)]
    return np.where(inside[..., None], value, randaugment.FILL_VALUE)

  return ((1 - wy) * ((1 - wx) * pixel(y0, x0) + wx * pixel(y0, x0 + 1))
          + wy * ((1 - wx) * pixel(y0 + 1, x0) + wx * pixel(y0 + 1, x0 + 1)))


_GEOMETRIC_CASES = [(name, magnitude, sign) for name in _GEOMETRIC
                    for magnitude, sign in [(3, 1), (7.3, -1), (10, 1),
                                            (10, -1)]]


@pytest.mark.parametrize("image", ["rgb", "gray"])
@pytest.mark.parametrize("name,magnitude,sign", _GEOMETRIC_CASES)
def test_geometric_ops_are_the_bilinear_reference(name, magnitude, sign,
                                                  image):
  pixels = _IMAGES[image]
  height, width, _ = pixels.shape
  coeffs = _pil_coefficients(name, magnitude, sign, height, width)
  expected = _bilinear_reference(pixels / 255.0, coeffs)
  out = _apply(pixels, name, magnitude, sign) / 255.0
  np.testing.assert_allclose(out, expected, atol=1e-5)
  # The op moves something and leaves some fill.
  assert np.any(out == randaugment.FILL_VALUE)


@pytest.mark.parametrize("image", ["rgb", "gray"])
@pytest.mark.parametrize("name,magnitude,sign", _GEOMETRIC_CASES)
def test_geometric_ops_are_pil_away_from_the_border(name, magnitude, sign,
                                                    image):
  pixels = _IMAGES[image]
  height, width, channels = pixels.shape
  coeffs = _pil_coefficients(name, magnitude, sign, height, width)
  fill = (128,) * channels if channels == 3 else 128
  if name == "rotate":
    # Image.rotate itself, not our reading of its matrix.
    pil = _pil(pixels).rotate(sign * 30 * float(_m(magnitude)),
                              resample=Image.BILINEAR, fillcolor=fill)
  else:
    pil = _pil(pixels).transform((width, height), Image.AFFINE, coeffs,
                                 resample=Image.BILINEAR, fillcolor=fill)
  expected = _from_pil(pil, channels)
  out = _apply(pixels, name, magnitude, sign)
  u, v = _sample_points(coeffs, height, width)
  # Points between the outer pixel centres: all 4 neighbours (or those of
  # weight > 0) are in the image for both. PIL truncates its bilinear value
  # to uint8; 0.01 covers its float64 vs our float32 sampling points.
  inside = (u >= 0) & (u <= width - 1) & (v >= 0) & (v <= height - 1)
  assert inside.mean() > 0.1
  diff = (out - expected)[inside]
  assert diff.min() >= -0.01 and diff.max() <= 1.01
  # Points over a pixel from the image: fill for both. PIL's fill is the
  # uint8 128, ours 0.5 (127.5 / 255). Within the pixel-wide band between,
  # PIL repeats the edge pixel up to the image's edge and fills beyond it,
  # where each neighbour outside counts as fill for us (see `_affine`).
  outside = (u < -1) | (u > width) | (v < -1) | (v > height)
  assert outside.any()
  np.testing.assert_array_equal(out[outside], 127.5)
  np.testing.assert_array_equal(expected[outside], 128)


def _float_image(channels: int, seed: int = 0) -> tf.Tensor:
  rng = np.random.default_rng(seed)
  return tf.constant(rng.uniform(size=(13, 19, channels)), tf.float32)


@pytest.mark.parametrize("channels", [1, 3])
def test_ops_keep_shape_and_range(channels):
  image = _float_image(channels)
  for name in _OPS:
    # Magnitude and sign as tensors: one trace per op, shapes static.
    fn = tf.function(lambda x, m, s, name=name: randaugment.apply_op(
        x, name, m, s))
    for magnitude in [0.0, 5.0, 10.0]:
      for sign in [1.0, -1.0]:
        out = fn(image, tf.constant(magnitude), tf.constant(sign))
        concrete = fn.get_concrete_function(image, tf.constant(magnitude),
                                            tf.constant(sign))
        assert concrete.output_shapes == image.shape, name
        assert out.dtype == tf.float32
        out = out.numpy()
        assert out.min() >= 0.0 and out.max() <= 1.0, (name, magnitude)


@pytest.mark.parametrize("channels", [1, 3])
def test_magnitude_zero_is_the_identity(channels):
  # An unquantized image: no op may round it to uint8 levels at magnitude 0.
  image = _float_image(channels, seed=1)
  for name in _OPS:
    if name in _MAGNITUDE_FREE:
      continue
    for sign in [1, -1]:
      np.testing.assert_allclose(
          randaugment.apply_op(image, name, 0.0, sign), image, atol=1e-6,
          err_msg=name)
  np.testing.assert_array_equal(
      randaugment.apply_op(image, "identity", 10.0, -1.0), image)


def test_magnitude_free_ops_ignore_magnitude_and_sign():
  image = _float_image(3)
  for name in ("auto_contrast", "equalize"):
    np.testing.assert_array_equal(
        randaugment.apply_op(image, name, 0.0, 1.0),
        randaugment.apply_op(image, name, 10.0, -1.0))


def test_apply_op_rejects_bad_arguments():
  image = _float_image(3)
  with pytest.raises(ValueError, match="Unknown"):
    randaugment.apply_op(image, "invert", 5.0, 1.0)
  for magnitude in [-0.5, 10.5]:
    with pytest.raises(ValueError, match="magnitude"):
      randaugment.apply_op(image, "rotate", magnitude, 1.0)
  with pytest.raises(ValueError, match="channels"):
    randaugment.apply_op(tf.zeros([8, 8, 2]), "rotate", 5.0, 1.0)


def _seeds(count: int, start: int = 0) -> tf.Tensor:
  return tf.stack([tf.range(start, start + count),
                   tf.fill([count], 12345)], axis=1)


def test_randaugment_is_deterministic_and_depends_on_the_seed():
  image = _float_image(3)
  kwargs = dict(num_layers=2, magnitude=9.0, prob=1.0)
  seeds = _seeds(6)
  outs = [randaugment.randaugment(image, seed, **kwargs).numpy()
          for seed in seeds]
  np.testing.assert_array_equal(
      randaugment.randaugment(image, seeds[0], **kwargs), outs[0])
  assert len({out.tobytes() for out in outs}) >= 4


@pytest.mark.parametrize("channels", [1, 3])
def test_randaugment_in_tf_data_is_eager(channels):
  images = tf.stack([_float_image(channels, seed=s) for s in range(8)])
  seeds = _seeds(8, start=100)
  kwargs = dict(num_layers=3, magnitude=9.0, prob=0.5)
  dataset = tf.data.Dataset.from_tensor_slices((images, seeds)).map(
      lambda image, seed: randaugment.randaugment(image, seed, **kwargs))
  assert dataset.element_spec.shape == images.shape[1:]
  for image, seed, out in zip(images, seeds, dataset):
    np.testing.assert_allclose(
        out, randaugment.randaugment(image, seed, **kwargs), atol=1e-6)


def _z(count: np.ndarray, total: int, prob: float) -> np.ndarray:
  """Standard scores of binomial counts."""
  return (count - total * prob) / math.sqrt(total * prob * (1 - prob))


def test_layer_choices_distribution():
  num_seeds, num_layers, prob = 4000, 2, 0.3
  choices = next(iter(
      tf.data.Dataset.from_tensor_slices(_seeds(num_seeds))
      .map(lambda seed: randaugment.layer_choices(
          seed, num_layers=num_layers, prob=prob))
      .batch(num_seeds)))
  ops = choices["ops"].numpy()
  signs = choices["signs"].numpy()
  applied = choices["applied"].numpy()
  assert ops.shape == signs.shape == applied.shape == (num_seeds, num_layers)
  assert ops.dtype == np.int32 and signs.dtype == np.float32
  assert applied.dtype == bool
  assert ops.min() >= 0 and ops.max() < len(_OPS)
  assert set(np.unique(signs)) == {-1.0, 1.0}
  draws = num_seeds * num_layers
  counts = np.bincount(ops.ravel(), minlength=len(_OPS))
  assert np.all(np.abs(_z(counts, draws, 1 / len(_OPS))) < 5), counts
  assert abs(_z(np.sum(signs == 1), draws, 0.5)) < 5
  assert abs(_z(applied.sum(), draws, prob)) < 5
  # Layers draw from their own seeds: same op in both as often as chance.
  same = np.sum(ops[:, 0] == ops[:, 1])
  assert abs(_z(same, num_seeds, 1 / len(_OPS))) < 5


@pytest.mark.parametrize("prob", [0.5, 1.0])
def test_randaugment_applies_the_drawn_ops_in_order(prob):
  image = _float_image(3, seed=2)
  seen = set()
  for seed in _seeds(10, start=7):
    kwargs = dict(num_layers=3, prob=prob)
    choices = randaugment.layer_choices(seed, **kwargs)
    expected = image
    for op, sign, applied in zip(choices["ops"].numpy(),
                                 choices["signs"].numpy(),
                                 choices["applied"].numpy()):
      if applied:
        seen.add(op)
        expected = randaugment.apply_op(expected, _OPS[op], 7.0, sign)
    out = randaugment.randaugment(image, seed, magnitude=7.0, **kwargs)
    np.testing.assert_allclose(out, expected, atol=1e-6)
  assert len(seen) >= 5
  if prob == 1.0:
    assert np.all(choices["applied"].numpy())


def test_no_layers_or_no_prob_returns_the_image():
  image = _float_image(3)
  seed = tf.constant([1, 2])
  np.testing.assert_array_equal(
      randaugment.randaugment(image, seed, num_layers=0, magnitude=10.0),
      image)
  np.testing.assert_array_equal(
      randaugment.randaugment(image, seed, num_layers=3, magnitude=10.0,
                              prob=0.0), image)
  choices = randaugment.layer_choices(seed, num_layers=0, prob=0.5)
  assert all(value.shape == (0,) for value in choices.values())


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_layers=-1), "num_layers"),
    (dict(num_layers=1.5), "num_layers"),
    (dict(num_layers=True), "num_layers"),
    (dict(magnitude=-0.1), "magnitude"),
    (dict(magnitude=10.5), "magnitude"),
    (dict(prob=-0.1), "prob"),
    (dict(prob=1.5), "prob"),
])
def test_randaugment_rejects_bad_arguments(kwargs, match):
  arguments = {**dict(num_layers=2, magnitude=5.0, prob=0.5), **kwargs}
  with pytest.raises(ValueError, match=match):
    randaugment.randaugment(_float_image(3), tf.constant([1, 2]),
                            **arguments)
  if "magnitude" not in kwargs:
    arguments.pop("magnitude")
    with pytest.raises(ValueError, match=match):
      randaugment.layer_choices(tf.constant([1, 2]), **arguments)


# The views of the input pipeline.


def test_views_apply_randaugment_last_on_their_own_stream():
  from contrastive.data import augment  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(11)
  image = tf.constant(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
  seeds = tf.constant(rng.integers(0, 2**31, (24, 2)), tf.int64)
  plain = augment.simclr_views(image, seeds, size=24).numpy()
  # View 0 only, as PaCo's RandAugment query view.
  mixed = augment.simclr_views(
      image, seeds, size=24,
      view_overrides=({"randaugment_layers": 2},)).numpy()
  np.testing.assert_array_equal(mixed[1:], plain[1:])
  everywhere = augment.simclr_views(image, seeds, size=24,
                                    randaugment_layers=2).numpy()
  changed = 0
  for v in range(24):
    flip_seed = tf.unstack(tf.random.experimental.stateless_split(
        seeds[v], num=6))[1]
    expected = randaugment.randaugment(
        tf.constant(plain[v]), tf.random.experimental.stateless_fold_in(
            flip_seed, augment._RANDAUGMENT_STREAM),  # pylint: disable=protected-access
        num_layers=2, magnitude=10.0, prob=0.5).numpy()
    np.testing.assert_allclose(everywhere[v], expected, atol=1e-6)
    changed += int(np.abs(expected - plain[v]).max() > 0)
  np.testing.assert_allclose(mixed[0], everywhere[0], atol=1e-6)
  # Most views change (no layer applies to about a quarter of them).
  assert changed >= 12


def test_randaugment_is_refused_on_the_device():
  from configs import common  # pylint: disable=g-import-not-at-top
  from contrastive.data import device_augment  # pylint: disable=g-import-not-at-top
  for shared, per_view in ((2, ()), (0, ({"randaugment_layers": 1},))):
    config = common.simclr_augment()
    config.update(on_device=True, randaugment_layers=shared,
                  per_view=per_view)
    with pytest.raises(ValueError, match="tf.data only"):
      device_augment.view_overrides(config)
    config.on_device = False
    assert len(device_augment.view_overrides(config)) == len(per_view)
