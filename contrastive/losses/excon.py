r"""ExCon: explanation-driven supervised contrastive learning.

Zhang et al. replace one view of each image by a copy whose low-saliency
pixels are zeroed: Grad-CAM of a linear classifier on the current encoder
(`contrastive/saliency.py`), min-max normalised, pixels with saliency
<= `saliency_threshold` (0.5) set to 0. When the classifier misclassifies
the masked image, the unmasked "backup" view is kept instead. The loss is
SupCon (L_out) over the views, so `excon` is `supcon` plus this view
transform, which the trainer applies before the encoder pass
(`explanation_views`); it runs with every `loss_impl`.

As in the official code (`data_aug.aug_no_bbox_mc`, `main_supcon.py`), the
classifier is trained on detached encoder features: here it is the online
linear probe (`online_eval.probe`, which ExCon therefore requires), trained
every step rather than in alternate epochs. Differences, all documented
choices: the saliency is computed on view 0 itself (a random crop; the
official code explains an un-augmented copy and falls back to a further
random crop), BatchNorm runs in inference mode for the explanation, and the
optional "background" negatives (`negative_pair=1`, masked images that fail
joining the batch under an extra class) are not implemented: they change
the batch size from step to step. The official default is without them.

References:
  Zhang et al., "ExCon: Explanation-driven Supervised Contrastive Learning
  for Image Classification", arXiv 2111.14271; code
  https://github.com/DarrenZhang01/ExCon (Grad-CAM on ResNet-18's layer2
  for CIFAR: `gradcam_stage=1`).
"""

import jax
import jax.numpy as jnp

from contrastive import saliency
from contrastive.evaluation import online
from contrastive.losses import supcon

# Options of the view transform, read by the trainer; the loss accepts and
# ignores them so that they live with its other options.
EXPLANATION_OPTIONS = ("saliency_threshold", "gradcam_stage")


def explanation_views(model, variables: dict, classifier: dict,
                      images: jax.Array, labels: jax.Array, *,
                      saliency_threshold: float = 0.5,
                      gradcam_stage: int = 1):
  """View 0 of every image masked by its explanation where that works.

  Args:
    model: the `ContrastiveModel`.
    variables: its {"params", "batch_stats"}.
    classifier: the online probe's parameters.
    images: float[B, V, H, W, C] views.
    labels: int[B] classes.
    saliency_threshold: pixels whose normalised saliency is at most this
      are zeroed.
    gradcam_stage: ResNet stage whose output Grad-CAM explains.

  Returns:
    (images with view 0 replaced where the classifier gets the masked image
    right, float32 fraction of images replaced). No gradient flows through.
  """
  view = images[:, 0]
  cam = saliency.gradcam(model, variables, classifier, view, labels,
                         stage=gradcam_stage)
  masked = jnp.where((cam <= saliency_threshold)[..., None], 0.0, view)
  logits = online.probe_logits(
      classifier, model.apply(variables, masked, method=model.features))
  correct = jnp.argmax(logits, axis=-1) == labels
  view = jnp.where(correct[:, None, None, None], masked, view)
  images = images.at[:, 0].set(view.astype(images.dtype))
  return (jax.lax.stop_gradient(images),
          jnp.mean(correct.astype(jnp.float32)))


def excon_with_metrics(
    z: jax.Array, labels: jax.Array | None = None, *, temperature,
    base_temperature=None, contrast_mode: str = "all",
    saliency_threshold: float = 0.5, gradcam_stage: int = 1,
    loss_impl: str = "gather", block_size: int | None = None):
  """ExCon's loss (SupCon over the explanation-masked views) and metrics.

  Args:
    z: float[batch, views, dim] embeddings of the views, view 0 already
      replaced by the trainer (`explanation_views`).
    labels: int[batch] class ids.
    temperature: softmax temperature tau > 0.
    base_temperature: as `supcon`.
    contrast_mode: "all" or "one".
    saliency_threshold: for the trainer's view transform; checked here.
    gradcam_stage: likewise.
    loss_impl: "gather", "blockwise" or "ring".
    block_size: columns per block of the streamed impls.

  Returns:
    (loss, metrics) as `supcon.supcon_with_metrics`.
  """
  if labels is None:
    raise ValueError("excon needs class labels (loss.use_labels=True).")
  if not 0.0 <= saliency_threshold < 1.0:
    raise ValueError(f"saliency_threshold must be in [0, 1), got "
                     f"{saliency_threshold}.")
  if gradcam_stage < 0:
    raise ValueError(f"gradcam_stage must be >= 0, got {gradcam_stage}.")
  return supcon.supcon_with_metrics(
      z, labels, temperature=temperature, base_temperature=base_temperature,
      contrast_mode=contrast_mode, loss_impl=loss_impl,
      block_size=block_size)


def excon(z, labels=None, **options) -> jax.Array:
  """ExCon loss; see `excon_with_metrics`."""
  return excon_with_metrics(z, labels, **options)[0]
