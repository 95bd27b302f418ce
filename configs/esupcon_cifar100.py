r"""ESupCon on CIFAR-100: SupCon with learnable class prototypes, the
classifier scored directly (Aljundi et al., arXiv 2211.03646).

Command:
  python -m contrastive.main --config=configs/esupcon_cifar100.py \
      --workdir=/tmp/esupcon_cifar100 --config.input.data_dir=~/tensorflow_datasets

Hardware: designed for 8 GPUs or a TPU v3-8 / v4-8 (global batch 1024).
Setting: the SupContrast CIFAR recipe (configs/cifar.py: ResNet-50, batch
1024, SGD lr 0.5, tau 0.1 without the tau / 0.07 scaling, 1000 epochs) with 100 class
prototypes in the contrast set. No public code: the prototype weighting,
tau and normalisation are unverified (ours: equal weight, normalised
prototypes, the same tau).
Expected: the prototype classifier's top-1 (`classifier_eval.json`) above
CE's 75.3 (SupContrast README) per the abstract's "significant improvement
over standard CE"; the paper's figures are unverified. The linear probe and
kNN of the frozen encoder run as for every method.
Arg: number of epochs (default 1000).
"""

from configs import cifar
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, epochs=1000)
  config = cifar.cifar_config("cifar100", "supcon", args.epochs)
  config.model.num_prototypes = 100
  config.loss.update(name="esupcon", use_labels=True)
  config.loss.kwargs = dict()
  return config
