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

CMC (`cmc.py`, label-free, no extra inputs, "gather" only) sums a symmetric
cross-view InfoNCE against the global batch over pairs of views that are
different modalities, one encoder per view (a full graph or a core view).

The momentum-encoder / queue losses take more inputs, as keyword arguments
the trainer supplies (see `EXTRA_INPUTS`), and run with `loss_impl="gather"`
only: `keys` float[batch, views, dim] (the momentum encoder's embeddings of
the same views, stop-gradient) and `queue` float[K, dim] (past keys,
replicated; `contrastive/momentum.py` keeps it and the EMA). Each query view
is paired with the other view's key (views 0 and 1 are the key views; see
`moco.py`), against the global batch's keys and the queue. MoCo, MoCHi
(synthetic hard negatives, needs a per-step `rng`), SCE (soft targets from
the keys' similarities), ReLIC (an invariance KL) and RényiCL (a skew-Rényi
surrogate) are label-free (`moco.py`); PaCo and GPaCo (`paco.py`) need
labels, `queue_labels` int[K] (-1: never a positive) and the classifier's
`class_logits` float[batch, views, num_classes] (its class centres); GPaCo
has no momentum encoder and takes no `keys`. ResCom (`rescom.py`) needs
labels, `class_queue` float[C, Q, dim] (its class-balanced queue: Q keys per
class, replicated) and `class_logits`, and no `keys`.

Per-image state: IFND (`ifnd.py`) takes `pseudo_labels` int[batch] (its
clustering's ids; the SupCon kernel with a positives cap of 0 drops the
false negatives), InterCLR (`interclr.py`) MoCo's inputs plus the
`memory_bank`, its `bank_clusters` and the batch's `index`, and OpenCon
(`opencon.py`) `open_labels` (-1: unlabelled) and `prototypes`; the trainer
keeps their tables in the train state (`contrastive/pseudo_labels.py`).

  loss = losses.get("moco")(z, temperature=0.2, keys=k, queue=queue.keys)
"""

from collections.abc import Callable

from contrastive.losses import bregman
from contrastive.losses import cmc
from contrastive.losses import dcl
from contrastive.losses import esupcon
from contrastive.losses import excon
from contrastive.losses import fnc
from contrastive.losses import ifnd
from contrastive.losses import interclr
from contrastive.losses import moco
from contrastive.losses import opencon
from contrastive.losses import paco
from contrastive.losses import rescom
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
    "ifnd": (ifnd.ifnd, ifnd.ifnd_with_metrics),
    "bregman": (bregman.bregman, bregman.bregman_with_metrics),
    "excon": (excon.excon, excon.excon_with_metrics),
    "moco": (moco.moco, moco.moco_with_metrics),
    "mochi": (moco.mochi, moco.mochi_with_metrics),
    "sce": (moco.sce, moco.sce_with_metrics),
    "relic": (moco.relic, moco.relic_with_metrics),
    "renyicl": (moco.renyicl, moco.renyicl_with_metrics),
    "paco": (paco.paco, paco.paco_with_metrics),
    "gpaco": (paco.gpaco, paco.gpaco_with_metrics),
    "rescom": (rescom.rescom, rescom.rescom_with_metrics),
    "cmc": (cmc.cmc, cmc.cmc_with_metrics),
    "interclr": (interclr.interclr, interclr.interclr_with_metrics),
    "opencon": (opencon.opencon, opencon.opencon_with_metrics),
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
# step the trainer runs first: ExCon's saliency-masked views. The
# momentum-encoder losses take "keys" (the momentum encoder's
# [batch, views, dim] embeddings) and "queue" ([K, dim] past keys, from
# `contrastive/momentum.py`); MoCHi also "rng" (a PRNG key per step) and
# "step" (the training step, for its delayed start of the mixing); PaCo
# and GPaCo "queue_labels" ([K] classes of the queue, -1 unknown) and
# "class_logits" (the classifier's [batch, views, num_classes] logits);
# ResCom "class_queue" (its class-balanced queue, float[C, Q, dim] keys, Q
# per class, replicated) and "class_logits". IFND takes "pseudo_labels"
# (int32[batch]: the batch's pseudo-label ids from the trainer's clustering;
# any two samples with the same id are each other's false negatives; ids are
# unique for samples without an accepted pseudo-label). InterCLR also takes
# "memory_bank" (float[N, dim] L2-normalised feature of every training image,
# replicated), "bank_clusters" (int32[N] each row's online k-means cluster,
# -1 not clustered yet) and "index" (int32[batch] each sample's bank row).
# OpenCon takes "open_labels" (int32[batch]: the class of each labelled
# image, -1 for unlabelled ones) and "prototypes" (float[K, dim] EMA class
# prototypes, replicated, kept with `opencon.update_prototypes`).
EXTRA_INPUTS = ("features", "bias_labels", "prototype_cosines", "universum",
                "bregman_phi", "explanations", "keys", "queue", "rng",
                "step", "queue_labels", "class_logits", "class_queue",
                "pseudo_labels", "memory_bank", "bank_clusters", "index",
                "open_labels", "prototypes")
_EXTRA_INPUTS: dict[str, tuple[str, ...]] = {
    "fairkl": ("features", "bias_labels"),
    "esupcon": ("prototype_cosines",),
    "unicon": ("universum",),
    "bregman": ("bregman_phi",),
    "excon": ("explanations",),
    "moco": ("keys", "queue"),
    "mochi": ("keys", "queue", "rng", "step"),
    "sce": ("keys", "queue"),
    "relic": ("keys", "queue"),
    "renyicl": ("keys", "queue"),
    "paco": ("keys", "queue", "queue_labels", "class_logits"),
    "gpaco": ("queue", "queue_labels", "class_logits"),
    "rescom": ("class_queue", "class_logits"),
    "ifnd": ("pseudo_labels",),
    "interclr": ("keys", "queue", "rng", "memory_bank", "bank_clusters",
                 "index"),
    "opencon": ("open_labels", "prototypes"),
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
