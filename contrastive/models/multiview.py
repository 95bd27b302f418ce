"""One encoder per modality of an image: CMC's multiview model.

Contrastive Multiview Coding (Tian et al., ECCV 2020, arXiv 1906.05849)
splits each image into modalities (its default: the L and the ab channels of
Lab colour) and embeds each with its own encoder and head; the loss
(`contrastive/losses/cmc.py`) contrasts the modalities of the same image
against those of the others. `MultiviewModel(x, train)` returns

  {"features": concat_m h_m  [batch, sum of feature dims],
   "embedding": z            [batch, M, dim]  (L2-normalised per modality)}

The trainer folds the modality axis into the view axis (view-major:
augmentation view v, modality m is view v * M + m), so a loss sees
[batch, views * M, dim]. Linear evaluation reads the concatenated features,
as CMC evaluates the concatenation of its L and ab encoders.

Modalities (`MODALITIES`), computed inside the model from the [0, 1] image
(after the augmentation, as CMC converts the augmented RGB crop):
  - "lab": RGB -> CIE Lab (sRGB, D65 white); view 0 = L / 100, view 1 =
    (a, b) / 128. CMC normalises by its dataset's channel statistics; this
    fixed scaling keeps each channel within about [-1, 1] for any data.
  - "intensity_gradients", for grayscale data (no colour to split): view 0
    = the image, view 1 = its horizontal and vertical Sobel derivatives / 4
    (in [-1, 1]). Like L / ab, one view carries the values and the other
    how they change; the pair is our choice, CMC has no grayscale setting.
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastive.models import encoder
from contrastive.models import resnet

# sRGB (linear) -> XYZ under D65, and the D65 white point (IEC 61966-2-1).
_RGB_TO_XYZ = ((0.4124564, 0.3575761, 0.1804375),
               (0.2126729, 0.7151522, 0.0721750),
               (0.0193339, 0.1191920, 0.9503041))
_D65_WHITE = (0.95047, 1.0, 1.08883)


def rgb_to_lab(rgb: jax.Array) -> jax.Array:
  """CIE Lab (L in [0, 100], a and b about [-128, 127]) of sRGB in [0, 1]."""
  rgb = rgb.astype(jnp.float32)
  linear = jnp.where(rgb <= 0.04045, rgb / 12.92,
                     ((jnp.maximum(rgb, 0.04045) + 0.055) / 1.055) ** 2.4)
  xyz = jnp.einsum("...c,xc->...x", linear, jnp.asarray(_RGB_TO_XYZ),
                   precision=jax.lax.Precision.HIGHEST)
  t = xyz / jnp.asarray(_D65_WHITE)
  epsilon = (6 / 29) ** 3
  f = jnp.where(t > epsilon, jnp.cbrt(jnp.maximum(t, epsilon)),
                t / (3 * (6 / 29) ** 2) + 4 / 29)
  lightness = 116 * f[..., 1] - 16
  a = 500 * (f[..., 0] - f[..., 1])
  b = 200 * (f[..., 1] - f[..., 2])
  return jnp.stack([lightness, a, b], axis=-1)


def lab_views(images: jax.Array) -> list[jax.Array]:
  """[L / 100, (a, b) / 128] of RGB images [N, H, W, 3]."""
  if images.shape[-1] != 3:
    raise ValueError(f"The 'lab' modalities need RGB images, got "
                     f"{images.shape[-1]} channel(s); use "
                     "'intensity_gradients' for grayscale data.")
  lab = rgb_to_lab(images)
  return [lab[..., :1] / 100.0, lab[..., 1:] / 128.0]


def intensity_gradient_views(images: jax.Array) -> list[jax.Array]:
  """[image, Sobel (d/dx, d/dy) / 4] of grayscale images [N, H, W, 1]."""
  if images.shape[-1] != 1:
    raise ValueError(f"The 'intensity_gradients' modalities need 1-channel "
                     f"images, got {images.shape[-1]}; use 'lab' for RGB.")
  images = images.astype(jnp.float32)
  smooth = jnp.array([1.0, 2.0, 1.0])
  difference = jnp.array([-1.0, 0.0, 1.0])
  # Cross-correlation kernels [3, 3, in=1, out=2]: d/dx and d/dy.
  kernels = jnp.stack([jnp.outer(smooth, difference),
                       jnp.outer(difference, smooth)], axis=-1)[:, :, None, :]
  padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  gradients = jax.lax.conv_general_dilated(
      padded, kernels, window_strides=(1, 1), padding="VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)
  return [images, gradients / 4.0]


MODALITIES: dict[str, Callable[[jax.Array], list[jax.Array]]] = {
    "lab": lab_views,
    "intensity_gradients": intensity_gradient_views,
}


class MultiviewModel(nn.Module):
  """A ResNet encoder and a projection head per modality."""
  modalities: str = "lab"
  depth: int = 50
  width: float = 1.0
  cifar_stem: bool = False
  head_hidden_dims: Sequence[int] = (2048,)
  head_out_dim: int = 128
  head_bn: bool = True
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  def setup(self):
    if self.modalities not in MODALITIES:
      raise ValueError(f"Unknown modalities {self.modalities!r}; use one of "
                       f"{sorted(MODALITIES)}.")
    # Two modalities for every entry of MODALITIES.
    self.encoders = [
        resnet.ResNet(depth=self.depth, width=self.width,
                      cifar_stem=self.cifar_stem,
                      bn_momentum=self.bn_momentum, dtype=self.dtype)
        for _ in range(2)]
    self.heads = [
        encoder.ProjectionHead(
            hidden_dims=tuple(self.head_hidden_dims),
            out_dim=self.head_out_dim, use_bn=self.head_bn,
            bn_momentum=self.bn_momentum, dtype=self.dtype)
        for _ in range(2)]

  def _views(self, x):
    return MODALITIES[self.modalities](x)

  def __call__(self, x, train: bool):
    features, embeddings = [], []
    for view, encode, head in zip(self._views(x), self.encoders, self.heads):
      h = encode(view, train=train)
      features.append(h.astype(jnp.float32))
      embeddings.append(encoder.l2_normalize(head(h, train=train)))
    return {"features": jnp.concatenate(features, axis=-1),
            "embedding": jnp.stack(embeddings, axis=1)}

  def features(self, x):
    """The modality encoders' concatenated features (BN in inference)."""
    return jnp.concatenate(
        [encode(view, train=False).astype(jnp.float32)
         for view, encode in zip(self._views(x), self.encoders)], axis=-1)
