r"""False negatives in self-supervised contrastive learning: FNC and FNR.

Both find, for every sample, the views of other samples that are probably
of the same (unknown) class, with FNC's detector (`infonce.FalseNegatives`):
score each column by its best cosine with any view of the sample, keep the
`fn_topk` best columns whose score exceeds `fn_threshold`. Then, for an
anchor view i of sample k with positives P(i) (k's other views), the loss
is NT-Xent over every view of the batch with the false negatives F(k):

  fnc (attraction, FNC's default): P(i) u F(k) are the positives,
    L_i = -1/|P u F| sum_{p in P u F} s_ip + log sum_{a != i} exp(s_ia)
  fnc with fn_mode="eliminate", and fn_removal: F(k) leaves the denominator,
    L_i = -1/|P| sum_{p in P} s_ip + log sum_{a != i, a not in F} exp(s_ia)

FNC's support views are more views of each image: `config.input.views` =
2 + support size (FNC uses 8 support views, so 10 views). They are anchors
and columns like the two main views, as in the official `objective.py`
(its loss is twice our mean over anchors, the NT-Xent convention of summing
both orderings). The detector is not differentiated (masks only). Every
(anchor, column) pair's mask is needed, so these run with
`loss_impl="gather"`.

`fn_removal` is the false-negative removal that Gupta et al. propose
against the adversarial susceptibility of contrastive learning; their
detection rule is not public (no code), so FNC's detector stands in, on
the two views of SimCLR (no support views), and the removal is the
elimination above. Evaluate robustness with
`python -m contrastive.evaluation.robustness`.

References:
  Huynh et al., "Boosting Contrastive Self-Supervised Learning with False
  Negative Cancellation", WACV 2022, arXiv 2011.11765; code
  https://github.com/google-research/fnc (`objective.py`, flags
  `support_size` 8, `fn_topk` 10, `fn_threshold` 0.7).
  Gupta et al., "Contrastive Self-Supervised Learning Leads to Higher
  Adversarial Susceptibility", arXiv 2207.10862.
"""

import jax

from contrastive.losses import infonce
from contrastive.losses import supcon


def _loss(z, labels, *, name, temperature, detector, loss_impl, block_size):
  if labels is not None:
    raise ValueError(f"{name} is self-supervised and takes no labels; with "
                     "labels there are no false negatives to detect.")
  supcon.validate_inputs(z, None, temperature=temperature)
  return supcon.family_loss(
      z, None, temperature=temperature,
      spec=infonce.Spec(false_negatives=detector), loss_impl=loss_impl,
      block_size=block_size)


_FNC_FLAGS = infonce.FalseNegatives()  # the official mode, topk and threshold


def detector_for(loss_name: str, *, fn_mode: str | None = None,
                 fn_topk: int = _FNC_FLAGS.topk,
                 fn_threshold: float = _FNC_FLAGS.threshold
                 ) -> infonce.FalseNegatives:
  """The detector that loss `loss_name` ("fnc" or "fn_removal") runs with
  these `config.loss.kwargs`."""
  if loss_name == "fn_removal":
    if fn_mode not in (None, "eliminate"):
      raise ValueError(f"fn_removal always eliminates; got fn_mode="
                       f"{fn_mode!r}. Use fnc for fn_mode='attract'.")
    fn_mode = "eliminate"
  elif loss_name != "fnc":
    raise ValueError(f"{loss_name!r} has no false-negative detector; only "
                     "fnc and fn_removal do.")
  return infonce.FalseNegatives(fn_mode or _FNC_FLAGS.mode, fn_topk,
                                fn_threshold)


def fnc_with_metrics(z: jax.Array, labels: None = None, *, temperature,
                     fn_mode: str = _FNC_FLAGS.mode,
                     fn_topk: int = _FNC_FLAGS.topk,
                     fn_threshold: float = _FNC_FLAGS.threshold,
                     loss_impl: str = "gather",
                     block_size: int | None = None):
  """FNC loss and metrics.

  Args:
    z: float[batch, views, dim] L2-normalised embeddings of every view (main
      and support), may be sharded on `batch`.
    labels: must be None.
    temperature: softmax temperature tau > 0.
    fn_mode: "attract" or "eliminate".
    fn_topk: columns per sample the detector may flag.
    fn_threshold: cosine a flagged column must exceed.
    loss_impl: must be "gather".
    block_size: unused by "gather".

  Returns:
    (loss, metrics): `supcon.supcon_with_metrics`'s metrics (over the label
    masks, i.e. the sample's own views) plus `false_negatives_per_anchor`.
  """
  return _loss(z, labels, name="fnc", temperature=temperature,
               detector=detector_for("fnc", fn_mode=fn_mode, fn_topk=fn_topk,
                                     fn_threshold=fn_threshold),
               loss_impl=loss_impl, block_size=block_size)


def fn_removal_with_metrics(z: jax.Array, labels: None = None, *,
                            temperature, fn_topk: int = _FNC_FLAGS.topk,
                            fn_threshold: float = _FNC_FLAGS.threshold,
                            loss_impl: str = "gather",
                            block_size: int | None = None):
  """False-negative removal (Gupta et al.): `fnc` in "eliminate" mode;
  arguments as `fnc_with_metrics`."""
  return _loss(z, labels, name="fn_removal", temperature=temperature,
               detector=detector_for("fn_removal", fn_topk=fn_topk,
                                     fn_threshold=fn_threshold),
               loss_impl=loss_impl, block_size=block_size)


def fnc(z, labels=None, **options) -> jax.Array:
  """FNC loss; see `fnc_with_metrics`."""
  return fnc_with_metrics(z, labels, **options)[0]


def fn_removal(z, labels=None, **options) -> jax.Array:
  """False-negative removal loss; see `fn_removal_with_metrics`."""
  return fn_removal_with_metrics(z, labels, **options)[0]
