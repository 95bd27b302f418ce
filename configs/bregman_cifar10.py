r"""SimCLR + deep Bregman divergence on CIFAR-10 (Rezaei et al., arXiv
2109.07455).

Command:
  python -m contrastive.main --config=configs/bregman_cifar10.py \
      --workdir=/tmp/bregman_cifar10 --config.input.data_dir=~/tensorflow_datasets

Hardware: designed for 8 GPUs or a TPU v3-8 / v4-8 (global batch 1024).
Setting: the SupContrast SimCLR CIFAR recipe (configs/cifar.py: ResNet-50,
batch 1024, lr 0.5, tau 0.5, 1000 epochs) plus the Bregman term with K = 16
sub-networks (Dense 256-ReLU-Dense 1 on the 2048-d features), lambd 1,
tau_b = tau. The paper's K, sub-network form, lambd and tau_b are in its
supplementary material (unverified): these are our defaults.
Expected linear-eval top-1: above SimCLR's 93.6 (SupContrast README) per
the abstract's claim that the method outperforms its baseline; the paper's
figures are unverified.
Arg: number of epochs (default 1000).
"""

from configs import cifar
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, epochs=1000)
  config = cifar.cifar_config("cifar10", "simclr", args.epochs)
  config.model.bregman.update(subnetworks=16, hidden_dim=256)
  config.loss.update(name="bregman", use_labels=False)
  config.loss.kwargs = dict(lambd=1.0)
  return config
