r"""SupCon on CIFAR-100 with the PyTorch SupContrast reference settings.

Command:
  python -m contrastive.main --config=configs/supcon_cifar100.py \
      --workdir=/tmp/supcon_cifar100 --config.input.data_dir=~/tensorflow_datasets

Hardware: designed for 8 GPUs or a TPU v3-8 / v4-8 (global batch 1024).
Setting: see configs/cifar.py (ResNet-50, batch 1024, lr 0.5, tau 0.1,
cosine, 1000 epochs).
Expected linear-eval top-1: 76.5 (HobbitLong/SupContrast README, ResNet-50).
Linear evaluation: the README's linear stage (`linear_eval.protocol=
"supcontrast"`: SGD momentum 0.9, batch 512, lr 5, 100 epochs, cosine).
Arg: number of epochs (default 1000), e.g. `:100`.
"""

from configs import cifar
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, epochs=1000)
  return cifar.cifar_config("cifar100", "supcon", args.epochs)
