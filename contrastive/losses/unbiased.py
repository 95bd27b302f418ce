r"""epsilon-SupInfoNCE, epsilon-SupCon and the FairKL regulariser.

Barbano et al. bound the margin between positive and negative similarities
with an `epsilon` (in logit units, after dividing by the temperature) on the
positive terms of the denominator. With `s_ij = z_i . z_j / temperature`,
positives `P(i)` (same label, not `i`) and negatives `N(i)`:

  eps-SupInfoNCE:  L_i = -1/|P(i)| sum_{p in P(i)}
                     log exp(s_ip) / (exp(s_ip - eps) + sum_{n in N(i)} exp(s_in))
  eps-SupCon (Eq. 18):  the same with every positive in the denominator,
                     sum_{q in P(i)} exp(s_iq - eps) + sum_{n in N(i)} exp(s_in)

`eps = 0` gives SupInfoNCE (SupCon's `one_positive` denominator) and SupCon.
Both are members of the `infonce.py` kernel (`one_positive` / `all` with a
margin); eps-SupInfoNCE needs every (anchor, positive) pair, so it runs with
`loss_impl="gather"`; eps-SupCon streams with every impl. The official code's
"in" form of eps-SupInfoNCE is not implemented (the paper's tables use "out").

FairKL pushes the similarity distributions of bias-aligned and
bias-conflicting pairs together. With bias labels `b`, pairs (i, j), i != j,
split into positive-aligned (same y, same b), positive-conflicting (same y,
other b), negative-aligned (other y, same b) and negative-conflicting; with
`mu` and `sigma` the mean and standard deviation of `s_ij` over a set,

  R = (mu_pc - mu_pa)^2 + (mu_na - mu_nc)^2
      + kld * ((sigma_pa - sigma_pc)^2 + (sigma_na - sigma_nc)^2)
      - mu_pc + mu_na

computed on the L2-normalised encoder features with temperature 1 and added
to eps-SupInfoNCE with a weight (`lambd` in the official code). Two
deliberate differences from the official `fairkl` function: self pairs are
left out (the code counts `s_ii` as a positive-aligned pair), and `sigma` is
the standard deviation over the set's pairs (the code takes `torch.std` of
the whole matrix with the other sets' entries zeroed).

References:
  Barbano et al., "Unbiased Supervised Contrastive Learning", ICLR 2023,
  https://arxiv.org/abs/2211.05568; code
  https://github.com/EIDOSLAB/unbiased-contrastive-learning
  (`debiasing/losses.py`).
"""

import numbers

import jax
import jax.numpy as jnp

from contrastive import sharding
from contrastive.losses import infonce
from contrastive.losses import supcon


def _check_epsilon(epsilon) -> None:
  if isinstance(epsilon, numbers.Real) and epsilon < 0:
    raise ValueError(f"epsilon must be >= 0 (a margin in logit units), got "
                     f"{epsilon}.")


def _eps_loss(z, labels, denominator: str, *, temperature, epsilon,
              base_temperature, contrast_mode, loss_impl, block_size):
  supcon.validate_inputs(z, labels, temperature=temperature,
                         base_temperature=base_temperature)
  _check_epsilon(epsilon)
  spec = infonce.Spec(denominator=denominator, margin=epsilon,
                      contrast_mode=contrast_mode)
  loss, metrics = supcon.family_loss(
      z, labels, temperature=temperature, spec=spec, loss_impl=loss_impl,
      block_size=block_size)
  if base_temperature is not None:
    loss = loss * (temperature / base_temperature)
  return loss, metrics


def eps_supinfonce_with_metrics(
    z: jax.Array, labels: jax.Array | None = None, *, temperature,
    epsilon=0.0, base_temperature=None, contrast_mode: str = "all",
    loss_impl: str = "gather", block_size: int | None = None):
  """epsilon-SupInfoNCE ("out" form) and metrics.

  Args:
    z: float[batch, views, dim] L2-normalised embeddings, may be sharded on
      `batch` over the ambient mesh's `data` axis.
    labels: int[batch] class ids, or None (each sample its own class).
    temperature: softmax temperature tau > 0.
    epsilon: margin >= 0 in logit units.
    base_temperature: scales the loss by temperature / base_temperature
      (the official code's 0.07); None for no scaling.
    contrast_mode: "all" or "one".
    loss_impl: must be "gather" (a denominator per positive).
    block_size: unused by "gather"; accepted for a uniform signature.

  Returns:
    (loss, metrics) as in `supcon.supcon_with_metrics`.
  """
  return _eps_loss(z, labels, "one_positive", temperature=temperature,
                   epsilon=epsilon, base_temperature=base_temperature,
                   contrast_mode=contrast_mode, loss_impl=loss_impl,
                   block_size=block_size)


def eps_supcon_with_metrics(
    z: jax.Array, labels: jax.Array | None = None, *, temperature,
    epsilon=0.0, base_temperature=None, contrast_mode: str = "all",
    loss_impl: str = "gather", block_size: int | None = None):
  """epsilon-SupCon (Eq. 18) and metrics; arguments as
  `eps_supinfonce_with_metrics`, with every `loss_impl`."""
  return _eps_loss(z, labels, "all", temperature=temperature,
                   epsilon=epsilon, base_temperature=base_temperature,
                   contrast_mode=contrast_mode, loss_impl=loss_impl,
                   block_size=block_size)


def eps_supinfonce(z, labels=None, **options) -> jax.Array:
  """epsilon-SupInfoNCE; see `eps_supinfonce_with_metrics`."""
  return eps_supinfonce_with_metrics(z, labels, **options)[0]


def eps_supcon(z, labels=None, **options) -> jax.Array:
  """epsilon-SupCon; see `eps_supcon_with_metrics`."""
  return eps_supcon_with_metrics(z, labels, **options)[0]


_SETS = ("pos_aligned", "pos_conflicting", "neg_aligned", "neg_conflicting")


def _fairkl_sums(features, labels, bias_labels, *, axis_name):
  """Per-set count, sum and sum of squares of s_ij over this device's rows
  against the global batch, reduced over `axis_name`."""
  features = features.astype(jnp.float32)
  local = features.shape[0]
  offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * local
  ids = offset + jnp.arange(local)
  columns = (features, labels, bias_labels, ids)
  if axis_name is not None:
    columns = jax.tree.map(
        lambda x: jax.lax.all_gather(x, axis_name, tiled=True), columns)
  col_features, col_labels, col_bias, col_ids = columns
  similarity = jnp.matmul(features, col_features.T,
                          precision=jax.lax.Precision.HIGHEST)
  not_self = ids[:, None] != col_ids[None, :]
  same_label = labels[:, None] == col_labels[None, :]
  same_bias = bias_labels[:, None] == col_bias[None, :]
  masks = {
      "pos_aligned": same_label & same_bias,
      "pos_conflicting": same_label & ~same_bias,
      "neg_aligned": ~same_label & same_bias,
      "neg_conflicting": ~same_label & ~same_bias,
  }
  sums = {}
  for name, mask in masks.items():
    mask &= not_self
    sums[name] = jnp.stack([
        mask.sum().astype(jnp.float32),
        jnp.where(mask, similarity, 0.0).sum(),
        jnp.where(mask, similarity**2, 0.0).sum()])
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  return sums


def fairkl_regulariser(features: jax.Array, labels: jax.Array,
                       bias_labels: jax.Array, *, kld=1.0) -> jax.Array:
  """The FairKL term over the global batch.

  Args:
    features: float[batch, dim] L2-normalised features (the official code
      uses the encoder's features, not the projection), may be sharded on
      `batch` over the ambient mesh's `data` axis.
    labels: int[batch] class ids.
    bias_labels: int[batch] bias attribute ids (e.g. the colour).
    kld: weight of the standard-deviation term.

  Returns:
    float32 scalar. A set without pairs contributes mean and deviation 0,
    as the official code's `max(count, 1)` does for the mean.
  """
  if features.ndim != 2:
    raise ValueError(f"features must be float[batch, dim], got shape "
                     f"{features.shape}.")
  for name, value in (("labels", labels), ("bias_labels", bias_labels)):
    if value is None or jnp.shape(value) != features.shape[:1]:
      raise ValueError(
          f"fairkl needs {name} of shape [batch] = ({features.shape[0]},), "
          f"got {None if value is None else jnp.shape(value)}; FairKL needs "
          "a dataset with bias labels (e.g. the biased Fashion-MNIST).")
  sums = sharding.map_batch_shards(
      _fairkl_sums, features, jnp.asarray(labels, jnp.int32),
      jnp.asarray(bias_labels, jnp.int32))
  mu, sigma = {}, {}
  for name in _SETS:
    count, total, squares = sums[name]
    count = jnp.maximum(count, 1.0)
    mu[name] = total / count
    # Clipped at 0 before the root: rounding can make E[s^2] - mu^2 < 0; the
    # epsilon keeps the root's gradient finite for a constant set.
    sigma[name] = jnp.sqrt(jnp.maximum(squares / count - mu[name]**2, 0.0)
                           + 1e-12)
  return ((mu["pos_conflicting"] - mu["pos_aligned"])**2
          + (mu["neg_aligned"] - mu["neg_conflicting"])**2
          + kld * ((sigma["pos_aligned"] - sigma["pos_conflicting"])**2
                   + (sigma["neg_aligned"] - sigma["neg_conflicting"])**2)
          - mu["pos_conflicting"] + mu["neg_aligned"])


def fairkl_with_metrics(
    z: jax.Array, labels: jax.Array | None = None, *, temperature, features,
    bias_labels, epsilon=0.0, alpha=1.0, lambd=1.0, kld=1.0,
    base_temperature=None, contrast_mode: str = "all",
    loss_impl: str = "gather", block_size: int | None = None):
  """alpha * epsilon-SupInfoNCE + lambd * FairKL, as the official debiasing
  script combines them, with metrics.

  Args:
    z: float[batch, views, dim] L2-normalised projections.
    labels: int[batch] class ids.
    temperature: softmax temperature of epsilon-SupInfoNCE.
    features: float[batch, views, feature_dim] encoder features (before the
      projection head); FairKL sees view 0's, L2-normalised, as the
      official script does.
    bias_labels: int[batch] bias attribute ids.
    epsilon: the margin of epsilon-SupInfoNCE.
    alpha: weight of epsilon-SupInfoNCE.
    lambd: weight of FairKL.
    kld: weight of FairKL's standard-deviation term.
    base_temperature: as in `eps_supinfonce_with_metrics`.
    contrast_mode: "all" or "one".
    loss_impl: must be "gather".
    block_size: unused by "gather".

  Returns:
    (loss, metrics): metrics of epsilon-SupInfoNCE plus `fairkl` (the
    regulariser) and `eps_supinfonce` (the unweighted contrastive term).
  """
  if labels is None:
    raise ValueError("fairkl needs class labels (loss.use_labels=True).")
  if features is None or features.ndim != 3:
    raise ValueError(
        "fairkl needs the encoder features float[batch, views, dim] "
        f"(got {None if features is None else features.shape}).")
  contrastive, metrics = eps_supinfonce_with_metrics(
      z, labels, temperature=temperature, epsilon=epsilon,
      base_temperature=base_temperature, contrast_mode=contrast_mode,
      loss_impl=loss_impl, block_size=block_size)
  view0 = features[:, 0].astype(jnp.float32)
  view0 = view0 / jnp.maximum(
      jnp.linalg.norm(view0, axis=-1, keepdims=True), 1e-12)
  regulariser = fairkl_regulariser(view0, labels, bias_labels, kld=kld)
  metrics = {**metrics, "fairkl": jax.lax.stop_gradient(regulariser),
             "eps_supinfonce": jax.lax.stop_gradient(contrastive)}
  return alpha * contrastive + lambd * regulariser, metrics


def fairkl(z, labels=None, **options) -> jax.Array:
  """alpha * epsilon-SupInfoNCE + lambd * FairKL; see
  `fairkl_with_metrics`."""
  return fairkl_with_metrics(z, labels, **options)[0]
