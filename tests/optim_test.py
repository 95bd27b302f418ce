"""Learning-rate scaling, schedule shape and the decay/adaptation mask."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from contrastive import optim


def _optim_config(**overrides):
  config = common.base_config().optim
  config.update(overrides)
  return config


@pytest.mark.parametrize("scaling,expected", [
    ("linear", 0.3 * 4096 / 256), ("sqrt", 0.3 * 64), ("none", 0.3)])
def test_peak_learning_rate(scaling, expected):
  config = _optim_config(lr=0.3, lr_scaling=scaling)
  assert optim.peak_learning_rate(config, 4096) == pytest.approx(expected)


def test_warmup_then_cosine():
  schedule = optim.learning_rate_schedule(
      _optim_config(lr=0.3, lr_scaling="linear"), 256, total_steps=100,
      warmup_steps=10)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(0.15)
  assert float(schedule(10)) == pytest.approx(0.3)
  assert float(schedule(55)) == pytest.approx(0.15, rel=1e-3)
  assert float(schedule(100)) == pytest.approx(0.0, abs=1e-7)


def test_bad_scaling_and_optimizer_names():
  with pytest.raises(ValueError, match="lr_scaling"):
    optim.peak_learning_rate(_optim_config(lr_scaling="cube"), 256)
  with pytest.raises(ValueError, match="sgd"):
    optim.create(_optim_config(name="adam_typo"), lambda _: 0.1)


def test_lars_leaves_bn_and_bias_unadapted_and_undecayed():
  params = {"kernel": jnp.full((4, 4), 2.0), "bias": jnp.full((4,), 2.0)}
  grads = {"kernel": jnp.full((4, 4), 0.5), "bias": jnp.full((4,), 0.5)}
  config = _optim_config(name="lars", weight_decay=0.1, momentum=0.0,
                         trust_coefficient=1e-3)
  tx = optim.create(config, lambda _: 1.0)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Bias: plain SGD step, -lr * g.
  np.testing.assert_allclose(updates["bias"], -0.5)
  # Kernel: g + wd * p, scaled by the trust ratio eta * |p| / |g + wd p|.
  g = 0.5 + 0.1 * 2.0
  trust = 1e-3 * np.linalg.norm(np.full((4, 4), 2.0)) / np.linalg.norm(
      np.full((4, 4), g))
  np.testing.assert_allclose(updates["kernel"], -trust * g, rtol=1e-5)
