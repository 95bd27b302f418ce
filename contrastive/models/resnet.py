"""ResNet v1.5 (stride on the 3x3 conv) with a width multiplier and CIFAR stem.

Depths 10/18/34 use basic blocks, 50/101/152/200 bottlenecks; ResNet-10 (one
basic block per stage) is the tests' encoder, where depth is not under test.
`width` scales every stage (ResNet-50 x2 and x4 of SimCLR are `width=2, 4`;
a narrow CPU model is `width=0.25`). `cifar_stem=True` replaces the 7x7/2
conv and max-pool by a 3x3/1 conv, as small-image SimCLR/SupCon runs do
(lightly #1419).

References:
  He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
  Goyal et al., "Accurate, Large Minibatch SGD", 2017 (zero-init last BN).
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

STAGE_SIZES = {
    10: (1, 1, 1, 1),
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
}


class BasicBlock(nn.Module):
  filters: int
  strides: int
  norm: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             param_dtype=jnp.float32)
    y = conv(self.filters, (3, 3), self.strides, padding=1)(x)
    y = nn.relu(self.norm()(y))
    y = conv(self.filters, (3, 3), padding=1)(y)
    # Zero-init of the last BN makes each block start as identity.
    y = self.norm(scale_init=nn.initializers.zeros)(y)
    if x.shape[-1] != self.filters or self.strides != 1:
      x = self.norm()(conv(self.filters, (1, 1), self.strides)(x))
    return nn.relu(x + y)


class BottleneckBlock(nn.Module):
  filters: int
  strides: int
  norm: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             param_dtype=jnp.float32)
    y = nn.relu(self.norm()(conv(self.filters, (1, 1))(x)))
    y = conv(self.filters, (3, 3), self.strides, padding=1)(y)
    y = nn.relu(self.norm()(y))
    y = conv(self.filters * 4, (1, 1))(y)
    y = self.norm(scale_init=nn.initializers.zeros)(y)
    if x.shape[-1] != self.filters * 4 or self.strides != 1:
      x = self.norm()(conv(self.filters * 4, (1, 1), self.strides)(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """Returns globally average-pooled float32 features `[batch, channels]`.

  `dtype` is the compute dtype of convolutions and BN outputs; parameters
  are float32 and BN statistics are reduced in float32 (Flax's default).
  """
  depth: int = 50
  width: float = 1.0
  cifar_stem: bool = False
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    if self.depth not in STAGE_SIZES:
      raise ValueError(f"ResNet depth {self.depth} not in {sorted(STAGE_SIZES)}.")
    norm = functools.partial(
        nn.BatchNorm, use_running_average=not train,
        momentum=self.bn_momentum, epsilon=1e-5, dtype=self.dtype,
        param_dtype=jnp.float32)
    block = BasicBlock if self.depth < 50 else BottleneckBlock
    stem_filters = max(int(64 * self.width), 8)
    x = x.astype(self.dtype)
    if self.cifar_stem:
      x = nn.Conv(stem_filters, (3, 3), padding=1, use_bias=False,
                  dtype=self.dtype, param_dtype=jnp.float32,
                  name="stem_conv")(x)
      x = nn.relu(norm(name="stem_bn")(x))
    else:
      x = nn.Conv(stem_filters, (7, 7), 2, padding=3, use_bias=False,
                  dtype=self.dtype, param_dtype=jnp.float32,
                  name="stem_conv")(x)
      x = nn.relu(norm(name="stem_bn")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, num_blocks in enumerate(STAGE_SIZES[self.depth]):
      filters = max(int(64 * self.width * 2**stage), 8)
      for i in range(num_blocks):
        strides = 2 if stage > 0 and i == 0 else 1
        x = block(filters, strides, norm, self.dtype)(x)
      # Each stage's output, for explanations (Grad-CAM, `saliency.py`):
      # its value when "intermediates" is mutable, its gradient through a
      # zero "perturbations" variable when one is passed; otherwise no-ops.
      # Not at init, so that the model's variables stay params and BN stats.
      if not self.is_initializing():
        self.sow("intermediates", f"stage{stage}", x)
        x = self.perturb(f"stage{stage}", x)
    # Pooled in float32: the features feed the head, probes and losses.
    return jnp.mean(x, axis=(1, 2), dtype=jnp.float32)
