r"""SimCLR on CIFAR-10 with the PyTorch SupContrast reference settings.

Command:
  python -m contrastive.main --config=configs/simclr_cifar10.py \
      --workdir=/tmp/simclr_cifar10 --config.input.data_dir=~/tensorflow_datasets

Hardware: designed for 8 GPUs or a TPU v3-8 / v4-8 (global batch 1024).
Setting: see configs/cifar.py (ResNet-50, batch 1024, lr 0.5, tau 0.5,
cosine, 1000 epochs).
Expected linear-eval top-1: 93.6 (HobbitLong/SupContrast README, ResNet-50).
Linear evaluation: the README's linear stage (`linear_eval.protocol=
"supcontrast"`: SGD momentum 0.9, batch 512, lr 5, 100 epochs, cosine).
Arg: number of epochs (default 1000), e.g. `:100`.
"""

from configs import cifar
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, epochs=1000)
  return cifar.cifar_config("cifar10", "simclr", args.epochs)
