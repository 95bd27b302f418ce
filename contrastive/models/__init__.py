"""Models by config: `models.create(config.model)`."""

import jax.numpy as jnp
import ml_collections

from contrastive.models import encoder

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def create(model_config: ml_collections.ConfigDict) -> encoder.ContrastiveModel:
  """Builds the encoder + head described by `config.model`."""
  if model_config.name != "resnet":
    raise ValueError(f"Unknown model '{model_config.name}'; only 'resnet' "
                     "is implemented.")
  if model_config.dtype not in DTYPES:
    raise ValueError(f"config.model.dtype must be one of {sorted(DTYPES)}, "
                     f"got '{model_config.dtype}'.")
  return encoder.ContrastiveModel(
      depth=model_config.depth,
      width=model_config.width,
      cifar_stem=model_config.cifar_stem,
      head_hidden_dims=tuple(model_config.head.hidden_dims),
      head_out_dim=model_config.head.out_dim,
      head_bn=model_config.head.use_bn,
      bn_momentum=model_config.bn_momentum,
      dtype=DTYPES[model_config.dtype],
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
