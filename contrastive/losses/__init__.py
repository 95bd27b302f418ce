"""Contrastive losses, looked up by the name a config gives.

Every loss is called as `fn(z, labels=None, *, temperature, **options)` with
`z` float[batch, views, dim] of L2-normalised embeddings and `labels`
int[batch] or None, and returns a float32 scalar. On one device or, inside
`jax.jit` under `with jax.set_mesh(mesh):` with `z` sharded on its batch axis
over mesh axis `data`, over the global batch.

  from contrastive import losses
  loss = losses.get("supcon")(z, labels, temperature=0.1, variant="out")
  loss, metrics = losses.get_with_metrics("simclr")(z, temperature=0.5)

Every loss also takes `loss_impl="gather" | "blockwise" | "ring"` and
`block_size`: how the anchors meet the global batch, with the same value and
gradient but per-device memory O(local * global), O(local * block + global *
dim) or O(local * dim) (see `streaming.py`). Options that need every
(anchor, positive) pair (`eps_supinfonce`, `fnc`, `fn_removal`, `fairkl`,
SupCon's `one_positive` denominator and `positives_cap`) run with "gather"
only and say so.

All of them are members of one masked, weighted InfoNCE kernel
(`infonce.py`): SimCLR and SupCon (`supcon.py`), DCL and DCLW (`dcl.py`),
epsilon-SupInfoNCE and epsilon-SupCon (`unbiased.py`, with the FairKL
regulariser), ESupCon (`esupcon.py`, class prototypes as extra columns),
UniCon (`unicon.py`, the universum as the contrast set), FNC and
false-negative removal (`fnc.py`, masks edited by a detector), the deep
Bregman term (`bregman.py`, a second softmax over one-hot columns), ExCon
(`excon.py`, SupCon over saliency-masked views).
"""

from collections.abc import Callable

from contrastive.losses import bregman
from contrastive.losses import dcl
from contrastive.losses import esupcon
from contrastive.losses import excon
from contrastive.losses import fnc
from contrastive.losses import supcon
from contrastive.losses import unbiased
from contrastive.losses import unicon

# name -> (loss, loss_with_metrics). The second returns `(loss, metrics)`,
# metrics a dict of float32 scalars: `contrastive_acc`, `pos_logit`,
# `neg_logit`.
_REGISTRY: dict[str, tuple[Callable[..., object], Callable[..., object]]] = {
    "simclr": (supcon.simclr, supcon.simclr_with_metrics),
    "supcon": (supcon.supcon, supcon.supcon_with_metrics),
    "dcl": (dcl.dcl, dcl.dcl_with_metrics),
    "dclw": (dcl.dclw, dcl.dclw_with_metrics),
    "eps_supinfonce": (unbiased.eps_supinfonce,
                       unbiased.eps_supinfonce_with_metrics),
    "eps_supcon": (unbiased.eps_supcon, unbiased.eps_supcon_with_metrics),
    "fairkl": (unbiased.fairkl, unbiased.fairkl_with_metrics),
    "esupcon": (esupcon.esupcon, esupcon.esupcon_with_metrics),
    "unicon": (unicon.unicon, unicon.unicon_with_metrics),
    "fnc": (fnc.fnc, fnc.fnc_with_metrics),
    "fn_removal": (fnc.fn_removal, fnc.fn_removal_with_metrics),
    "bregman": (bregman.bregman, bregman.bregman_with_metrics),
    "excon": (excon.excon, excon.excon_with_metrics),
}

# Inputs beyond (z, labels) that a loss takes as keyword arguments, which the
# trainer supplies: "features" (the encoder's [batch, views, dim] output
# before the projection head), "bias_labels" (the batch's `bias_label`,
# from a dataset that has one), "prototype_cosines" (the model's
# [batch, views, classes] cosines to its class prototypes,
# `config.model.num_prototypes`), "universum" (the embeddings of UniCon's
# universum images, which the trainer makes and embeds) and "bregman_phi"
# (the model's [batch, views, K] Bregman sub-network outputs,
# `config.model.bregman.subnetworks`). "explanations" is not an input but a
# step the trainer runs first: ExCon's saliency-masked views.
EXTRA_INPUTS = ("features", "bias_labels", "prototype_cosines", "universum",
                "bregman_phi", "explanations")
_EXTRA_INPUTS: dict[str, tuple[str, ...]] = {
    "fairkl": ("features", "bias_labels"),
    "esupcon": ("prototype_cosines",),
    "unicon": ("universum",),
    "bregman": ("bregman_phi",),
    "excon": ("explanations",),
}


def names() -> list[str]:
  """The registered loss names, sorted."""
  return sorted(_REGISTRY)


def extra_inputs(name: str) -> tuple[str, ...]:
  """The inputs of `EXTRA_INPUTS` that loss `name` needs (often none)."""
  _lookup(name)
  return _EXTRA_INPUTS.get(name, ())


def _lookup(name: str):
  if name not in _REGISTRY:
    raise ValueError(
        f"Unknown loss {name!r}; registered losses: {', '.join(names())}.")
  return _REGISTRY[name]


def get(name: str) -> Callable[..., object]:
  """The loss function `fn(z, labels=None, *, temperature, **options)`.

  Args:
    name: a registered name (see `names()`).

  Returns:
    The function returning the float32 scalar loss.

  Raises:
    ValueError: if `name` is not registered.
  """
  return _lookup(name)[0]


def get_with_metrics(name: str) -> Callable[..., object]:
  """Like `get`, but the function returns `(loss, metrics)`.

  Args:
    name: a registered name (see `names()`).

  Returns:
    A function with the loss's signature returning `(loss, metrics)`, metrics
    a dict of float32 scalars: `contrastive_acc` (fraction of anchors with a
    positive whose best-scoring other view is a positive), `pos_logit` and
    `neg_logit` (mean similarity / temperature over positive / negative
    pairs).

  Raises:
    ValueError: if `name` is not registered.
  """
  return _lookup(name)[1]
