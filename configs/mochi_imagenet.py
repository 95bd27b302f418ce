r"""MoCHi on ImageNet-1k: MoCo v2 with synthetic hard negatives (Kalantidis
et al., NeurIPS 2020, arXiv 2010.01028).

Command (8 accelerators; TFDS imagenet2012 under data_dir):
  python -m contrastive.main --config=configs/mochi_imagenet.py \
      --workdir=gs://BUCKET/mochi_r50_200ep --config.input.data_dir=gs://BUCKET/tfds

Hardware: as MoCo v2 (configs/moco_imagenet.py): global batch 256, 8 GPUs or
a TPU v3-8 / v4-8; the mixing adds N-of-K top-k and (s + s') extra logits
per anchor, small next to the encoder.
Setting: MoCo v2's recipe (ResNet-50, tau 0.2, queue 65536, momentum 0.999
constant, SGD lr 0.03 at batch 256, wd 1e-4, cosine, 200 epochs, head
2048-ReLU-128) with MoCHi(N, s, s') = MoCHi(1024, 512, 256): per query the
N = 1024 hardest queue entries, s = 512 mixes of two of them and s' = 256
mixes of the query with one of them as extra negatives (loss options
`num_hard`, `num_mix`, `num_query_mix`).
Expected linear-eval top-1 (ImageNet val): about 68.0 for MoCHi(1024, 512,
256) at 200 epochs against MoCo v2's 67.5 (methods.md section 7, from the
abstract page; unverified); MoCo's linear protocol
(`linear_eval.protocol="moco"`). The paper's other (N, s, s') settings are
reachable with the args below; their figures are unverified and not quoted.
Mixing starts at epoch `start_epoch` (loss option `mix_from_step`, here
start_epoch x 5004 steps of batch 256; the metric `mochi_mixing` shows when
it is on). The paper also trains variants whose mixing starts later; their
start epochs and figures are unverified and not quoted, so the default is
0, mixing from the first step. If you change input.batch_size, set
--config.loss.kwargs.mix_from_step to match.
Deviations: those of configs/moco_imagenet.py (symmetrised loss with the
batch's keys as negatives as well, both keys enqueued, global BN). The
queue starts as random unit vectors, so with start_epoch=0 the first 128
steps mix partly random negatives.
Args: `n=1024,s=512,s_prime=256,epochs=200,start_epoch=0`.
"""

from configs import common
from configs import moco_imagenet

IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config(arg=None):
  args = common.parse_arg(arg, n=1024, s=512, s_prime=256, epochs=200,
                          start_epoch=0)
  config = moco_imagenet.mocov2_config(args.epochs)
  if not 1 <= args.n <= config.momentum.queue_size:
    raise ValueError(f"n (N = {args.n}) must be between 1 and the queue size "
                     f"{config.momentum.queue_size}.")
  config.loss.update(name="mochi", temperature=0.2, use_labels=False)
  if not 0 <= args.start_epoch < args.epochs:
    raise ValueError(f"start_epoch ({args.start_epoch}) must be in "
                     f"[0, epochs = {args.epochs}).")
  steps_per_epoch = IMAGENET_TRAIN_IMAGES // config.input.batch_size
  config.loss.kwargs = dict(
      num_hard=args.n, num_mix=args.s, num_query_mix=args.s_prime,
      mix_from_step=int(args.start_epoch * steps_per_epoch))
  return config
