"""The view ops after crop and flip, on the accelerator (`augment.on_device`).

SimCLR-style pretraining is often input-bound on TPU (google-research/simclr
#62, the BYOL README): colour jitter and blur are most of the host's work
per view (benchmarks/RESULTS.md). With `config.input.augment.on_device`, the
tf.data pipeline decodes, crops and flips, and ships with each view a
threefry key (`"view_key"`, uint32 [B, V, 2], derived from the view's seed);
the jitted train step then applies colour jitter, grayscale, blur and
solarize here, as the SupCon TF code's `defer_blurring` does for blur.

The parameters are drawn from the distributions of
`augment.post_crop_params` (same ranges, probabilities, uniformly random
jitter order; tests/device_augment_test.py checks the samples agree) and
applied with the same image ops (tf.image's HSV arithmetic, reflected-border
separable blur), so that given the same parameters both paths produce the
same view to float32 rounding. Only the random streams differ: threefry
here, TF's stateless Philox there. A batch stays a pure function of (seed,
step): the keys come from the pipeline, which derives them from the view
seeds.

Cost on the accelerator: the blur is 2 x (2 r + 1) multiply-adds per pixel
and channel (r = S // 20: 23 taps at 224 px, ~14 MFLOP per view), the
jitter a few dozen elementwise ops per pixel — under 0.1% of a ResNet-50
train step's ~24 GFLOP per view. Under `vmap` the random order of the jitter
ops becomes a select over all of them at each position (4 x 4 op
evaluations for RGB), which is still elementwise work.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from contrastive.data import augment

# The batch entry holding each view's key data, uint32 [B, V, 2]; and those
# of multi-crop's small views (`input.small_views`) and their keys.
VIEW_KEY = "view_key"
SMALL_IMAGE = "image_small"
SMALL_VIEW_KEY = "view_key_small"
_KEY_IMPL = "threefry2x32"

Params = dict[str, jax.Array]


def _coin(key: jax.Array, prob: float) -> jax.Array:
  """A bool scalar, True with probability `prob` (constant at 0 and 1)."""
  if prob <= 0:
    return jnp.array(False)
  if prob >= 1:
    return jnp.array(True)
  return jax.random.uniform(key) < prob


def post_crop_params(key: jax.Array, *, channels: int,
                     color_jitter_prob: float, color_strength: float,
                     grayscale_prob: float, blur_prob: float,
                     solarize_prob: float) -> Params:
  """Every random choice of the post-crop ops for one view.

  The same entries, ranges and probabilities as `augment.post_crop_params`
  (which documents them); `key` is a typed threefry key.
  """
  jitter_key, gray_key, blur_key, solarize_key = jax.random.split(key, 4)
  params = {}
  if color_strength > 0 and color_jitter_prob > 0:
    apply_key, amounts_key = jax.random.split(jitter_key)
    ranges = augment.jitter_ranges(color_strength, channels)
    *op_keys, order_key = jax.random.split(amounts_key, len(ranges) + 1)
    params["jitter"] = _coin(apply_key, color_jitter_prob)
    for (op, (low, high)), op_key in zip(ranges.items(), op_keys):
      params[op] = jax.random.uniform(op_key, minval=low, maxval=high)
    params["order"] = jax.random.permutation(order_key, len(ranges))
  if channels == 3 and grayscale_prob > 0:
    params["grayscale"] = _coin(gray_key, grayscale_prob)
  if blur_prob > 0:
    apply_key, sigma_key = jax.random.split(blur_key)
    params["blur"] = _coin(apply_key, blur_prob)
    params["blur_sigma"] = jax.random.uniform(
        sigma_key, minval=augment.BLUR_SIGMA_RANGE[0],
        maxval=augment.BLUR_SIGMA_RANGE[1])
  if solarize_prob > 0:
    params["solarize"] = _coin(solarize_key, solarize_prob)
  return params


def rgb_to_hsv(rgb: jax.Array) -> jax.Array:
  """[..., 3] RGB in [0, 1] to HSV, hue in [0, 1) (as tf.image)."""
  red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  value = jnp.max(rgb, axis=-1)
  spread = value - jnp.min(rgb, axis=-1)
  saturation = jnp.where(value > 0, spread / jnp.where(value > 0, value, 1),
                         0.0)
  safe_spread = jnp.where(spread > 0, spread, 1.0)
  hue = jnp.where(
      red == value, (green - blue) / safe_spread,
      jnp.where(green == value, (blue - red) / safe_spread + 2.0,
                (red - green) / safe_spread + 4.0)) / 6.0
  hue = jnp.where(spread > 0, hue, 0.0)
  hue = jnp.where(hue < 0, hue + 1.0, hue)
  return jnp.stack([hue, saturation, value], axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
  """Inverse of `rgb_to_hsv`."""
  hue, saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]

  # Each channel is piecewise linear in the hue: value minus the chroma
  # times a trapezoid, shifted by 5, 3 and 1 sixths for red, green, blue.
  def channel(shift):
    k = jnp.mod(shift + hue * 6.0, 6.0)
    return value - value * saturation * jnp.clip(
        jnp.minimum(k, 4.0 - k), 0.0, 1.0)

  return jnp.stack([channel(5.0), channel(3.0), channel(1.0)], axis=-1)


def _adjust_contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
  # tf.image.adjust_contrast: towards each channel's spatial mean.
  mean = jnp.mean(image, axis=(0, 1), keepdims=True)
  return (image - mean) * factor + mean


def _adjust_hsv(image: jax.Array, saturation_factor: jax.Array,
                hue_delta: jax.Array) -> jax.Array:
  """tf.image.adjust_saturation then adjust_hue, in one HSV round trip."""
  hue, saturation, value = jnp.moveaxis(rgb_to_hsv(image), -1, 0)
  return hsv_to_rgb(jnp.stack(
      [jnp.mod(hue + hue_delta, 1.0),
       jnp.clip(saturation * saturation_factor, 0.0, 1.0), value], axis=-1))


def apply_color_jitter(image: jax.Array, params: Params) -> jax.Array:
  """The jitter ops of `params` in `params["order"]`, clipped after each.

  TF clips only where an op can leave [0, 1]; clipping a value already in
  range changes nothing, so both give the same image up to rounding. Under
  `vmap` the op at each position is a per-view value, so each position
  computes every op and selects one; saturation and hue share one HSV
  round trip (the other's amount at its identity), which halves the work
  of the two costly ops.
  """
  names = [op for op in augment.JITTER_OPS if op in params]
  index = {op: i for i, op in enumerate(names)}
  for position in range(len(names)):
    op = params["order"][position]
    out = jnp.where(op == index["brightness"], image * params["brightness"],
                    _adjust_contrast(image, params["contrast"]))
    if "saturation" in params:
      colour = _adjust_hsv(
          image,
          jnp.where(op == index["saturation"], params["saturation"], 1.0),
          jnp.where(op == index["hue"], params["hue"], 0.0))
      out = jnp.where(op >= index["saturation"], colour, out)
    image = jnp.clip(out, 0.0, 1.0)
  return image


def to_grayscale(image: jax.Array) -> jax.Array:
  """RGB [..., 3] to luma, kept as 3 channels (tf.image's weights)."""
  luma = image @ jnp.asarray(augment.LUMA_WEIGHTS, image.dtype)
  return jnp.repeat(luma[..., None], 3, axis=-1)


def gaussian_blur(image: jax.Array, sigma: jax.Array, *,
                  radius: int) -> jax.Array:
  """Separable Gaussian blur of [H, W, C], borders reflected (as TF's)."""
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  kernel = jnp.exp(-jnp.square(taps) / (2.0 * jnp.square(sigma)))
  kernel = kernel / jnp.sum(kernel)

  def along(x, axis):
    size = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(x, pad, mode="reflect")
    # 2r + 1 shifted copies, weighted: elementwise work that XLA fuses into
    # one pass, with a per-view kernel under vmap.
    return sum(kernel[tap] * jax.lax.slice_in_dim(padded, tap, tap + size,
                                                  axis=axis)
               for tap in range(2 * radius + 1))

  return along(along(image, 0), 1)


def apply_post_crop(view: jax.Array, params: Params) -> jax.Array:
  """Colour jitter, grayscale, blur, solarize of one [S, S, C] view."""
  if "jitter" in params:
    view = jnp.where(params["jitter"], apply_color_jitter(view, params), view)
  if "grayscale" in params:
    view = jnp.where(params["grayscale"], to_grayscale(view), view)
  if "blur" in params:
    blurred = gaussian_blur(view, params["blur_sigma"],
                            radius=augment.blur_radius(view.shape[0]))
    view = jnp.where(params["blur"], jnp.clip(blurred, 0.0, 1.0), view)
  if "solarize" in params:
    solarized = jnp.where(view < augment.SOLARIZE_THRESHOLD, view, 1.0 - view)
    view = jnp.where(params["solarize"], solarized, view)
  return view


def _op_options(augment_config: ml_collections.ConfigDict) -> dict[str, Any]:
  return dict(color_jitter_prob=augment_config.color_jitter_prob,
              color_strength=augment_config.color_strength,
              grayscale_prob=augment_config.grayscale_prob,
              blur_prob=augment_config.blur_prob,
              solarize_prob=augment_config.solarize_prob)


def augment_views(images: jax.Array, view_keys: jax.Array, *,
                  color_jitter_prob: float, color_strength: float,
                  grayscale_prob: float, blur_prob: float,
                  solarize_prob: float) -> jax.Array:
  """The post-crop ops of every view, each with its own key.

  Args:
    images: float [B, V, S, S, C] in [0, 1], cropped and flipped.
    view_keys: uint32 [B, V, 2], threefry key data per view.
    color_jitter_prob: probability of colour jitter.
    color_strength: colour jitter strength s (0 disables it).
    grayscale_prob: probability of grayscale (ignored on 1 channel).
    blur_prob: probability of Gaussian blur.
    solarize_prob: probability of solarization.

  Returns:
    float32 [B, V, S, S, C] in [0, 1]. Each view depends only on its own
    pixels and key, so the result does not depend on how B is sharded.
  """
  if images.shape[:2] != view_keys.shape[:2] or view_keys.shape[2:] != (2,):
    raise ValueError(f"Expected view keys of shape {images.shape[:2] + (2,)}"
                     f" for images {images.shape}, got {view_keys.shape}.")
  batch, views = images.shape[:2]
  flat = images.reshape(batch * views, *images.shape[2:]).astype(jnp.float32)
  keys = jax.random.wrap_key_data(
      view_keys.reshape(batch * views, 2).astype(jnp.uint32), impl=_KEY_IMPL)
  options = dict(color_jitter_prob=color_jitter_prob,
                 color_strength=color_strength,
                 grayscale_prob=grayscale_prob, blur_prob=blur_prob,
                 solarize_prob=solarize_prob)

  def one_view(view, key):
    return apply_post_crop(view, post_crop_params(
        key, channels=view.shape[-1], **options))

  return jax.vmap(one_view)(flat, keys).reshape(images.shape)


def view_overrides(augment_config: ml_collections.ConfigDict
                   ) -> tuple[dict[str, Any], ...]:
  """`augment.per_view` as dicts, checked: one per view it changes.

  Each entry replaces some of `augment.POST_CROP_OPTIONS` for that view
  (the first views, in order; the rest use the shared options), on the
  host or here alike.
  """
  overrides = tuple(dict(entry) for entry in
                    augment_config.get("per_view", ()) or ())
  for index, entry in enumerate(overrides):
    unknown = sorted(set(entry) - set(augment.POST_CROP_OPTIONS))
    if unknown:
      raise ValueError(
          f"input.augment.per_view[{index}] sets {unknown}; a view can only "
          f"change {list(augment.POST_CROP_OPTIONS)}.")
  if enabled(augment_config) and (
      augment_config.get("randaugment_layers", 0)
      or any(entry.get("randaugment_layers", 0) for entry in overrides)):
    raise ValueError(
        "RandAugment (input.augment.randaugment_layers) runs in tf.data "
        "only, after the colour ops that on_device moves to the "
        "accelerator; set input.augment.on_device=False to use it.")
  return overrides


def enabled(augment_config: ml_collections.ConfigDict) -> bool:
  """Whether `augment_config` moves the post-crop ops to the accelerator."""
  return bool(augment_config.get("on_device", False))


def with_device_augment(step: Callable[..., Any],
                        augment_config: ml_collections.ConfigDict
                        ) -> Callable[..., Any]:
  """`step(state, batch)` preceded by `augment_views` if `on_device` is set.

  The wrapped step takes the pipeline's batch (with `VIEW_KEY`) and passes
  the step the finished views, without the keys.
  """
  if not enabled(augment_config):
    return step
  options = _op_options(augment_config)
  overrides = view_overrides(augment_config)

  def large_views(images, keys):
    if not overrides:
      return augment_views(images, keys, **options)
    # Views with their own options: one pass each (static probabilities).
    return jnp.concatenate([
        augment_views(images[:, v:v + 1], keys[:, v:v + 1],
                      **{**options, **(overrides[v] if v < len(overrides)
                                       else {})})
        for v in range(images.shape[1])], axis=1)

  def augmented_step(state, batch):
    if VIEW_KEY not in batch:
      raise ValueError(
          f"input.augment.on_device is set but the batch has no "
          f"{VIEW_KEY!r}: batches must come from "
          "input_pipeline.pretrain_dataset with the same augment config.")
    batch = dict(batch)
    batch["image"] = large_views(batch["image"], batch.pop(VIEW_KEY))
    if SMALL_VIEW_KEY in batch:
      batch[SMALL_IMAGE] = augment_views(
          batch[SMALL_IMAGE], batch.pop(SMALL_VIEW_KEY), **options)
    return step(state, batch)

  return augmented_step
