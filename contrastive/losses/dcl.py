r"""Decoupled contrastive learning: DCL and DCLW (Yeh et al., ECCV 2022).

NT-Xent with the positive pair taken out of the denominator, which removes
the "negative-positive coupling" factor that makes NT-Xent need large
batches. For an anchor view `i` of sample `k` with positive views `P(i)`
(the other views of `k`) and negatives `N(i)` (every view of every other
sample in the global batch):

  DCL:   L_i = -1/|P(i)| sum_{p in P(i)} s_ip + log sum_{n in N(i)} exp(s_in)
  DCLW:  the alignment term weighted by the negative von Mises-Fisher weight
         w_k = 2 - exp(z_k^1 . z_k^2 / sigma) / mean_j exp(z_j^1 . z_j^2 / sigma)

with `s_ij = z_i . z_j / temperature`, averaged over every view as an anchor
(the paper's loss symmetrised over the two views). This is the in-batch
kernel of `infonce.py` with `denominator_mode="only_negatives"`, so it runs
with every `loss_impl`.

Weights: the mean runs over the global batch (not each device's share, as
lightly's `DCLWLoss` does without `gather_distributed`), and the weight is
differentiated through, as in lightly and the unofficial reference code; the
paper does not say whether it detaches it (`stop_weight_gradient=True` does).

References:
  Yeh et al., "Decoupled Contrastive Learning", ECCV 2022,
  https://arxiv.org/abs/2110.06848 (Eq. 6 and the DCLW weighting).
  lightly `DCLLoss` / `DCLWLoss` (`negative_mises_fisher_weights`).
"""

import jax
import jax.numpy as jnp

from contrastive.losses import infonce
from contrastive.losses import supcon

_SPEC = infonce.Spec(denominator="only_negatives")


def _check(z, labels, name: str, **temperatures) -> None:
  if labels is not None:
    raise ValueError(
        f"{name} takes no labels (each sample is its own class); for a "
        "supervised loss without positives in the denominator use "
        "losses.get('supcon') with denominator_mode='only_negatives'.")
  supcon.validate_inputs(z, None, **temperatures)
  if z.shape[1] < 2:
    raise ValueError(f"{name} needs at least 2 views per sample, got z of "
                     f"shape {z.shape}.")


def dcl_with_metrics(z: jax.Array, labels: None = None, *, temperature,
                     loss_impl: str = "gather",
                     block_size: int | None = None):
  """DCL loss and metrics.

  Args:
    z: float[batch, views, dim] L2-normalised embeddings (views >= 2), may be
      sharded on `batch` over the ambient mesh's `data` axis.
    labels: must be None.
    temperature: softmax temperature tau > 0.
    loss_impl: "gather", "blockwise" or "ring" (see `supcon`).
    block_size: columns per block of the streamed impls.

  Returns:
    (loss, metrics) as in `supcon.supcon_with_metrics`.
  """
  _check(z, labels, "dcl", temperature=temperature)
  return supcon.family_loss(z, None, temperature=temperature, spec=_SPEC,
                            loss_impl=loss_impl, block_size=block_size)


def von_mises_fisher_weights(z: jax.Array, sigma) -> jax.Array:
  """DCLW's w_k = 2 - batch * softmax_k(z_k^1 . z_k^2 / sigma), float32[batch].

  The softmax runs over the global batch (a sharded `z` is reduced by XLA).
  """
  cosine = jnp.sum(z[:, 0].astype(jnp.float32) * z[:, 1].astype(jnp.float32),
                   axis=-1)
  return 2.0 - z.shape[0] * jax.nn.softmax(cosine / sigma)


def dclw_with_metrics(z: jax.Array, labels: None = None, *, temperature,
                      sigma=0.5, stop_weight_gradient: bool = False,
                      loss_impl: str = "gather",
                      block_size: int | None = None):
  """DCLW loss and metrics: DCL with von Mises-Fisher weighted positives.

  Args:
    z: float[batch, 2, dim] L2-normalised embeddings of two views.
    labels: must be None.
    temperature: softmax temperature tau > 0.
    sigma: the weighting's temperature (0.5 in the paper).
    stop_weight_gradient: whether to treat the weights as constants.
    loss_impl: "gather", "blockwise" or "ring".
    block_size: columns per block of the streamed impls.

  Returns:
    (loss, metrics) as in `supcon.supcon_with_metrics`.
  """
  _check(z, labels, "dclw", temperature=temperature, sigma=sigma)
  if z.shape[1] != 2:
    raise ValueError(f"dclw weighs the pair of two views; got {z.shape[1]} "
                     "views (use dcl for more).")
  weight = von_mises_fisher_weights(z, sigma)
  if stop_weight_gradient:
    weight = jax.lax.stop_gradient(weight)
  return supcon.family_loss(
      z, None, temperature=temperature, spec=_SPEC, loss_impl=loss_impl,
      block_size=block_size,
      alignment_weight=jnp.broadcast_to(weight[:, None], z.shape[:2]))


def dcl(z, labels=None, **options) -> jax.Array:
  """DCL loss; see `dcl_with_metrics`."""
  return dcl_with_metrics(z, labels, **options)[0]


def dclw(z, labels=None, **options) -> jax.Array:
  """DCLW loss; see `dclw_with_metrics`."""
  return dclw_with_metrics(z, labels, **options)[0]

