"""Checks config values before anything is built, each with a one-line fix.

Unknown keys and wrong types are refused earlier, by the locked config
(`main.py`); this catches values that parse but cannot work.
"""

import inspect
import numbers

import ml_collections

from contrastive import losses
from contrastive.losses import streaming
from contrastive.losses import supcon

RESUME_POLICIES = ("auto", "force")
NONFINITE_POLICIES = ("raise", "skip")


def _check_choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"config.{name}={value!r} is not one of {choices}; set "
                     f"--config.{name}={choices[0]}.")


def _check_positive(name: str, value) -> None:
  if not isinstance(value, numbers.Real) or not value > 0:
    raise ValueError(f"config.{name} must be a number > 0, got {value!r}.")


def _check_loss(loss_config: ml_collections.ConfigDict) -> None:
  _check_choice("loss.name", loss_config.name, tuple(losses.names()))
  _check_positive("loss.temperature", loss_config.temperature)
  _check_choice("loss.loss_impl", loss_config.loss_impl,
                tuple(streaming.IMPLS))
  kwargs = dict(loss_config.kwargs)
  accepted = inspect.signature(
      losses.get_with_metrics(loss_config.name)).parameters
  # The trainer's inputs, and the training class counts it passes to the
  # class-balanced losses.
  supplied = set(losses.extra_inputs(loss_config.name)) | {"class_counts"}
  unknown = sorted(set(kwargs) - set(accepted) | (set(kwargs) & supplied))
  if unknown:
    options = sorted(k for k, p in accepted.items()
                     if p.kind == p.KEYWORD_ONLY and k != "temperature"
                     and k not in supplied)
    raise ValueError(f"config.loss.kwargs has option(s) {unknown} that loss "
                     f"'{loss_config.name}' does not take; it takes "
                     f"{options}.")
  if loss_config.get("class_prior", False) and "class_prior" not in accepted:
    takers = [name for name in losses.names() if "class_prior" in
              inspect.signature(losses.get_with_metrics(name)).parameters]
    raise ValueError(
        f"config.loss.class_prior is set but loss '{loss_config.name}' takes "
        f"no class prior; only {takers} do. Unset it.")
  if "variant" in kwargs:
    _check_choice("loss.kwargs.variant", kwargs["variant"], supcon.VARIANTS)
  if "contrast_mode" in kwargs:
    _check_choice("loss.kwargs.contrast_mode", kwargs["contrast_mode"],
                  supcon.CONTRAST_MODES)
  if "base_temperature" in kwargs:
    _check_positive("loss.kwargs.base_temperature", kwargs["base_temperature"])


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad value and what to set instead."""
  _check_choice("resume", config.resume, RESUME_POLICIES)
  _check_choice("nonfinite", config.nonfinite, NONFINITE_POLICIES)
  _check_loss(config.loss)
  for name in ("log_every_steps", "checkpoint_every_steps",
               "keep_checkpoints", "input.batch_size"):
    value = config
    for part in name.split("."):
      value = value[part]
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"config.{name} must be an integer >= 1, got "
                       f"{value!r}.")
  # 0 steps evaluates the initialisation (the random-encoder baseline).
  if config.total_steps is not None and config.total_steps < 0:
    raise ValueError(f"config.total_steps must be >= 0 (or unset to use "
                     f"total_epochs), got {config.total_steps}.")
  if config.online_eval.every_steps < 0:
    raise ValueError("config.online_eval.every_steps must be >= 0 (0: no "
                     f"periodic evaluation), got "
                     f"{config.online_eval.every_steps}.")
  if config.online_eval.probe:
    _check_positive("online_eval.probe_learning_rate",
                    config.online_eval.probe_learning_rate)
