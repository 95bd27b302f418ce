"""The post-crop view ops on the accelerator against the tf.data ones.

Both paths must draw the same distribution of augmentation parameters and,
given the same parameters, make the same view.
"""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import stats
import tensorflow as tf

import fake_fashion_mnist
from contrastive import sharding
from contrastive.data import augment
from contrastive.data import device_augment
from contrastive.data import fashion_mnist
from contrastive.data import input_pipeline

_OPTIONS = dict(color_jitter_prob=0.8, color_strength=1.0,
                grayscale_prob=0.2, blur_prob=0.5, solarize_prob=0.3)
_SAMPLES = 8000


def _tf_params(num: int, channels: int, options: dict) -> dict:
  seeds = tf.reshape(tf.range(num * 8, dtype=tf.int64), [num, 4, 2])

  @tf.function
  def draw(all_seeds):
    def one(seeds):
      return augment.post_crop_params(tf.unstack(seeds), channels=channels,
                                      **options)
    signature = {key: tf.TensorSpec.from_tensor(value) for key, value in
                 one(all_seeds[0]).items()}
    return tf.map_fn(one, all_seeds, fn_output_signature=signature)

  return {key: value.numpy() for key, value in draw(seeds).items()}


def _jax_params(num: int, channels: int, options: dict) -> dict:
  keys = jax.random.split(jax.random.key(7, impl="threefry2x32"), num)
  draw = jax.vmap(lambda key: device_augment.post_crop_params(
      key, channels=channels, **options))
  return jax.tree.map(np.asarray, draw(keys))


def _assert_same_frequency(a: np.ndarray, b: np.ndarray, prob: float):
  """Both bool samples have frequency `prob`, to 5 standard errors."""
  tolerance = 5 * np.sqrt(prob * (1 - prob) / len(a))
  assert abs(a.mean() - prob) < tolerance
  assert abs(b.mean() - prob) < tolerance


@pytest.mark.parametrize("channels", [3, 1])
def test_both_paths_draw_the_same_parameter_distribution(channels):
  tf_params = _tf_params(_SAMPLES, channels, _OPTIONS)
  jax_params = _jax_params(_SAMPLES, channels, _OPTIONS)
  assert set(tf_params) == set(jax_params)
  expected_ops = augment.JITTER_OPS[:4 if channels == 3 else 2]
  assert ("grayscale" in tf_params) == (channels == 3)

  for flag, prob in [("jitter", 0.8), ("grayscale", 0.2), ("blur", 0.5),
                     ("solarize", 0.3)]:
    if flag in tf_params:
      _assert_same_frequency(tf_params[flag], jax_params[flag], prob)

  ranges = augment.jitter_ranges(1.0, channels)
  assert tuple(ranges) == expected_ops
  continuous = {**ranges, "blur_sigma": augment.BLUR_SIGMA_RANGE}
  for name, (low, high) in continuous.items():
    for sample in (tf_params[name], jax_params[name]):
      assert low <= sample.min() and sample.max() <= high
      # Against the uniform law of the range, and against each other.
      assert stats.kstest(sample, stats.uniform(low, high - low).cdf
                          ).pvalue > 1e-4, name
    assert stats.ks_2samp(tf_params[name], jax_params[name]).pvalue > 1e-4

  # The order: a uniformly random permutation of the ops.
  permutations = list(itertools.permutations(range(len(expected_ops))))
  for orders in (tf_params["order"], jax_params["order"]):
    counts = np.array([np.all(orders == np.array(p), axis=1).sum()
                       for p in permutations])
    assert counts.sum() == _SAMPLES
    assert stats.chisquare(counts).pvalue > 1e-4


def test_the_distribution_check_sees_a_wrong_range():
  # The KS tests above have the power to notice a jitter range 10% wide.
  wrong = _jax_params(_SAMPLES, 3, {**_OPTIONS, "color_strength": 1.1})
  right = _tf_params(_SAMPLES, 3, _OPTIONS)
  assert stats.ks_2samp(wrong["saturation"],
                        right["saturation"]).pvalue < 1e-4


@pytest.mark.parametrize("channels,size", [(3, 40), (1, 28)])
def test_same_parameters_make_the_same_view(channels, size):
  rng = np.random.default_rng(0)
  image = rng.uniform(size=(size, size, channels)).astype(np.float32)
  # Flat regions and saturated pixels exercise hue's and clipping's edges.
  image[:5, :5] = 0.5
  image[-5:, -5:] = 1.0
  options = dict(color_jitter_prob=0.7, color_strength=1.0,
                 grayscale_prob=0.3, blur_prob=0.6, solarize_prob=0.3)
  applied = set()
  for seed in range(24):
    seeds = tf.unstack(tf.reshape(tf.range(8, dtype=tf.int64) + 8 * seed,
                                  [4, 2]))
    params = augment.post_crop_params(seeds, channels=channels, **options)
    expected = augment.apply_post_crop(tf.constant(image), params).numpy()
    jax_params = {key: jnp.asarray(value.numpy())
                  for key, value in params.items()}
    actual = np.asarray(jax.jit(device_augment.apply_post_crop)(
        jnp.asarray(image), jax_params))
    np.testing.assert_allclose(actual, expected, atol=2e-5, rtol=0)
    applied |= {key for key in ("jitter", "grayscale", "blur", "solarize")
                if key in params and bool(params[key])}
  # Every op took part in some view.
  assert applied == ({"jitter", "grayscale", "blur", "solarize"}
                     if channels == 3 else {"jitter", "blur", "solarize"})


def test_hsv_round_trip_and_tf_agreement():
  rng = np.random.default_rng(1)
  rgb = rng.uniform(size=(500, 3)).astype(np.float32)
  rgb[:20] = rgb[:20, :1]  # Grays: no hue.
  hsv = np.asarray(device_augment.rgb_to_hsv(jnp.asarray(rgb)))
  np.testing.assert_allclose(hsv, tf.image.rgb_to_hsv(rgb).numpy(),
                             atol=1e-6)
  np.testing.assert_allclose(
      np.asarray(device_augment.hsv_to_rgb(jnp.asarray(hsv))), rgb,
      atol=1e-6)


def test_views_do_not_depend_on_the_sharding():
  rng = np.random.default_rng(2)
  images = rng.uniform(size=(16, 2, 24, 24, 3)).astype(np.float32)
  keys = rng.integers(0, 2**32, size=(16, 2, 2), dtype=np.uint32)
  fn = jax.jit(lambda x, k: device_augment.augment_views(x, k, **_OPTIONS))
  single = np.asarray(fn(images, keys))
  mesh = sharding.make_mesh()
  assert mesh.size == 8
  with jax.set_mesh(mesh):
    batch = sharding.batch_sharding(mesh)
    sharded = fn(jax.device_put(images, batch), jax.device_put(keys, batch))
  np.testing.assert_allclose(np.asarray(sharded), single, atol=1e-6)
  # Each view has its own randomness: the two views of an image differ.
  assert not np.allclose(single[:, 0], single[:, 1])
  assert single.min() >= 0.0 and single.max() <= 1.0


def test_bad_keys_are_refused():
  with pytest.raises(ValueError, match="view keys of shape"):
    device_augment.augment_views(jnp.zeros((4, 2, 8, 8, 3)),
                                 jnp.zeros((4, 2), jnp.uint32), **_OPTIONS)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  source = tmp_path_factory.mktemp("fashion_mnist_src")
  fake_fashion_mnist.write(source, 32, 8)
  folder = str(tmp_path_factory.mktemp("tfds"))
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv(fashion_mnist.ENV_VAR, str(source))
    input_pipeline.dataset_info("fashion_mnist_idx", folder)
  return folder


def _input_config(data_dir, on_device, **augment_options):
  return ml_collections.ConfigDict(dict(
      dataset="fashion_mnist_idx", data_dir=data_dir, train_split="train",
      batch_size=8, views=2, image_size=28, shuffle_buffer=32,
      augment=dict(crop_area_min=0.3, crop_area_max=1.0,
                   crop_aspect_min=3 / 4, crop_aspect_max=4 / 3, flip=True,
                   on_device=on_device, **{**_OPTIONS, **augment_options})))


def test_pipeline_defers_the_post_crop_ops(data_dir):
  deferred = input_pipeline.pretrain_dataset(
      _input_config(data_dir, True), seed=3)
  crop_flip_only = input_pipeline.pretrain_dataset(
      _input_config(data_dir, False, color_jitter_prob=0.0,
                    grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0),
      seed=3)
  first, again = [next(iter(dataset.take(1).as_numpy_iterator()))
                  for dataset in (deferred, deferred)]
  reference = next(iter(crop_flip_only.take(1).as_numpy_iterator()))
  # The host only crops and flips: the same pixels as without the ops.
  np.testing.assert_array_equal(first["image"], reference["image"])
  assert device_augment.VIEW_KEY not in reference
  view_keys = first[device_augment.VIEW_KEY]
  assert view_keys.shape == (8, 2, 2) and view_keys.dtype == np.uint32
  # A pure function of (seed, step), and distinct per view.
  np.testing.assert_array_equal(view_keys, again[device_augment.VIEW_KEY])
  assert len({tuple(k) for k in view_keys.reshape(-1, 2)}) == 16

  seen = {}

  def step(state, batch):
    seen.update(batch)
    return state, {}

  augment_config = _input_config(data_dir, True).augment
  state, _ = device_augment.with_device_augment(step, augment_config)(
      0, dict(first))
  assert device_augment.VIEW_KEY not in seen
  expected = device_augment.augment_views(
      first["image"], view_keys, **_OPTIONS)
  np.testing.assert_array_equal(seen["image"], expected)
  assert not np.allclose(seen["image"], first["image"])
  # Off, the step gets the batch untouched.
  plain = _input_config(data_dir, False).augment
  assert device_augment.with_device_augment(step, plain) is step


def test_views_can_have_their_own_post_crop_options(data_dir):
  # BYOL-style asymmetric views: view 0 always blurred, view 1 never, and
  # only view 1 jittered. Each view is the shared recipe with its own
  # options, on the host and on the device alike.
  per_view = ({"blur_prob": 1.0, "color_jitter_prob": 0.0},
              {"blur_prob": 0.0})

  def finished_views(config):
    """The first batch's views as the train step sees them."""
    batch = next(iter(input_pipeline.pretrain_dataset(
        config, seed=4).take(1).as_numpy_iterator()))
    seen = {}
    device_augment.with_device_augment(
        lambda state, b: (state, seen.update(b)), config.augment)(
            0, dict(batch))
    return np.asarray(seen["image"])

  for on_device in (False, True):
    config = _input_config(data_dir, on_device)
    config.augment.per_view = per_view
    views = finished_views(config)
    for v, options in enumerate(per_view):
      reference = finished_views(
          _input_config(data_dir, on_device, **options))
      np.testing.assert_allclose(views[:, v], reference[:, v], atol=1e-6)
  config = _input_config(data_dir, False)
  config.augment.per_view = ({"crop_area_min": 0.5},)
  with pytest.raises(ValueError, match=r"per_view\[0\] sets \['crop_area_min'"):
    input_pipeline.pretrain_dataset(config, seed=4)
  config.augment.per_view = ({}, {}, {})
  with pytest.raises(ValueError, match="3 entries for 2 views"):
    input_pipeline.pretrain_dataset(config, seed=4)
