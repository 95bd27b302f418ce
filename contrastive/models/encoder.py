"""Encoder + projection head -> L2-normalised embeddings.

`ContrastiveModel(x, train)` returns `{"features": h, "embedding": z}`:
h is the pooled encoder output (what linear evaluation reads), z the
normalised projection the contrastive loss consumes. With `num_prototypes`
> 0 the model also holds learnable class prototypes w_c in z's space and
returns `"prototype_cosines"`: z . w_c / |w_c| (ESupCon's classifier).
With `bregman_subnetworks` = K > 0 it returns `"bregman_phi"`: the K
outputs phi_k(h) of the deep Bregman divergence's sub-networks, each an MLP
on the encoder features (see `contrastive/losses/bregman.py`).

Heads:
  - SimCLR: `hidden_dims=(2048, 2048), out_dim=128, use_bn=True`
    (Linear-BN-ReLU twice, then Linear-BN without bias or ReLU, as in
    google-research/simclr `ProjectionHead`, `proj_out_dim=128`).
  - SupCon TF: `hidden_dims=(), out_dim=128` (one dense layer).

Mixed precision (`dtype=jnp.bfloat16`): the encoder and the head compute in
bf16, every parameter is float32 (`param_dtype`), BN statistics are reduced
in float32, and every output is float32: the projection is cast before the
L2 normalisation, so the similarity matmul and log-sum-exp of every loss,
the prototype cosines, the Bregman sub-networks (float32 throughout) and the
online probe see float32.
"""

from collections.abc import Sequence
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastive.models import resnet


class ProjectionHead(nn.Module):
  """MLP head computing in `dtype`; returns `[batch, out_dim]` in `dtype`."""
  hidden_dims: Sequence[int] = (2048, 2048)
  out_dim: int = 128
  use_bn: bool = True
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32
  # BN after the output layer too (SimCLR's head); False for predictors
  # (MoCo v3, BYOL), whose output layer has a bias instead.
  final_bn: bool = True

  @nn.compact
  def __call__(self, h, train: bool):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=1e-5,
                             dtype=self.dtype, param_dtype=jnp.float32)
    dense = functools.partial(nn.Dense, use_bias=not self.use_bn,
                              dtype=self.dtype, param_dtype=jnp.float32)
    x = h
    for dim in self.hidden_dims:
      x = dense(dim)(x)
      if self.use_bn:
        x = norm()(x)
      x = nn.relu(x)
    last_bn = self.use_bn and self.final_bn
    x = dense(self.out_dim, use_bias=not last_bn)(x)
    if last_bn:
      x = norm(use_bias=False)(x)
    return x


class BregmanSubnetworks(nn.Module):
  """K independent MLPs h -> scalar (Dense-ReLU-Dense each), batched, each
  output standardised over the batch (BatchNorm without scale or bias).

  Why standardised: raw, the sub-networks' offsets differ by several times
  their spread across images, so one or two of them win the argmax for every
  image; the Bregman softmax then sees identical columns (loss log(2N - 1),
  no gradient), and once a second winner appears nothing bounds phi's scale
  and the term is driven to 0 by growing phi (measured: grad norm 1e19 and a
  non-finite loss at step 506 of a Fashion-MNIST run). Per-k standardisation
  spreads the winners over the K pieces and fixes phi's scale; D is still
  the Bregman divergence of the convex max(.) in phi's space.

  Float32 whatever the encoder's dtype: phi enters the loss as logits, and
  these layers are small next to the encoder.
  """
  num: int
  hidden_dim: int = 256
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, h, train: bool):
    h = h.astype(jnp.float32)
    hidden = nn.relu(nn.DenseGeneral(
        (self.num, self.hidden_dim), dtype=jnp.float32,
        param_dtype=jnp.float32)(h))
    kernel = self.param("out_kernel", nn.initializers.lecun_normal(),
                        (self.num, self.hidden_dim), jnp.float32)
    bias = self.param("out_bias", nn.initializers.zeros, (self.num,),
                      jnp.float32)
    phi = jnp.einsum("bkh,kh->bk", hidden, kernel) + bias
    return nn.BatchNorm(
        use_running_average=not train, use_bias=False, use_scale=False,
        momentum=self.bn_momentum, epsilon=1e-5, dtype=jnp.float32,
        param_dtype=jnp.float32)(phi)


def l2_normalize(x, eps=1e-12):
  x = x.astype(jnp.float32)
  return x * jnp.reciprocal(
      jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps)))


class ContrastiveModel(nn.Module):
  """ResNet encoder + projection head; images `[batch, H, W, C]`."""
  depth: int = 50
  width: float = 1.0
  cifar_stem: bool = False
  head_hidden_dims: Sequence[int] = (2048, 2048)
  head_out_dim: int = 128
  head_bn: bool = True
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32
  num_prototypes: int = 0
  bregman_subnetworks: int = 0
  bregman_hidden_dim: int = 256
  linear_classes: int = 0
  predictor_hidden_dims: Sequence[int] = ()
  predictor_out_dim: int = 0

  def setup(self):
    self.encoder = resnet.ResNet(
        depth=self.depth, width=self.width, cifar_stem=self.cifar_stem,
        bn_momentum=self.bn_momentum, dtype=self.dtype)
    self.head = ProjectionHead(
        hidden_dims=tuple(self.head_hidden_dims), out_dim=self.head_out_dim,
        use_bn=self.head_bn, bn_momentum=self.bn_momentum, dtype=self.dtype)
    if self.num_prototypes:
      self.prototypes = self.param(
          "prototypes", nn.initializers.normal(stddev=1.0),
          (self.num_prototypes, self.head_out_dim), jnp.float32)
    if self.bregman_subnetworks:
      self.bregman = BregmanSubnetworks(self.bregman_subnetworks,
                                        self.bregman_hidden_dim,
                                        bn_momentum=self.bn_momentum)
    if self.predictor_out_dim:
      # MoCo v3 / BYOL: the online branch predicts the key encoder's
      # projection; the key encoder's own output is its projection.
      self.predictor = ProjectionHead(
          hidden_dims=tuple(self.predictor_hidden_dims),
          out_dim=self.predictor_out_dim, use_bn=True, final_bn=False,
          bn_momentum=self.bn_momentum, dtype=self.dtype)
    if self.linear_classes:
      # PaCo's parametric class centres: a linear classifier on the
      # features, trained by the loss with the encoder.
      self.classifier = nn.Dense(self.linear_classes, dtype=jnp.float32,
                                 param_dtype=jnp.float32)

  def __call__(self, x, train: bool):
    h = self.encoder(x, train=train)
    # `l2_normalize` casts the (bf16 under mixed precision) projection to
    # float32 first: what reaches any loss is float32.
    projection = self.head(h, train=train)
    z = l2_normalize(projection)
    outputs = {"features": h, "embedding": z}
    if self.predictor_out_dim:
      outputs["embedding"] = l2_normalize(self.predictor(projection,
                                                         train=train))
      # What a key encoder contributes: the projection, not the prediction.
      outputs["target_embedding"] = z
    if self.num_prototypes:
      outputs["prototype_cosines"] = jnp.matmul(
          z, l2_normalize(self.prototypes).T,
          precision=jax.lax.Precision.HIGHEST)
    if self.bregman_subnetworks:
      outputs["bregman_phi"] = self.bregman(h, train=train)
    if self.linear_classes:
      outputs["class_logits"] = self.classifier(h.astype(jnp.float32))
    return outputs

  def classify(self, x):
    """Class scores of images (BN in inference mode), argmax = the
    predicted class: the prototype cosines (ESupCon), else the linear
    classifier's logits (PaCo)."""
    outputs = self(x, train=False)
    if self.num_prototypes:
      return outputs["prototype_cosines"]
    return outputs["class_logits"]

  def features(self, x):
    """Frozen-encoder features for evaluation (BN in inference mode)."""
    return self.encoder(x, train=False)
