"""Every config loads, is locked against typos, and has a documented command."""

import glob
import importlib
import os

import ml_collections
import pytest

from contrastive import config_checks
from contrastive import losses

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")
PAPER_CONFIGS = sorted(
    os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
    if os.path.basename(p) not in ("__init__.py", "common.py", "cifar.py"))
ARGS = {"simclr_imagenet": [None, "r50x2", "r50x4,epochs=1000"],
        "supcon_imagenet": [None, "r200"],
        "smoke_fashion_mnist": ["simclr", "supcon", "dcl", "dclw",
                                "eps_supinfonce", "eps_supcon", "esupcon",
                                "unicon", "fnc", "fn_removal", "bregman",
                                "excon", "moco", "mochi", "sce", "relic",
                                "renyicl", "paco", "gpaco", "rescom",
                                "cmc", "ifnd", "interclr", "opencon"],
        "rescom_cifar_lt": [None, "dataset=cifar10,imbalance=10"],
        "mochi_imagenet": [None, "start_epoch=15"],
        "excon_cifar100": [None, "epochs=100,explain_from_epoch=0,"
                                 "negative_pair=False"],
        "relic_imagenet": [None, "saliency=0.1,dataset=imagenet_saliency"],
        "fnc_imagenet": [None, "fn_mode=eliminate,support=2"],
        "dcl_imagenet": [None, "dclw"],
        "ce_imagenet": [None, "depth=200,epochs=1"],
        "eps_supinfonce_cifar": [None, "cifar100,method=eps_supcon"],
        "fairkl_biased_fashion_mnist": ["ce", "supcon", "eps_supinfonce",
                                        "fairkl,rho=0.999,epochs=1"]}


def test_the_issue_configs_exist():
  assert set(PAPER_CONFIGS) >= {
      "simclr_imagenet", "supcon_imagenet", "simclr_cifar10",
      "supcon_cifar10", "supcon_cifar100", "smoke_fashion_mnist"}


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_config_loads_and_documents_itself(name):
  module = importlib.import_module(f"configs.{name}")
  doc = module.__doc__
  assert "python -m contrastive.main" in doc
  assert "Expected" in doc or "expected" in doc
  for arg in ARGS.get(name, [None]):
    config = module.get_config(arg)
    assert isinstance(config, ml_collections.ConfigDict)
    assert config.input.batch_size > 0 and config.loss.temperature > 0
    assert config.loss.name in losses.names() or (
        config.trainer == "supervised")


def test_variants_change_the_setting():
  from configs import simclr_imagenet, supcon_imagenet  # pylint: disable=g-import-not-at-top
  assert simclr_imagenet.get_config("r50x4").model.width == 4.0
  r200 = supcon_imagenet.get_config("r200")
  assert (r200.model.depth, r200.input.batch_size, r200.optim.lr,
          r200.total_epochs) == (200, 4096, 0.2, 700.0)
  r50 = supcon_imagenet.get_config("r50")
  assert (r50.input.batch_size, r50.optim.weight_decay) == (6144, 1e-3)
  with pytest.raises(ValueError, match="variant"):
    simclr_imagenet.get_config("r18")
  from configs import mochi_imagenet  # pylint: disable=g-import-not-at-top
  mochi = mochi_imagenet.get_config("start_epoch=15")
  config_checks.validate(mochi)
  assert mochi.loss.kwargs.mix_from_step == 15 * (1_281_167 // 256)
  assert mochi_imagenet.get_config().loss.kwargs.mix_from_step == 0
  with pytest.raises(ValueError, match="start_epoch"):
    mochi_imagenet.get_config("start_epoch=200")
  with pytest.raises(ValueError, match="Unknown config argument"):
    simclr_imagenet.get_config("epoch=3")


def test_locked_config_rejects_unknown_keys():
  from configs import smoke_fashion_mnist  # pylint: disable=g-import-not-at-top
  config = smoke_fashion_mnist.get_config("simclr")
  config.lock()
  with pytest.raises(AttributeError):
    config.optim.learning_rate = 0.1
  with pytest.raises(TypeError):
    config.input.batch_size = "big"
