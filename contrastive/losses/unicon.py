r"""UniCon: universum-inspired supervised contrastive learning.

Han & Chen build, for every view image x_j of the batch, a "universum"
image u_j = lam * x' + (1 - lam) * x_j by mixup with a random batch image x'
of another class (lam = 0.5; or CutMix: x' with a box of about half its area
taken from x_j), embed the universum with the same encoder (one more
forward pass of 2B images), and contrast the views' embeddings z_i against
the universum embeddings only. As the official code computes it
(`losses.UniConLoss`; u_j carries the label of its base image x_j):

  L = -(tau / base_tau) mean_i 1/|P(i)| sum_{p in P(i)}
        log exp(z_i . u_p / tau) / sum_{j != i} exp(z_i . u_j / tau),
  P(i) = {j != i : y_j = y_i},

i.e. the in-batch kernel (`infonce.py`) with the universum as the contrast
set; the universum made from the anchor's own image is left out. It runs
with every `loss_impl`.

Paper versus code: the abstract describes universum samples as negatives
("g-negatives") pushed away from the anchors, while the official loss uses
the universum of same-class base images as the positives (the mixture is
half the anchor's class). We follow the code, as the issue asks.

Where the universum is made: on each device from its own rows of the batch
(`make_universum`), so no image crosses devices; the reference draws from
its per-GPU batch too. The partner x' is drawn uniformly among the device's
view images of another class (with replacement); if a shard holds a single
class, x' is of the same class. For CutMix one box per step and device is
used (the reference uses one box per batch), of area 0.5 of the image,
inside it, so the official acceptance range [0.45, 0.55] always holds.

References:
  Han & Chen, "Universum-inspired Supervised Contrastive Learning",
  APWeb-WAIM 2022 / arXiv 2204.10695; code
  https://github.com/hannaiiyanggit/UniCon (`util.get_universum`,
  `losses.UniConLoss`).
"""

import math

import jax
import jax.numpy as jnp

from contrastive import sharding
from contrastive.losses import infonce
from contrastive.losses import supcon

MIXES = ("mixup", "cutmix")
# Options of the universum images, read by the trainer (`make_universum`);
# the loss accepts and ignores them so that they live with its other
# options in `config.loss.kwargs`.
UNIVERSUM_OPTIONS = ("lam", "mix")


def _validate_universum(lam, mix: str) -> None:
  if mix not in MIXES:
    raise ValueError(f"Unknown universum mix {mix!r}; use one of {MIXES}.")
  if not 0.0 < lam < 1.0:
    raise ValueError(f"The universum's lam must be in (0, 1), got {lam}.")


def _local_universum(images, labels, key, *, lam, mix, axis_name):
  """Universum of one device's rows: images f32[b, V, H, W, C]."""
  if axis_name is not None:
    key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
  b, views = images.shape[:2]
  flat = images.reshape(b * views, *images.shape[2:])
  flat_labels = jnp.repeat(labels, views)
  choice_key, box_key = jax.random.split(key)
  # A uniform draw among the other-class images: the argmax of uniform
  # scores, with same-class images scored below every other.
  scores = jax.random.uniform(choice_key, (b * views, b * views))
  scores = jnp.where(flat_labels[:, None] == flat_labels[None, :], -1.0,
                     scores)
  partner = flat[jnp.argmax(scores, axis=1)]
  if mix == "mixup":
    universum = lam * partner + (1.0 - lam) * flat
  else:
    height, width = flat.shape[1:3]
    # A box with a fraction 1 - lam of the area, kept from the own image.
    side = math.sqrt(1.0 - lam)
    box_h, box_w = round(side * height), round(side * width)
    top = jax.random.randint(box_key, (), 0, height - box_h + 1)
    left = jax.random.randint(jax.random.fold_in(box_key, 1), (), 0,
                              width - box_w + 1)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    inside = ((rows >= top) & (rows < top + box_h) & (cols >= left)
              & (cols < left + box_w))[None, :, :, None]
    universum = jnp.where(inside, flat, partner)
  return universum.reshape(images.shape)


def make_universum(images: jax.Array, labels: jax.Array, key: jax.Array, *,
                   lam: float = 0.5, mix: str = "mixup") -> jax.Array:
  """Universum images for a (possibly sharded) batch of views.

  Args:
    images: float[batch, views, H, W, C], sharded on `batch`.
    labels: int[batch] class ids.
    key: PRNG key of the step; folded with the device index.
    lam: the partner's share (0.5 in the paper).
    mix: "mixup" or "cutmix".

  Returns:
    float[batch, views, H, W, C]: entry (i, v) is made from view v of image
    i, sharded like `images`.
  """
  _validate_universum(lam, mix)
  return sharding.map_batch_rows(
      lambda images, labels, *, axis_name: _local_universum(
          images, labels, key, lam=lam, mix=mix, axis_name=axis_name),
      images, labels)


def unicon_with_metrics(
    z: jax.Array, labels: jax.Array | None = None, *, temperature,
    universum, base_temperature=None, contrast_mode: str = "all",
    lam: float = 0.5, mix: str = "mixup", loss_impl: str = "gather",
    block_size: int | None = None):
  """UniCon loss and metrics.

  Args:
    z: float[batch, views, dim] L2-normalised embeddings of the views, may
      be sharded on `batch` over the ambient mesh's `data` axis.
    labels: int[batch] class ids.
    temperature: softmax temperature tau > 0.
    universum: float[batch, views, dim] L2-normalised embeddings of the
      universum images (entry (i, v) made from view v of image i), sharded
      like `z`; the trainer makes and embeds them.
    base_temperature: scales the loss by tau / base_temperature (the
      official default equals tau: no scaling); None for none.
    contrast_mode: "all" or "one".
    lam: the universum's mixing weight (used by the trainer's
      `make_universum`; checked here).
    mix: "mixup" or "cutmix" (likewise).
    loss_impl: "gather", "blockwise" or "ring".
    block_size: columns per block of the streamed impls.

  Returns:
    (loss, metrics) as in `supcon.supcon_with_metrics` (the metrics measure
    anchors against the universum).
  """
  if labels is None:
    raise ValueError("unicon needs class labels (loss.use_labels=True).")
  supcon.validate_inputs(z, labels, temperature=temperature,
                         base_temperature=base_temperature)
  _validate_universum(lam, mix)
  if universum is None or universum.shape != z.shape:
    raise ValueError(
        f"unicon needs universum embeddings shaped like z {z.shape}, got "
        f"{None if universum is None else universum.shape}.")
  spec = infonce.Spec(contrast_mode=contrast_mode)
  loss, metrics = supcon.family_loss(
      z, labels, temperature=temperature, spec=spec, loss_impl=loss_impl,
      block_size=block_size, contrast_z=universum)
  if base_temperature is not None:
    loss = loss * (temperature / base_temperature)
  return loss, metrics


def unicon(z, labels=None, **options) -> jax.Array:
  """UniCon loss; see `unicon_with_metrics`."""
  return unicon_with_metrics(z, labels, **options)[0]
