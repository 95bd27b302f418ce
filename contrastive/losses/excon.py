r"""ExCon: explanation-driven supervised contrastive learning.

Zhang et al. replace one view of each image by a copy whose low-saliency
pixels are zeroed: Grad-CAM of a linear classifier on the current encoder
(`contrastive/saliency.py`), min-max normalised, pixels with saliency
<= `saliency_threshold` (0.5) set to 0. When the classifier misclassifies
the masked image, the unmasked "backup" view is kept instead. The loss is
SupCon (L_out) over the views, so `excon` is `supcon` plus this view
transform, which the trainer applies before the encoder pass (`explain`,
`masked_views`); it runs with every `loss_impl`.

As in the official code (`data_aug.aug_no_bbox_mc`, `main_supcon.py`), the
classifier is trained on detached encoder features: here it is the online
linear probe (`online_eval.probe`, which ExCon therefore requires), trained
every step rather than in alternate epochs. Differences, all documented
choices: the saliency is computed on view 0 itself (a random crop; the
official code explains an un-augmented copy and falls back to a further
random crop), and BatchNorm runs in inference mode for the explanation.

Background negatives (`negative_pair=True`; the official `negative_pair=1`,
off by default there too): every masked image that the classifier gets
wrong joins the batch as one more sample, in every view slot, under a
"background" class of its own, so it is a negative of every real view.
With `background_anchor=True` (the official default) its views are anchors
too, positives of each other and of the other backgrounds; with False they
are only negatives. Their number varies from step to step, so the trainer
embeds all `batch` masked images in a pass of their own (with their own
BatchNorm batch statistics; the official code puts them in the encoder's
batch, twice) and the loss keeps the failed ones through validity masks
(`supcon.ExtraSamples`): the same value and gradient as appending them,
with every `loss_impl`, and the extra pass costs 1 / views of the step's
encoder work. `explain_from_step` delays both the masking and the
backgrounds (the official `exp_epochs`, 50 of 200 epochs on CIFAR-100);
the Grad-CAM is still computed before then.

References:
  Zhang et al., "ExCon: Explanation-driven Supervised Contrastive Learning
  for Image Classification", arXiv 2111.14271; code
  https://github.com/DarrenZhang01/ExCon (Grad-CAM on ResNet-18's layer2
  for CIFAR: `gradcam_stage=1`).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from contrastive import saliency
from contrastive.evaluation import online
from contrastive.losses import supcon

# Options of the view transform, read by the trainer; the loss accepts and
# ignores them so that they live with its other options.
EXPLANATION_OPTIONS = ("saliency_threshold", "gradcam_stage")
# The background class: no real class id is negative.
BACKGROUND_LABEL = -1


class Explanation(NamedTuple):
  """View 0 of every image with its low-saliency pixels zeroed, and
  whether the classifier gets that masked image right."""
  masked: jax.Array   # float[B, H, W, C]
  correct: jax.Array  # bool[B]


def explain(model, variables: dict, classifier: dict, images: jax.Array,
            labels: jax.Array, *, saliency_threshold: float = 0.5,
            gradcam_stage: int = 1) -> Explanation:
  """Masks view 0 of each image by its Grad-CAM (no gradient flows).

  Args:
    model: the `ContrastiveModel`.
    variables: its {"params", "batch_stats"}.
    classifier: the online probe's parameters.
    images: float[B, V, H, W, C] views.
    labels: int[B] classes.
    saliency_threshold: pixels whose normalised saliency is at most this
      are zeroed.
    gradcam_stage: ResNet stage whose output Grad-CAM explains.
  """
  view = images[:, 0]
  cam = saliency.gradcam(model, variables, classifier, view, labels,
                         stage=gradcam_stage)
  masked = jnp.where((cam <= saliency_threshold)[..., None], 0.0, view)
  logits = online.probe_logits(
      classifier, model.apply(variables, masked, method=model.features))
  correct = jnp.argmax(logits, axis=-1) == labels
  return Explanation(jax.lax.stop_gradient(masked.astype(images.dtype)),
                     jax.lax.stop_gradient(correct))


def from_step(explanation: Explanation, step: jax.Array,
              explain_from_step: int) -> Explanation:
  """Before `explain_from_step` no masked image counts as classified
  right (view 0 stays as it is); see `backgrounds` for the negatives."""
  return explanation._replace(
      correct=explanation.correct & (step >= explain_from_step))


def backgrounds(explanation: Explanation, step: jax.Array,
                explain_from_step: int) -> jax.Array:
  """bool[B]: the masked images that are background negatives, those
  misclassified once explanations have started."""
  return ~explanation.correct & (step >= explain_from_step)


def masked_views(images: jax.Array, explanation: Explanation):
  """(images with view 0 replaced where the masked image is classified
  right, float32 fraction of images replaced)."""
  view = jnp.where(explanation.correct[:, None, None, None],
                   explanation.masked, images[:, 0])
  return (jax.lax.stop_gradient(images.at[:, 0].set(view)),
          jnp.mean(explanation.correct.astype(jnp.float32)))


def excon_with_metrics(
    z: jax.Array, labels: jax.Array | None = None, *, temperature,
    base_temperature=None, contrast_mode: str = "all",
    saliency_threshold: float = 0.5, gradcam_stage: int = 1,
    negative_pair: bool = False, background_anchor: bool = True,
    explain_from_step: int = 0, background: jax.Array | None = None,
    background_valid: jax.Array | None = None,
    loss_impl: str = "gather", block_size: int | None = None):
  """ExCon's loss (SupCon over the explanation-masked views) and metrics.

  Args:
    z: float[batch, views, dim] embeddings of the views, view 0 already
      replaced by the trainer (`masked_views`).
    labels: int[batch] class ids.
    temperature: softmax temperature tau > 0.
    base_temperature: as `supcon`.
    contrast_mode: "all" or "one".
    saliency_threshold: for the trainer's view transform; checked here.
    gradcam_stage: likewise.
    negative_pair: whether misclassified masked images join the batch as
      background negatives (the trainer then passes the next two).
    background_anchor: whether those backgrounds are anchors too.
    explain_from_step: for the trainer: steps before this one keep view 0
      unmasked and have no backgrounds (the official `exp_epochs`).
    background: float[batch, 1, dim] embeddings of every masked image.
    background_valid: bool[batch], the masked images that are backgrounds
      (misclassified).
    loss_impl: "gather", "blockwise" or "ring".
    block_size: columns per block of the streamed impls.

  Returns:
    (loss, metrics) as `supcon.supcon_with_metrics`, plus
    `background_fraction` with `negative_pair`.
  """
  if labels is None:
    raise ValueError("excon needs class labels (loss.use_labels=True).")
  if not 0.0 <= saliency_threshold < 1.0:
    raise ValueError(f"saliency_threshold must be in [0, 1), got "
                     f"{saliency_threshold}.")
  if gradcam_stage < 0:
    raise ValueError(f"gradcam_stage must be >= 0, got {gradcam_stage}.")
  if explain_from_step < 0:
    raise ValueError(f"explain_from_step must be >= 0, got "
                     f"{explain_from_step}.")
  extra_samples = None
  if negative_pair:
    if background is None or background_valid is None:
      raise ValueError(
          "negative_pair=True needs the masked images' embeddings "
          "(background, [batch, 1, dim]) and which are misclassified "
          "(background_valid, [batch]); the trainer passes both.")
    expected_shape = (z.shape[0], 1, z.shape[2])
    if background.shape != expected_shape:
      raise ValueError(f"background must have shape {expected_shape}, got "
                       f"{background.shape}.")
    # One masked image fills every view slot, as in the official code.
    extra_samples = supcon.ExtraSamples(
        z=jnp.broadcast_to(background, z.shape),
        labels=jnp.full(labels.shape, BACKGROUND_LABEL, jnp.int32),
        column_valid=background_valid,
        anchor_valid=background_valid & background_anchor)
  loss, metrics = supcon.supcon_with_metrics(
      z, labels, temperature=temperature, base_temperature=base_temperature,
      contrast_mode=contrast_mode, loss_impl=loss_impl,
      block_size=block_size, extra_samples=extra_samples)
  if negative_pair:
    metrics["background_fraction"] = jnp.mean(
        background_valid.astype(jnp.float32))
  return loss, metrics


def excon(z, labels=None, **options) -> jax.Array:
  """ExCon loss; see `excon_with_metrics`."""
  return excon_with_metrics(z, labels, **options)[0]
