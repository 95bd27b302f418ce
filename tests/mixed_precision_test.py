"""Mixed precision (`config.model.dtype = "bfloat16"`).

bf16 activations in the encoder and head, float32 parameters and BN
statistics, and float32 in everything that reaches a loss or the online
probe; the loss stays close to the float32 model's, and full train steps
keep float32 parameters.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke_fashion_mnist
from contrastive import losses
from contrastive import models
from contrastive import optim
from contrastive import sharding
from contrastive import state as state_lib
from contrastive import supervised
from contrastive import train
from contrastive.evaluation import online

IMAGE_SHAPE = (12, 12, 1)
NUM_CLASSES = 4


def _config(method="supcon", dtype="bfloat16"):
  config = smoke_fashion_mnist.get_config(method)
  config.model.update(depth=10, width=0.125, dtype=dtype,
                      num_prototypes=NUM_CLASSES)
  config.model.head.update(hidden_dims=(32,), out_dim=16)
  config.model.bregman.update(subnetworks=3, hidden_dim=8)
  return config


def _batch(seed, batch=16, views=2):
  rng = np.random.default_rng(seed)
  return {
      "image": rng.uniform(size=(batch, views, *IMAGE_SHAPE)).astype(
          np.float32),
      "label": rng.integers(0, NUM_CLASSES, size=batch).astype(np.int32),
      "bias_label": rng.integers(0, 2, size=batch).astype(np.int32),
  }


def _dtypes(tree):
  return {str(x.dtype) for x in jax.tree.leaves(tree)}


def test_float32_parameters_and_bf16_activations():
  # ResNet-18, whose layers the count below is of: nothing is compiled here.
  config = _config()
  config.model.depth = 18
  model = models.create(config.model)
  x = jnp.asarray(_batch(0)["image"][:, 0])
  # Shapes and dtypes only (`eval_shape`): nothing to compile.
  variables = jax.eval_shape(functools.partial(model.init, train=False),
                             jax.random.key(0), x)
  assert _dtypes(variables) == {"float32"}

  # Every Conv, Dense and BatchNorm output of the encoder and the head.
  def is_layer(module, _):
    return isinstance(module, (nn.Conv, nn.Dense, nn.DenseGeneral,
                               nn.BatchNorm))
  outputs, state = jax.eval_shape(functools.partial(
      model.apply, train=True, mutable=["batch_stats", "intermediates"],
      capture_intermediates=is_layer), variables, x)
  layers = {jax.tree_util.keystr(path): str(value.dtype) for path, value in
            jax.tree.leaves_with_path(state["intermediates"])}
  encoder_and_head = {k: v for k, v in layers.items()
                      if "'encoder'" in k or "'head'" in k}
  assert len(encoder_and_head) > 40
  # The head's Dense-BN-ReLU-Dense-BN.
  assert sum("'head'" in k for k in encoder_and_head) == 4
  assert set(encoder_and_head.values()) == {"bfloat16"}, encoder_and_head
  # The Bregman sub-networks compute in float32 (their phi are logits).
  bregman = {k: v for k, v in layers.items() if "'bregman'" in k}
  assert bregman and set(bregman.values()) == {"float32"}
  # BN running statistics are float32 (Flax reduces batch statistics in
  # float32 whatever the compute dtype).
  assert _dtypes(state["batch_stats"]) == {"float32"}
  # The model's outputs (embeddings, features, prototype cosines, Bregman
  # phi) are float32; so are the features that evaluation reads.
  assert set(outputs) == {"features", "embedding", "prototype_cosines",
                          "bregman_phi"}
  assert _dtypes(outputs) == {"float32"}
  features = jax.eval_shape(functools.partial(
      model.apply, method=model.features), variables, x)
  assert features.dtype == jnp.float32


@pytest.mark.parametrize("loss_name,grad_cache_chunks", [
    ("fairkl", 0), ("esupcon", 0), ("bregman", 0), ("supcon", 2)])
def test_loss_and_probe_inputs_are_float32(loss_name, grad_cache_chunks,
                                           monkeypatch):
  """Traces a bf16 train step with a spy loss and probe (no compilation)."""
  config = _config()
  config.loss.name = loss_name
  config.loss.kwargs = {}
  model = models.create(config.model)
  tx = optim.create(config.optim, lambda _: 0.1)
  probe_tx = online.probe_optimizer(0.1, 10)
  mesh = sharding.make_mesh()
  state = state_lib.abstract_train_state(
      model, tx, IMAGE_SHAPE, mesh, probe_tx=probe_tx,
      num_classes=NUM_CLASSES)
  seen = {}

  def spy_loss(z, labels, *, temperature, loss_impl, block_size, **extra):
    del labels, temperature, loss_impl, block_size
    seen.update(embedding=z.dtype,
                **{k: v.dtype for k, v in extra.items()})
    loss = sum(jnp.mean(v.astype(jnp.float32)) for v in [z, *extra.values()]
               if jnp.issubdtype(v.dtype, jnp.floating))
    return loss, {}

  probe_step = online.probe_step

  def spy_probe_step(probe_params, probe_opt_state, features, labels, tx):
    seen["probe_features"] = features.dtype
    return probe_step(probe_params, probe_opt_state, features, labels, tx)

  monkeypatch.setattr(online, "probe_step", spy_probe_step)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                       _batch(0))
  step = functools.partial(
      train.train_step, model=model, tx=tx, loss_fn=spy_loss,
      loss_config=config.loss, schedule=lambda _: 0.1,
      grad_cache_chunks=grad_cache_chunks, probe_tx=probe_tx)
  with jax.set_mesh(mesh):
    new_state, metrics = jax.eval_shape(step, state, batch)
  expected = {"embedding", "probe_features",
              *[k for k in losses.extra_inputs(loss_name)
                if k != "bias_labels"]}
  assert expected <= set(seen), seen
  assert all(seen[k] == jnp.float32 for k in expected), seen
  assert _dtypes(new_state.params) == {"float32"}
  assert _dtypes(new_state.opt_state) <= {"float32", "int32"}
  assert metrics["loss"].dtype == jnp.float32


def test_supervised_logits_are_float32(monkeypatch):
  """The CE trainer's bf16 step: float32 features, logits and parameters."""
  config = _config()
  model = models.create(config.model)
  tx = optim.create(config.optim, lambda _: 0.1)
  mesh = sharding.make_mesh()
  state = supervised.abstract_train_state(model, tx, IMAGE_SHAPE,
                                          NUM_CLASSES, mesh)
  seen = {}
  classifier_logits = supervised.classifier_logits

  def spy_logits(classifier, features):
    logits = classifier_logits(classifier, features)
    seen.update(features=features.dtype, logits=logits.dtype)
    return logits

  monkeypatch.setattr(supervised, "classifier_logits", spy_logits)
  batch = {k: jax.ShapeDtypeStruct(v[:, :1].shape if k == "image"
                                   else v.shape, v.dtype)
           for k, v in _batch(0).items()}
  with jax.set_mesh(mesh):
    new_state, metrics = jax.eval_shape(functools.partial(
        supervised.train_step, model=model, tx=tx,
        schedule=lambda _: 0.1), state, batch)
  assert seen == {"features": jnp.float32, "logits": jnp.float32}
  assert _dtypes(new_state.params) == {"float32"}
  assert metrics["loss"].dtype == jnp.float32


@pytest.fixture(scope="module")
def bf16_setup():
  """A bf16 model's training state on 8 devices, with the online probe.

  Shared by the tests below: initialising ResNet-18 under `jit` costs ~13 s
  of CPU time, more than anything they run.
  """
  config = _config("supcon")
  # The low-temperature edge: bf16 losses and gradients stay finite at 0.05.
  config.loss.temperature = 0.05
  model = models.create(config.model)
  schedule = optim.learning_rate_schedule(config.optim, 16, 10, 0)
  tx = optim.create(config.optim, schedule)
  probe_tx = online.probe_optimizer(0.1, 10)
  mesh = sharding.make_mesh()
  state = state_lib.create_train_state(
      model, tx, jax.random.key(0), IMAGE_SHAPE, mesh, probe_tx=probe_tx,
      num_classes=NUM_CLASSES)
  return config, model, schedule, tx, probe_tx, mesh, state


def test_bf16_losses_are_finite_and_close_to_float32(bf16_setup):
  config, model16, *_, state = bf16_setup
  batch, views, tau = 32, 2, config.loss.temperature
  data = _batch(1, batch, views)
  images = jnp.asarray(data["image"]).reshape(batch * views, *IMAGE_SHAPE)
  labels = jnp.asarray(data["label"])
  model32 = models.create(_config(dtype="float32").model)
  # Parameters do not depend on the compute dtype: the same float32
  # parameters drive both models (BN in training mode, batch statistics).
  variables = jax.device_get({"params": state.params,
                              "batch_stats": state.batch_stats})

  @jax.jit
  def bf16_and_float32_losses(variables):
    result = {}
    for dtype, model in (("bfloat16", model16), ("float32", model32)):
      outputs, _ = model.apply(variables, images, train=True,
                               mutable=["batch_stats"])
      z = outputs["embedding"].reshape(batch, views, -1)
      result[dtype] = {
          "simclr": losses.get("simclr")(z, temperature=tau),
          "supcon": losses.get("supcon")(z, labels, temperature=tau)}
    return result

  result = bf16_and_float32_losses(variables)
  for name in ("simclr", "supcon"):
    loss16, loss32 = result["bfloat16"][name], result["float32"][name]
    assert loss16.dtype == jnp.float32
    assert np.isfinite(loss16) and np.isfinite(loss32)
    # bf16 keeps 8 significant bits (~2.4 decimal digits): one rounding is
    # off by up to 2^-8 = 0.4%. Through the network the embeddings differ
    # by ~1e-2 from float32, 1/tau = 20 makes that logit errors of a few
    # tenths, and those mostly cancel in the mean over anchors and columns.
    # 1% (2.5 bf16 roundings of the loss itself) leaves a 4x margin over
    # the measured differences: here 0.05% / 0.03% (SimCLR / SupCon), at
    # most 0.23% over 3 initialisations x 4 batches.
    np.testing.assert_allclose(loss16, loss32, rtol=1e-2, err_msg=name)


@pytest.mark.parametrize("grad_cache_chunks", [
    0, pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.slow
def test_bf16_train_steps_keep_float32_parameters(bf16_setup,
                                                  grad_cache_chunks):
  config, model, schedule, tx, probe_tx, mesh, state = bf16_setup
  assert mesh.size == 8
  initial = jax.device_get(state.params)
  step = jax.jit(functools.partial(
      train.train_step, model=model, tx=tx,
      loss_fn=losses.get_with_metrics(config.loss.name),
      loss_config=config.loss, schedule=schedule,
      grad_cache_chunks=grad_cache_chunks, probe_tx=probe_tx))
  metrics = []
  with jax.set_mesh(mesh):
    for batch in (_batch(2), _batch(3)):
      state, m = step(state, sharding.make_global_batch(mesh, batch))
      metrics.append(jax.device_get(m))
  state = jax.device_get(state)
  assert int(state.step) == 2
  for m in metrics:
    assert np.isfinite(m["loss"]) and m["loss"] > 0, m
    assert np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0, m
    assert np.isfinite(m["probe_loss"]), m
  for tree in (state.params, state.batch_stats, state.probe_params):
    assert _dtypes(tree) == {"float32"}
  assert _dtypes(state.opt_state) <= {"float32", "int32"}
  assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(state.params))
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(initial), jax.tree.leaves(state.params)))
