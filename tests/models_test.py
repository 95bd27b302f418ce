"""ResNet shapes and sizes, head options, normalised embeddings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from contrastive import models
from contrastive.models import resnet


def _param_count(module, shape):
  variables = jax.eval_shape(
      lambda: module.init(jax.random.key(0), jnp.zeros(shape), train=False))
  return sum(np.prod(x.shape) for x in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("depth,millions", [(10, 4.91), (18, 11.18),
                                            (50, 23.51)])
def test_resnet_parameter_counts_match_torchvision(depth, millions):
  # torchvision resnet18/resnet50 without the 1000-way fc layer; ResNet-10
  # is torchvision's ResNet(BasicBlock, [1, 1, 1, 1]): 4,905,792 weights.
  count = _param_count(resnet.ResNet(depth=depth), (1, 224, 224, 3))
  assert count / 1e6 == pytest.approx(millions, abs=0.01)


def test_feature_width_and_cifar_stem():
  module = resnet.ResNet(depth=18, width=0.25, cifar_stem=True)
  x = jnp.ones((2, 28, 28, 1))
  variables = module.init(jax.random.key(0), x, train=False)
  assert module.apply(variables, x, train=False).shape == (2, 128)
  with pytest.raises(ValueError, match="depth"):
    resnet.ResNet(depth=19).init(jax.random.key(0), x, train=False)


def test_model_outputs_unit_norm_embeddings_and_features():
  config = common.base_config().model
  config.update(depth=18, width=0.125, cifar_stem=True)
  config.head.update(hidden_dims=(64, 64), out_dim=32)
  model = models.create(config)
  x = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  out, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert out["embedding"].shape == (4, 32)
  np.testing.assert_allclose(jnp.linalg.norm(out["embedding"], axis=-1), 1.0,
                             rtol=1e-5)
  features = model.apply(variables, x, method=model.features)
  assert features.shape == (4, 64)


def test_bregman_subnetworks_are_standardised_and_spread_the_argmax():
  """Raw, one or two of the K sub-networks won the argmax for every image
  (their offsets dwarf their spread), which left the Bregman softmax with
  identical columns and then let phi grow without bound; standardised, each
  piece is zero-mean and unit-variance over the batch and many pieces win."""
  config = common.base_config().model
  config.update(depth=18, width=0.125, cifar_stem=True)
  config.head.update(hidden_dims=(64,), out_dim=32)
  config.bregman.update(subnetworks=16, hidden_dim=32)
  model = models.create(config)
  x = jax.random.uniform(jax.random.key(1), (256, 16, 16, 1))
  variables = model.init(jax.random.key(0), x[:2], train=False)
  out, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
  phi = np.asarray(out["bregman_phi"], np.float64)
  assert phi.shape == (256, 16)
  np.testing.assert_allclose(phi.mean(axis=0), 0.0, atol=1e-4)
  np.testing.assert_allclose(phi.std(axis=0), 1.0, rtol=1e-3)
  assert len(np.unique(phi.argmax(axis=-1))) >= 12


def test_unknown_model_and_dtype_fail_clearly():
  config = common.base_config().model
  config.name = "vit"
  with pytest.raises(ValueError, match="resnet"):
    models.create(config)
  config.name, config.dtype = "resnet", "float16"
  with pytest.raises(ValueError, match="dtype"):
    models.create(config)


def test_lab_matches_published_values_of_the_srgb_primaries():
  from contrastive.models import multiview  # pylint: disable=g-import-not-at-top
  rgb = jnp.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0],
                   [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.5]])
  # CIE Lab (D65) of the sRGB primaries, e.g. Lindbloom's calculator;
  # mid-grey 0.5 is L = 53.39 (linear 0.2140, Y^(1/3) relation).
  expected = np.array([[100.0, 0.0, 0.0], [0.0, 0.0, 0.0],
                       [53.24, 80.09, 67.20], [87.73, -86.18, 83.18],
                       [32.30, 79.19, -107.86], [53.39, 0.0, 0.0]])
  np.testing.assert_allclose(multiview.rgb_to_lab(rgb), expected, atol=0.02)


def test_intensity_gradients_are_sobel_derivatives():
  from contrastive.models import multiview  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  image = rng.uniform(size=(2, 6, 7, 1)).astype(np.float32)
  values, gradients = multiview.intensity_gradient_views(jnp.asarray(image))
  np.testing.assert_array_equal(values, image)
  padded = np.pad(image[..., 0].astype(np.float64), ((0, 0), (1, 1), (1, 1)),
                  mode="edge")
  expected = np.zeros((2, 6, 7, 2))
  for y in range(6):
    for x in range(7):
      window = padded[:, y:y + 3, x:x + 3]
      expected[:, y, x, 0] = ((window[:, :, 2] - window[:, :, 0])
                              @ np.array([1, 2, 1])) / 4
      expected[:, y, x, 1] = ((window[:, 2, :] - window[:, 0, :])
                              @ np.array([1, 2, 1])) / 4
  np.testing.assert_allclose(gradients, expected, atol=1e-6)
  with pytest.raises(ValueError, match="1-channel"):
    multiview.intensity_gradient_views(jnp.zeros((1, 4, 4, 3)))
  with pytest.raises(ValueError, match="RGB"):
    multiview.lab_views(jnp.zeros((1, 4, 4, 1)))


@pytest.mark.parametrize("modalities,channels", [("lab", 3),
                                                 ("intensity_gradients", 1)])
def test_multiview_model_embeds_each_modality_with_its_own_encoder(
    modalities, channels):
  config = common.base_config().model
  config.update(name="multiview_resnet", modalities=modalities, depth=18,
                width=0.125, cifar_stem=True)
  config.head.update(hidden_dims=(32,), out_dim=16)
  model = models.create(config)
  x = jax.random.uniform(jax.random.key(1), (4, 12, 12, channels))
  variables = model.init(jax.random.key(0), x, train=False)
  assert set(variables["params"]) == {"encoders_0", "encoders_1", "heads_0",
                                      "heads_1"}
  out, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert out["embedding"].shape == (4, 2, 16)
  np.testing.assert_allclose(jnp.linalg.norm(out["embedding"], axis=-1), 1.0,
                             rtol=1e-5)
  assert out["features"].shape == (4, 128)
  features = model.apply(variables, x, method=model.features)
  assert features.shape == (4, 128)
  # Each half of the features is its own encoder's: changing the second
  # encoder's weights moves only the second half.
  params = jax.tree.map(lambda p: p, variables["params"])
  params["encoders_1"] = jax.tree.map(lambda p: p * 1.5,
                                      params["encoders_1"])
  moved = model.apply({**variables, "params": params}, x,
                      method=model.features)
  np.testing.assert_array_equal(moved[:, :64], features[:, :64])
  assert not np.allclose(moved[:, 64:], features[:, 64:])
  config.linear_classes = 10
  with pytest.raises(ValueError, match="linear_classes"):
    models.create(config)
