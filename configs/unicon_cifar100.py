r"""UniCon on CIFAR-100 (Han & Chen, arXiv 2204.10695; official code
hannaiiyanggit/UniCon).

Command:
  python -m contrastive.main --config=configs/unicon_cifar100.py \
      --workdir=/tmp/unicon_cifar100 --config.input.data_dir=~/tensorflow_datasets

Hardware: designed for 1-8 GPUs or a TPU v3-8 (global batch 256; every
step embeds 2 x 256 views and 2 x 256 universum images).
Setting: the official README's: ResNet-50 (CIFAR stem), batch 256, SGD
momentum 0.9 lr 0.05, wd 1e-4, warm-up + cosine, tau 0.1 (base tau 0.1: no
scaling), mixup universum with lam 0.5, head 2048-2048-128, 1000 epochs;
linear stage batch 512, lr 5 (the `supcontrast` protocol).
Expected linear-eval top-1: 81.7 with ResNet-50 (README/abstract: 81.68;
ResNet-18 79.2), against SupCon's 76.5 at batch 1024.
Args: `mix=mixup|cutmix`, `epochs=1000`.
"""

from configs import cifar
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, mix="mixup", epochs=1000)
  config = cifar.cifar_config("cifar100", "supcon", args.epochs)
  config.model.head.update(hidden_dims=(2048, 2048), out_dim=128,
                           use_bn=False)
  config.input.batch_size = 256
  config.optim.update(lr=0.05)
  config.loss.update(name="unicon", temperature=0.1, use_labels=True)
  config.loss.kwargs = dict(lam=0.5, mix=args.mix)
  return config
