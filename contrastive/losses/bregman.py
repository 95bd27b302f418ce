r"""Deep Bregman divergence for contrastive learning (Rezaei et al. 2021).

K sub-networks phi_1..phi_K of the encoder features define a convex
max-affine generator psi(x) = max_k phi_k(x). The functional Bregman
divergence between two views x, y is then

  D(x, y) = phi_{k*(x)}(x) - phi_{k*(y)}(x),   k*(u) = argmax_k phi_k(u)

(for affine phi_k this is exactly the Bregman divergence of psi:
psi(x) - psi(y) - <grad psi(y), x - y>). -D / tau_b is the similarity of a
second contrastive softmax over the batch, added to NT-Xent on the
projections:

  L = NT-Xent(z; tau) + lambd * NT-Xent(-D / tau_b).

Because max_k phi_k(x_i) is the same for every column of anchor i, the
softmax of -D(x_i, x_j) / tau_b over j is the softmax of
phi_{k*(x_j)}(x_i) / tau_b: a dot product of the anchor's phi(x_i) with the
one-hot of the column's k*(x_j). So the Bregman term is the in-batch kernel
(`infonce.py`) with anchors phi and contrast columns one_hot(k*) (no
gradient through the argmax), and runs with every `loss_impl`.

The model standardises each phi_k over the batch; why (raw, the term
collapsed to one argmax winner, then diverged) is in
`encoder.BregmanSubnetworks`.

Unverified (no public code; the paper's supplementary holds it): the form
of the sub-networks (here each a Dense-ReLU-Dense MLP of the encoder
features, `config.model.bregman`), their normalisation, K, lambd and tau_b;
defaults here are K = 16 (the model config), lambd = 1 and tau_b = the
NT-Xent tau.

References:
  Rezaei et al., "Deep Bregman Divergence for Contrastive Learning of
  Visual Representations", arXiv 2109.07455 (2021); extended in CVIU 235
  (2023).
"""

import jax
import jax.numpy as jnp

from contrastive.losses import infonce
from contrastive.losses import supcon


def bregman_divergence(phi_x: jax.Array, phi_y: jax.Array) -> jax.Array:
  """D(x, y) for every pair: float[n, m] from phi float[n, K], float[m, K]."""
  chosen = jnp.take_along_axis(
      phi_x[:, None, :], jnp.argmax(phi_y, axis=-1)[None, :, None],
      axis=-1)[..., 0]
  return phi_x.max(axis=-1)[:, None] - chosen


def bregman_with_metrics(
    z: jax.Array, labels: None = None, *, temperature, bregman_phi,
    lambd=1.0, bregman_temperature=None, loss_impl: str = "gather",
    block_size: int | None = None):
  """NT-Xent plus the deep Bregman contrastive term, and metrics.

  Args:
    z: float[batch, views, dim] L2-normalised projections, may be sharded on
      `batch`.
    labels: must be None.
    temperature: NT-Xent's tau > 0.
    bregman_phi: float[batch, views, K] sub-network outputs phi_k of each
      view (the model's "bregman_phi"), sharded like `z`.
    lambd: weight of the Bregman term.
    bregman_temperature: tau_b > 0 of the Bregman term; None: `temperature`.
    loss_impl: "gather", "blockwise" or "ring".
    block_size: columns per block of the streamed impls.

  Returns:
    (loss, metrics): NT-Xent's metrics plus `nt_xent`, `bregman` (the two
    unweighted terms) and `bregman_acc` (the Bregman softmax's top-1 on the
    positive view).
  """
  if labels is not None:
    raise ValueError("bregman is self-supervised and takes no labels.")
  tau_b = temperature if bregman_temperature is None else bregman_temperature
  supcon.validate_inputs(z, None, temperature=temperature,
                         bregman_temperature=tau_b)
  if bregman_phi is None or bregman_phi.shape[:2] != z.shape[:2]:
    raise ValueError(
        "bregman needs bregman_phi float[batch, views, K]; set "
        "config.model.bregman.subnetworks to K > 0 (got "
        f"{None if bregman_phi is None else bregman_phi.shape} for z of "
        f"shape {z.shape}).")
  spec = infonce.Spec()
  nt_xent, metrics = supcon.family_loss(
      z, None, temperature=temperature, spec=spec, loss_impl=loss_impl,
      block_size=block_size)
  phi = bregman_phi.astype(jnp.float32)
  winner = jax.nn.one_hot(jnp.argmax(jax.lax.stop_gradient(phi), axis=-1),
                          phi.shape[-1], dtype=jnp.float32)
  bregman, bregman_metrics = supcon.family_loss(
      phi, None, temperature=tau_b, spec=spec, loss_impl=loss_impl,
      block_size=block_size, contrast_z=winner)
  metrics = {**metrics, "nt_xent": jax.lax.stop_gradient(nt_xent),
             "bregman": jax.lax.stop_gradient(bregman),
             "bregman_acc": bregman_metrics["contrastive_acc"]}
  return nt_xent + lambd * bregman, metrics


def bregman(z, labels=None, **options) -> jax.Array:
  """NT-Xent + lambd * deep Bregman term; see `bregman_with_metrics`."""
  return bregman_with_metrics(z, labels, **options)[0]
