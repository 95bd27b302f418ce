r"""ESupCon: SupCon with learnable class prototypes in the contrast set.

Aljundi et al. extend SupCon with one weight vector w_c per class in the
embedding space, which joins every anchor's contrast set: for an anchor
view i with label y_i, the positives are the other views with label y_i
and the prototype w_{y_i}; the negatives are the other views and the other
prototypes. With `s_ij = z_i . z_j / tau` and `s_ic = z_i . w_c / (|w_c|
tau)`, the loss is SupCon's L_out over this enlarged set,

  L_i = -1/|P(i)| sum_{p in P(i)} log exp(s_ip) / (sum_{a in A(i)} exp(s_ia)
                                                    + sum_c exp(s_ic)),

with P(i) including w_{y_i}. The prototypes are trained by this objective
with the encoder; the classifier predicts argmax_c z . w_c, so the model
is evaluated directly, without a linear-probe stage.

The prototypes live in the model (`config.model.num_prototypes` = the
number of classes) and reach the loss as `prototype_cosines`
(z . w_c / |w_c| for every view), which the trainer passes in. Their
columns are computed densely and merged into the batch statistics, so every
`loss_impl` works. Unverified against the paper (no public code): the
relative weight of prototype and sample columns (equal here) and whether
the prototypes are normalised (here yes, like z, so that tau applies to
both).

References:
  Aljundi et al., "Contrastive Classification and Representation Learning
  with Probabilistic Interpretation", arXiv 2211.03646 (2022).
"""

import jax
import jax.numpy as jnp

from contrastive.losses import infonce
from contrastive.losses import supcon


def esupcon_with_metrics(
    z: jax.Array, labels: jax.Array | None = None, *, temperature,
    prototype_cosines, contrast_mode: str = "all",
    loss_impl: str = "gather", block_size: int | None = None):
  """ESupCon loss and metrics.

  Args:
    z: float[batch, views, dim] L2-normalised embeddings, may be sharded on
      `batch` over the ambient mesh's `data` axis.
    labels: int[batch] class ids in [0, num_prototypes).
    temperature: softmax temperature tau > 0.
    prototype_cosines: float[batch, views, num_prototypes] cosine of each
      view's embedding with each class prototype (sharded like `z`).
    contrast_mode: "all" or "one".
    loss_impl: "gather", "blockwise" or "ring".
    block_size: columns per block of the streamed impls.

  Returns:
    (loss, metrics): `supcon.supcon_with_metrics`'s metrics plus
    `prototype_top1`, the training-batch accuracy of argmax_c cosine.
  """
  if labels is None:
    raise ValueError("esupcon needs class labels (loss.use_labels=True).")
  supcon.validate_inputs(z, labels, temperature=temperature)
  if prototype_cosines is None or prototype_cosines.shape[:2] != z.shape[:2]:
    raise ValueError(
        "esupcon needs prototype_cosines float[batch, views, classes]; set "
        "config.model.num_prototypes to the number of classes (got "
        f"{None if prototype_cosines is None else prototype_cosines.shape} "
        f"for z of shape {z.shape}).")
  spec = infonce.Spec(contrast_mode=contrast_mode)
  loss, metrics = supcon.family_loss(
      z, labels, temperature=temperature, spec=spec, loss_impl=loss_impl,
      block_size=block_size, extra_cosines=prototype_cosines)
  predicted = jnp.argmax(jax.lax.stop_gradient(prototype_cosines), axis=-1)
  metrics["prototype_top1"] = jnp.mean(
      (predicted == jnp.asarray(labels)[:, None]).astype(jnp.float32))
  return loss, metrics


def esupcon(z, labels=None, **options) -> jax.Array:
  """ESupCon loss; see `esupcon_with_metrics`."""
  return esupcon_with_metrics(z, labels, **options)[0]
