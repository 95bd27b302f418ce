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
from losses_test import _embeddings
from losses_test import _finite_difference_grad

IMAGE_SHAPE = (12, 12, 1)


def _model_and_variables(seed=0):
  config = smoke_fashion_mnist.get_config("excon")
  config.model.update(depth=10, width=0.125)
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


@pytest.mark.slow
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
  out, fraction = excon.masked_views(images, excon.explain(
      model, variables, classifier, images, labels, saliency_threshold=0.5,
      gradcam_stage=1))
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


def _first_step(config, model, mesh, seed):
  """(state, a batch of 16 images of 4 classes, the un-jitted step
  without the probe's optimizer, that optimizer)."""
  # No warm-up: the first step has a learning rate above 0.
  schedule = optim.learning_rate_schedule(config.optim, 16, 10, 0)
  tx = optim.create(config.optim, schedule)
  probe_tx = online.probe_optimizer(0.1, 10)
  state = state_lib.create_train_state(model, tx, jax.random.key(0),
                                       IMAGE_SHAPE, mesh, probe_tx=probe_tx,
                                       num_classes=4)
  rng = np.random.default_rng(seed)
  batch = {"image": rng.uniform(size=(16, 2, *IMAGE_SHAPE)).astype(
               np.float32),
           "label": (np.arange(16) % 4).astype(np.int32)}
  step = functools.partial(
      train.train_step, model=model, tx=tx,
      loss_fn=losses.get_with_metrics("excon"), loss_config=config.loss,
      schedule=schedule)
  return state, batch, step, probe_tx


@pytest.mark.slow
def test_excon_step_needs_the_probe_and_trains():
  config, model, _ = _model_and_variables()
  mesh = sharding.make_mesh()
  state, batch, step, probe_tx = _first_step(config, model, mesh, seed=2)
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


def _official_excon_loss(z, labels, background, failed, temperature, *,
                         background_anchor, contrast_mode):
  """`SupConLoss.forward` of the official ExCon code (`losses.py`) with
  `negative_pair=1`, float64: each failed masked image is appended to both
  views under label n_cls; without `background_anchor` their mask rows
  and columns are zeroed and the mean is rescaled to the real anchors."""
  z = np.asarray(z, np.float64)
  background = np.asarray(background, np.float64)[:, 0]
  actual_bsz, views, _ = z.shape
  labels = np.asarray(labels)
  n_cls = labels.max() + 1
  failed = np.asarray(failed, bool)
  appended = np.repeat(background[failed][:, None], views, axis=1)
  features = np.concatenate([z, appended])
  y = np.concatenate([labels, np.full(failed.sum(), n_cls)])
  bsz = len(y)
  mask = (y[:, None] == y[None, :]).astype(np.float64)
  if not background_anchor:
    mask[actual_bsz:] = 0
    mask[:, actual_bsz:] = 0
  contrast = np.concatenate([features[:, v] for v in range(views)])
  if contrast_mode == "one":
    anchor, anchor_count = features[:, 0], 1
  else:
    anchor, anchor_count = contrast, views
  logits = anchor @ contrast.T / temperature
  mask = np.tile(mask, (anchor_count, views))
  logits_mask = np.ones_like(mask)
  logits_mask[np.arange(bsz * anchor_count), np.arange(bsz * anchor_count)] = 0
  mask = mask * logits_mask
  log_prob = logits - np.log((np.exp(logits) * logits_mask).sum(1,
                                                                keepdims=True))
  denominator = mask.sum(1)
  if not background_anchor:
    denominator[denominator == 0] = 1
  loss = -(mask * log_prob).sum(1) / denominator
  if background_anchor:
    return loss.mean()
  return loss.mean() * bsz / actual_bsz


def _excon_loss(z, background, labels, failed, **kwargs):
  return losses.get("excon")(z, labels, negative_pair=True,
                             background=background,
                             background_valid=failed, **kwargs)


@pytest.mark.parametrize("background_anchor", [True, False])
@pytest.mark.parametrize("contrast_mode", ["all", "one"])
def test_background_negatives_match_the_official_loss(background_anchor,
                                                      contrast_mode):
  rng = np.random.default_rng(3)
  z = _embeddings(rng, 6, 2, 5)
  background = _embeddings(rng, 6, 1, 5)
  labels = rng.integers(0, 3, size=6).astype(np.int32)
  failed = np.array([True, False, True, True, False, False])
  options = dict(temperature=0.3, contrast_mode=contrast_mode)
  reference = functools.partial(
      _official_excon_loss, temperature=0.3, contrast_mode=contrast_mode,
      background_anchor=background_anchor)
  fn = lambda z, b: _excon_loss(z, b, labels, failed,
                                background_anchor=background_anchor,
                                **options)
  np.testing.assert_allclose(fn(z, background),
                             reference(z, labels, background, failed),
                             rtol=1e-5)
  grad_z, grad_b = jax.grad(fn, argnums=(0, 1))(z, background)
  np.testing.assert_allclose(grad_z, _finite_difference_grad(
      lambda x: reference(x, labels, background, failed), z), rtol=1e-3,
                             atol=1e-5)
  np.testing.assert_allclose(grad_b, _finite_difference_grad(
      lambda x: reference(z, labels, x, failed), background), rtol=1e-3,
                             atol=1e-5)
  # The images classified right add nothing.
  np.testing.assert_array_equal(grad_b[~failed], 0.0)
  # No failure at all: plain ExCon (SupCon).
  np.testing.assert_allclose(
      _excon_loss(z, background, labels, np.zeros(6, bool), **options),
      losses.get("supcon")(z, labels, **options), rtol=1e-6)


def test_background_negatives_on_eight_devices_equal_one():
  rng = np.random.default_rng(4)
  z, background = _embeddings(rng, 32, 2, 8), _embeddings(rng, 32, 1, 8)
  labels = rng.integers(0, 5, size=32).astype(np.int32)
  failed = rng.uniform(size=32) < 0.4
  value_and_grad = lambda impl: jax.jit(jax.value_and_grad(
      lambda z, b, y, f: losses.get_with_metrics("excon")(
          z, y, temperature=0.1, negative_pair=True, background=b,
          background_valid=f, loss_impl=impl, block_size=8),
      argnums=(0, 1), has_aux=True))
  (expected, expected_metrics), expected_grads = value_and_grad("gather")(
      z, background, labels, failed)
  np.testing.assert_allclose(
      expected, _official_excon_loss(z, labels, background, failed, 0.1,
                                     background_anchor=True,
                                     contrast_mode="all"), rtol=1e-5)
  np.testing.assert_allclose(expected_metrics["background_fraction"],
                             failed.mean())
  mesh = sharding.make_mesh()
  with jax.set_mesh(mesh):
    put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
    for impl in ("gather", "blockwise", "ring"):
      (value, metrics), grads = value_and_grad(impl)(
          put(z), put(background), put(labels), put(failed))
      np.testing.assert_allclose(value, expected, rtol=1e-5)
      for key, want in expected_metrics.items():
        np.testing.assert_allclose(metrics[key], want, rtol=1e-5, atol=1e-6)
      for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_background_negatives_need_the_masked_embeddings():
  rng = np.random.default_rng(5)
  z = _embeddings(rng, 4, 2, 5)
  labels = np.array([0, 1, 0, 1], np.int32)
  with pytest.raises(ValueError, match="background_valid"):
    losses.get("excon")(z, labels, temperature=0.1, negative_pair=True)
  with pytest.raises(ValueError, match="background must have shape"):
    _excon_loss(z, _embeddings(rng, 4, 2, 5), labels, np.ones(4, bool),
                temperature=0.1)


@pytest.mark.slow
def test_excon_step_with_background_negatives_embeds_the_failed_masks():
  """The step's loss is ExCon of the model's embeddings of the masked views
  and, in a pass of their own, of the masked images it got wrong."""
  config, model, _ = _model_and_variables()
  config.loss.kwargs = {"negative_pair": True}
  mesh = sharding.make_mesh()
  state, batch, step, probe_tx = _first_step(config, model, mesh, seed=6)
  with jax.set_mesh(mesh):
    _, metrics = jax.jit(functools.partial(step, probe_tx=probe_tx))(
        state, sharding.make_global_batch(mesh, batch))
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  images, labels = jnp.asarray(batch["image"]), jnp.asarray(batch["label"])
  explanation = excon.explain(model, variables, state.probe_params, images,
                              labels)
  views, _ = excon.masked_views(images, explanation)
  embed = lambda x: model.apply(variables, x, train=True,
                                mutable=["batch_stats"])[0]["embedding"]
  z = embed(views.reshape(32, *IMAGE_SHAPE)).reshape(16, 2, -1)
  background = embed(explanation.masked)[:, None]
  failed = ~explanation.correct
  assert 0 < int(failed.sum()) < 16
  expected = _excon_loss(z, background, labels, failed,
                         temperature=config.loss.temperature)
  np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-4)
  np.testing.assert_allclose(metrics["background_fraction"],
                             float(failed.mean()))
  assert not np.isclose(
      float(expected), float(losses.get("excon")(
          z, labels, temperature=config.loss.temperature)), rtol=1e-3)
  # Before `explain_from_step`: neither masks nor backgrounds.
  config.loss.kwargs = {"negative_pair": True, "explain_from_step": 1}
  with jax.set_mesh(mesh):
    _, metrics = jax.jit(functools.partial(step, probe_tx=probe_tx))(
        state, sharding.make_global_batch(mesh, batch))
  assert float(metrics["masked_view_fraction"]) == 0.0
  assert float(metrics["background_fraction"]) == 0.0
