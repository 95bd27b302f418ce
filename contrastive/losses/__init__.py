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
dim) or O(local * dim) (see `streaming.py`).
"""

from collections.abc import Callable

from contrastive.losses import supcon

# name -> (loss, loss_with_metrics). The second returns `(loss, metrics)`,
# metrics a dict of float32 scalars: `contrastive_acc`, `pos_logit`,
# `neg_logit`.
_REGISTRY: dict[str, tuple[Callable[..., object], Callable[..., object]]] = {
    "simclr": (supcon.simclr, supcon.simclr_with_metrics),
    "supcon": (supcon.supcon, supcon.supcon_with_metrics),
}


def names() -> list[str]:
  """The registered loss names, sorted."""
  return sorted(_REGISTRY)


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
