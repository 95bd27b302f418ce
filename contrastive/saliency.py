"""Grad-CAM saliency of a linear classifier on the encoder's features.

Selvaraju et al., "Grad-CAM", ICCV 2017: for the target class's logit y
and a layer's activations A (channels c), the map is
sum_c alpha_c A_c with alpha_c the spatial mean of dy / dA_c, upsampled
bilinearly to the image. As captum's `LayerGradCam` (which ExCon's
official code uses) by default, no ReLU is applied.

The layer is the output of ResNet stage `stage` (0-based; the models sow
it as "intermediates" and take its gradient through a zero "perturbations"
variable, `models/resnet.py`). BatchNorm runs in inference mode, so an
explanation changes no running statistics and each image is explained on
its own.
"""

import jax
import jax.numpy as jnp

from contrastive.evaluation import online


def _stage_shapes(model, variables, images):
  """Shapes of every stage's output, without computing them."""
  _, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, method=model.features,
                               mutable=["intermediates"]),
      variables, images)
  return state["intermediates"]


def gradcam(model, variables: dict, classifier: dict, images: jax.Array,
            labels: jax.Array, *, stage: int) -> jax.Array:
  """Grad-CAM maps of `labels` under `classifier`, min-max normalised.

  Args:
    model: a `ContrastiveModel`.
    variables: {"params", "batch_stats"} of the model.
    classifier: linear classifier on the encoder features, as the online
      probe's parameters (`online.probe_logits`).
    images: float[B, H, W, C].
    labels: int[B] target classes.
    stage: which ResNet stage's output to explain (0-based).

  Returns:
    float32[B, H, W] in [0, 1] per image (constant maps become 0).
  """
  shapes = _stage_shapes(model, variables, images)
  encoder_shapes = shapes["encoder"]
  if f"stage{stage}" not in encoder_shapes:
    raise ValueError(f"The encoder has stages 0..{len(encoder_shapes) - 1}; "
                     f"got gradcam_stage={stage}.")
  perturbations = {"encoder": {
      name: jnp.zeros(value[0].shape, value[0].dtype)
      for name, value in encoder_shapes.items()}}

  def target_logit(perturbations):
    features, state = model.apply(
        {**variables, "perturbations": perturbations}, images,
        method=model.features, mutable=["intermediates"])
    logits = online.probe_logits(classifier, features)
    chosen = jnp.take_along_axis(logits, labels[:, None], axis=1)
    # Summed over the batch: each image's logit depends on its own image
    # only (inference-mode BN), so this is every image's own gradient.
    return chosen.sum(), state["intermediates"]["encoder"]

  grads, intermediates = jax.grad(target_logit, has_aux=True)(perturbations)
  name = f"stage{stage}"
  activation = intermediates[name][0].astype(jnp.float32)
  gradient = grads["encoder"][name].astype(jnp.float32)
  alpha = gradient.mean(axis=(1, 2), keepdims=True)
  cam = (alpha * activation).sum(axis=-1)
  cam = jax.image.resize(cam, (cam.shape[0], *images.shape[1:3]),
                         method="bilinear")
  low = cam.min(axis=(1, 2), keepdims=True)
  high = cam.max(axis=(1, 2), keepdims=True)
  return jax.lax.stop_gradient((cam - low) / jnp.maximum(high - low, 1e-8))
