"""ExCon: Grad-CAM against the CAM identity, the masked views, the step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke_fashion_mnist
from contrastive import losses
from contrastive import models
from contrastive import optim
from contrastive import saliency
from contrastive import sharding
from contrastive import state as state_lib
from contrastive import train
from contrastive.evaluation import online
from contrastive.losses import excon

IMAGE_SHAPE = (12, 12, 1)


def _model_and_variables(seed=0):
  config = smoke_fashion_mnist.get_config("excon")
  config.model.update(width=0.125)
  config.model.head.update(hidden_dims=(16,), out_dim=8)
  model = models.create(config.model)
  variables = model.init(jax.random.key(seed),
                         jnp.zeros((2, *IMAGE_SHAPE)), train=False)
  return config, model, {"params": variables["params"],
                         "batch_stats": variables["batch_stats"]}


def _classifier(rng, dim, classes=3):
  return {"kernel": jnp.asarray(rng.normal(size=(dim, classes)), jnp.float32),
          "bias": jnp.zeros((classes,)),
          "feature_mean": jnp.asarray(rng.normal(size=dim), jnp.float32),
          "feature_var": jnp.asarray(rng.uniform(0.5, 2, size=dim),
                                     jnp.float32)}


def test_gradcam_of_the_last_stage_is_the_class_activation_map():
  """Before pooling and a linear classifier, Grad-CAM equals CAM (Zhou et
  al. 2016): alpha_c = W_cy * r_c / (h * w), with r the probe's scaling."""
  rng = np.random.default_rng(0)
  _, model, variables = _model_and_variables()
  images = jnp.asarray(rng.uniform(size=(4, *IMAGE_SHAPE)), jnp.float32)
  labels = jnp.asarray([0, 1, 2, 1])
  features, state = model.apply(variables, images, method=model.features,
                                mutable=["intermediates"])
  last = max(state["intermediates"]["encoder"])
  activation = np.asarray(state["intermediates"]["encoder"][last][0],
                          np.float64)
  classifier = _classifier(rng, features.shape[-1])
  scale = 1.0 / np.sqrt(np.asarray(classifier["feature_var"], np.float64)
                        + online.STATS_EPSILON)
  h, w = activation.shape[1:3]
  kernel = np.asarray(classifier["kernel"], np.float64)
  expected = []
  for b, y in enumerate(np.asarray(labels)):
    alpha = kernel[:, y] * scale / (h * w)
    cam = np.asarray(jax.image.resize(
        jnp.asarray(np.einsum("hwc,c->hw", activation[b], alpha)),
        IMAGE_SHAPE[:2], "bilinear"), np.float64)
    expected.append((cam - cam.min()) / (cam.max() - cam.min()))
  got = saliency.gradcam(model, variables, classifier, images, labels,
                         stage=int(last[len("stage"):]))
  np.testing.assert_allclose(got, np.stack(expected), atol=1e-4)
  with pytest.raises(ValueError, match="stages 0..3"):
    saliency.gradcam(model, variables, classifier, images, labels, stage=7)


def test_masked_view_replaces_view_zero_only_where_it_is_classified_right():
  rng = np.random.default_rng(1)
  _, model, variables = _model_and_variables()
  images = jnp.asarray(rng.uniform(0.1, 1, size=(6, 2, *IMAGE_SHAPE)),
                       jnp.float32)
  labels = jnp.asarray([0, 1, 0, 2, 0, 1])
  # A classifier that always answers class 0: only class-0 images qualify.
  dim = model.apply(variables, images[:, 0], method=model.features).shape[-1]
  classifier = _classifier(rng, dim)
  classifier["kernel"] = classifier["kernel"] * 1e-3
  classifier["bias"] = jnp.asarray([10.0, 0.0, 0.0])
  out, fraction = excon.explanation_views(
      model, variables, classifier, images, labels, saliency_threshold=0.5,
      gradcam_stage=1)
  out, images = np.asarray(out), np.asarray(images)
  np.testing.assert_array_equal(out[:, 1], images[:, 1])
  cam = np.asarray(saliency.gradcam(model, variables, classifier,
                                    jnp.asarray(images[:, 0]), labels,
                                    stage=1))
  for b, label in enumerate(np.asarray(labels)):
    if label == 0:
      low = cam[b] <= 0.5
      assert low.any() and (~low).any()
      np.testing.assert_array_equal(out[b, 0][low], 0.0)
      np.testing.assert_array_equal(out[b, 0][~low], images[b, 0][~low])
    else:
      np.testing.assert_array_equal(out[b, 0], images[b, 0])
  assert float(fraction) == pytest.approx(0.5)


def test_excon_step_needs_the_probe_and_trains():
  config, model, _ = _model_and_variables()
  mesh = sharding.make_mesh()
  # No warm-up: the first step has a learning rate above 0.
  schedule = optim.learning_rate_schedule(config.optim, 16, 10, 0)
  tx = optim.create(config.optim, schedule)
  probe_tx = online.probe_optimizer(0.1, 10)
  state = state_lib.create_train_state(model, tx, jax.random.key(0),
                                       IMAGE_SHAPE, mesh, probe_tx=probe_tx,
                                       num_classes=4)
  rng = np.random.default_rng(2)
  batch = {"image": rng.uniform(size=(16, 2, *IMAGE_SHAPE)).astype(
               np.float32),
           "label": (np.arange(16) % 4).astype(np.int32)}
  step = functools.partial(
      train.train_step, model=model, tx=tx,
      loss_fn=losses.get_with_metrics("excon"), loss_config=config.loss,
      schedule=schedule)
  with jax.set_mesh(mesh):
    batch = sharding.make_global_batch(mesh, batch)
    with pytest.raises(ValueError, match="online_eval.probe"):
      jax.eval_shape(step, state, batch)
    new_state, metrics = jax.jit(functools.partial(step, probe_tx=probe_tx))(
        state, batch)
  assert np.isfinite(metrics["loss"])
  assert 0.0 <= float(metrics["masked_view_fraction"]) <= 1.0
  assert any(not np.allclose(a, b) for a, b in zip(
      jax.tree.leaves(state.params), jax.tree.leaves(new_state.params)))
