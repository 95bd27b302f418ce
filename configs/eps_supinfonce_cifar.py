r"""epsilon-SupInfoNCE / epsilon-SupCon on CIFAR (Barbano et al., ICLR 2023).

Command:
  python -m contrastive.main \
      --config=configs/eps_supinfonce_cifar.py:cifar10,epsilon=0.25 \
      --workdir=/tmp/eps_supinfonce_cifar10 \
      --config.input.data_dir=~/tensorflow_datasets

Hardware: designed for 1-8 GPUs or a TPU v3-8 (global batch 256).
Setting: the defaults of the official code's SupContrast fork
(EIDOSLAB/unbiased-contrastive-learning, `contrastive/main_supcon.py`):
ResNet-50 with the CIFAR stem, batch 256, SGD lr 0.05 (no batch scaling),
wd 1e-4, cosine, 1000 epochs, tau 0.07 with the loss scaled by tau / 0.07,
two SupContrast views; the margin epsilon (in logit units) is an argument
(the fork's flag default is 0; the per-table epsilon is unverified).
Expected linear-eval top-1: above SupCon's (96.0 CIFAR-10, 76.5 CIFAR-100
with ResNet-50) per the abstract; the paper's exact figures are unverified.
Linear evaluation: the SupContrast linear stage (`supcontrast` protocol).
Args: dataset `cifar10` | `cifar100`, `method=eps_supinfonce|eps_supcon`,
`epsilon=...`, `epochs=...`.
"""

from configs import cifar
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, dataset="cifar10", method="eps_supinfonce",
                          epsilon=0.25, epochs=1000)
  if args.dataset not in ("cifar10", "cifar100"):
    raise ValueError(f"dataset must be 'cifar10' or 'cifar100', got "
                     f"{args.dataset!r}.")
  if args.method not in ("eps_supinfonce", "eps_supcon"):
    raise ValueError(f"method must be 'eps_supinfonce' or 'eps_supcon', got "
                     f"{args.method!r}.")
  config = cifar.cifar_config(args.dataset, "supcon", args.epochs)
  config.input.batch_size = 256
  config.optim.update(lr=0.05, warmup_epochs=0)
  config.loss.update(name=args.method, temperature=0.07, use_labels=True)
  config.loss.kwargs = dict(epsilon=args.epsilon, base_temperature=0.07)
  return config
