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


@pytest.mark.parametrize("depth,millions", [(18, 11.18), (50, 23.51)])
def test_resnet_parameter_counts_match_torchvision(depth, millions):
  # torchvision resnet18/resnet50 without the 1000-way fc layer.
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


def test_unknown_model_and_dtype_fail_clearly():
  config = common.base_config().model
  config.name = "vit"
  with pytest.raises(ValueError, match="resnet"):
    models.create(config)
  config.name, config.dtype = "resnet", "float16"
  with pytest.raises(ValueError, match="dtype"):
    models.create(config)
