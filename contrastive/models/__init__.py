"""Models by config: `models.create(config.model)`.

`config.model.name` picks the builder: "resnet" (`encoder.ContrastiveModel`:
one ResNet and head, with optional prototypes, Bregman sub-networks, linear
classifier and predictor) or "multiview_resnet" (`multiview.MultiviewModel`:
CMC's encoder and head per modality of `config.model.modalities`).
"""

from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from contrastive.models import encoder
from contrastive.models import multiview

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _encoder_and_head(model_config: ml_collections.ConfigDict) -> dict:
  """The options every model takes: its ResNet(s) and projection head(s)."""
  return dict(
      depth=model_config.depth,
      width=model_config.width,
      cifar_stem=model_config.cifar_stem,
      head_hidden_dims=tuple(model_config.head.hidden_dims),
      head_out_dim=model_config.head.out_dim,
      head_bn=model_config.head.use_bn,
      bn_momentum=model_config.bn_momentum,
      dtype=DTYPES[model_config.dtype])


def _resnet(model_config: ml_collections.ConfigDict) -> nn.Module:
  return encoder.ContrastiveModel(
      **_encoder_and_head(model_config),
      num_prototypes=model_config.get("num_prototypes", 0),
      bregman_subnetworks=model_config.get("bregman", {}).get(
          "subnetworks", 0),
      bregman_hidden_dim=model_config.get("bregman", {}).get(
          "hidden_dim", 256),
      linear_classes=model_config.get("linear_classes", 0),
      predictor_hidden_dims=tuple(model_config.get("predictor", {}).get(
          "hidden_dims", ())),
      predictor_out_dim=model_config.get("predictor", {}).get("out_dim", 0),
  )


# Options of the single-encoder model that the multiview one does not have.
_SINGLE_ENCODER_OPTIONS = ("num_prototypes", "linear_classes")


def _multiview_resnet(model_config: ml_collections.ConfigDict) -> nn.Module:
  extras = [name for name in _SINGLE_ENCODER_OPTIONS
            if model_config.get(name, 0)]
  if model_config.get("bregman", {}).get("subnetworks", 0):
    extras.append("bregman.subnetworks")
  if model_config.get("predictor", {}).get("out_dim", 0):
    extras.append("predictor.out_dim")
  if extras:
    raise ValueError(f"config.model.name='multiview_resnet' has no {extras}; "
                     "set them to 0 or use name='resnet'.")
  return multiview.MultiviewModel(
      modalities=model_config.get("modalities", "lab"),
      **_encoder_and_head(model_config))


_BUILDERS: dict[str, Callable[[ml_collections.ConfigDict], nn.Module]] = {
    "resnet": _resnet,
    "multiview_resnet": _multiview_resnet,
}


def create(model_config: ml_collections.ConfigDict) -> nn.Module:
  """Builds the model described by `config.model`."""
  if model_config.name not in _BUILDERS:
    raise ValueError(f"Unknown model '{model_config.name}'; use one of "
                     f"{sorted(_BUILDERS)}.")
  if model_config.dtype not in DTYPES:
    raise ValueError(f"config.model.dtype must be one of {sorted(DTYPES)}, "
                     f"got '{model_config.dtype}'.")
  return _BUILDERS[model_config.name](model_config)
