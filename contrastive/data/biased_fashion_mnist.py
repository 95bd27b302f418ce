"""TFDS builder `biased_fashion_mnist`: Fashion-MNIST with a colour bias.

The Biased-MNIST protocol of Bahng et al. ("Learning De-biased
Representations with Biased Representations", ICML 2020), applied to
Fashion-MNIST, for the FairKL debiasing experiments of Barbano et al.
("Unbiased Supervised Contrastive Learning", ICLR 2023, arXiv 2211.05568).
Each 28x28 grayscale image gets one of ten background colours, its
`bias_label`:

* `train` is biased: within each class, floor(rho * n_class) images (a seeded
  random subset) get the class's own colour (colour index == class index);
  the others are spread as evenly as possible (seeded) over the nine other
  colours, so P(bias_label == label) is rho up to rounding.
* `test` is unbiased: each image's colour is drawn uniformly from the ten
  colours (seeded), independently of its label.

Configs: `rho0.99`, `rho0.995`, `rho0.997`, `rho0.999` (Bahng et al.'s and
Barbano et al.'s levels) and `rho0.9` (for quick checks), used as
`input.dataset = "biased_fashion_mnist/rho0.99"` etc.

Colouring keeps the garment's grayscale texture and puts the colour in the
background: for pixel intensity p and colour channel c,
`out = round(p + (1 - p / 255) * c)`, so a black pixel (p = 0) becomes the
colour and a white one (p = 255) stays white. Every colour in `COLOURS` has a
zero channel, where `out == p`: the grayscale image is exactly the minimum
over channels.

Determinism: the colour assignment is a function of the source files, rho and
the fixed seeds below (NumPy's PCG64 `Generator`; NumPy does not promise the
same streams across its versions, but a prepared dataset stays as written).
For a class, the aligned subset of a larger rho contains that of a smaller
one (both are prefixes of the same seeded permutation).

The source IDX files are those of `fashion_mnist_idx`
(`contrastive/data/fashion_mnist.py`): `$FASHION_MNIST_DIR`, else Debian's
`dataset-fashion-mnist` folder; preparing needs no network.
"""

import fractions

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from contrastive.data import fashion_mnist

NUM_CLASSES = len(fashion_mnist.CLASS_NAMES)

# Ten well-separated background colours (RGB, uint8): the primaries and
# secondaries, then four half-intensity mixes. Colour k is class k's
# bias-aligned colour. Any two differ by at least 127 in some channel (RGB
# distance >= 127). Every colour has a zero channel, so the grayscale image is
# recoverable exactly as the per-pixel minimum over channels.
COLOURS = np.array([
    (255, 0, 0),  # red
    (0, 255, 0),  # green
    (0, 0, 255),  # blue
    (255, 255, 0),  # yellow
    (255, 0, 255),  # magenta
    (0, 255, 255),  # cyan
    (255, 128, 0),  # orange
    (255, 0, 128),  # rose
    (128, 0, 255),  # violet
    (0, 128, 128),  # teal
], np.uint8)
COLOUR_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange",
                "rose", "violet", "teal")

# Fixed seeds of the colour assignment, per split.
SEEDS = {"train": 2020, "test": 2023}

_CITATION = """\
@inproceedings{bahng2020learning,
  title     = {Learning De-biased Representations with Biased
               Representations},
  author    = {Bahng, Hyojin and Chun, Sanghyuk and Yun, Sangdoo and
               Choo, Jaegul and Oh, Seong Joon},
  booktitle = {International Conference on Machine Learning (ICML)},
  year      = {2020},
}
@inproceedings{barbano2023unbiased,
  title     = {Unbiased Supervised Contrastive Learning},
  author    = {Barbano, Carlo Alberto and Dufumier, Benoit and
               Tartaglione, Enzo and Grangetto, Marco and Gori, Pietro},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2023},
  note      = {arXiv:2211.05568},
}
""" + fashion_mnist._CITATION  # pylint: disable=protected-access


def colorize(images: np.ndarray, colour_indices: np.ndarray) -> np.ndarray:
  """Puts each image's colour in its background, keeping its texture.

  Args:
    images: uint8 [n, H, W] grayscale images.
    colour_indices: int [n] indices into `COLOURS`.

  Returns:
    uint8 [n, H, W, 3]: `round(p + (1 - p / 255) * colour)` per channel.
  """
  p = images.astype(np.float32)[..., None] / 255.0
  colours = COLOURS[np.asarray(colour_indices)].astype(np.float32)
  colours = colours[:, None, None, :]
  # 255 p + (1 - p) c: stays within [0, 255], so rounding cannot overflow.
  out = 255.0 * p + (1.0 - p) * colours
  return np.round(out).astype(np.uint8)


def aligned_count(rho: str | float, n: int) -> int:
  """Returns floor(rho * n), exactly (no float rounding at the boundary)."""
  return int(fractions.Fraction(str(rho)) * n)


def biased_colours(labels: np.ndarray, rho: str | float,
                   seed: int) -> np.ndarray:
  """Colour indices of a biased split (Bahng et al.'s protocol).

  Args:
    labels: int [n] class labels in [0, NUM_CLASSES).
    rho: fraction of each class coloured with the class's own colour.
    seed: seeds the choice of aligned images and the other colours.

  Returns:
    int64 [n] colour indices: in each class of n_k images, exactly
    floor(rho * n_k) equal the class; the rest cover the other nine colours
    with counts that differ by at most one.
  """
  colours = np.empty(len(labels), np.int64)
  for label in range(NUM_CLASSES):
    # A generator per class: one class's size does not move another's draws.
    rng = np.random.default_rng([seed, label])
    members = np.flatnonzero(labels == label)
    members = members[rng.permutation(len(members))]
    num_aligned = aligned_count(rho, len(members))
    colours[members[:num_aligned]] = label
    others = np.array([c for c in range(NUM_CLASSES) if c != label])
    # Cycling a shuffled list gives each colour its share, and the shuffle
    # keeps the leftover images from always going to the same colours.
    others = rng.permutation(others)
    conflicting = members[num_aligned:]
    colours[conflicting] = np.resize(others, len(conflicting))
  return colours


def unbiased_colours(num_examples: int, seed: int) -> np.ndarray:
  """Colour indices of an unbiased split: i.i.d. uniform over the colours."""
  rng = np.random.default_rng(seed)
  return rng.integers(0, len(COLOURS), num_examples, dtype=np.int64)


class BiasedFashionMnistConfig(tfds.core.BuilderConfig):
  """A bias level: the fraction `rho` of bias-aligned train images."""

  def __init__(self, *, rho: str, **kwargs):
    """Makes the config `rho<rho>`.

    Args:
      rho: the fraction, as a decimal string (exact, e.g. "0.995").
      **kwargs: passed to `tfds.core.BuilderConfig`.
    """
    super().__init__(name=f"rho{rho}",
                     description=(f"Train: {rho} of each class in its own "
                                  "colour; test: uniform colours."),
                     **kwargs)
    self.rho = rho


class BiasedFashionMnist(tfds.core.GeneratorBasedBuilder):
  """Colour-biased Fashion-MNIST (28x28x3), from local IDX files."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      BiasedFashionMnistConfig(rho=rho)
      for rho in ("0.99", "0.995", "0.997", "0.999", "0.9")
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    side = fashion_mnist.IMAGE_SIDE
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Fashion-MNIST with a background colour per image (bias_label); "
            f"in train, {self.builder_config.rho} of each class has its "
            "class's colour (Biased-MNIST protocol of Bahng et al., 2020); "
            "test colours are uniform."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(side, side, 3)),
            "label": tfds.features.ClassLabel(
                names=fashion_mnist.CLASS_NAMES),
            "bias_label": tfds.features.ClassLabel(names=COLOUR_NAMES),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/clovaai/rebias",
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    folder = fashion_mnist.checked_source_dir()
    return {split: self._generate_examples(folder, split)
            for split in fashion_mnist.SPLIT_FILES}

  def _generate_examples(self, folder: epath.Path, split: str):
    images, labels = fashion_mnist.read_split(folder, split)
    if split == "train":
      colours = biased_colours(labels, self.builder_config.rho, SEEDS[split])
    else:
      colours = unbiased_colours(len(labels), SEEDS[split])
    coloured = colorize(images, colours)
    for index, (image, label, colour) in enumerate(
        zip(coloured, labels, colours)):
      yield index, {"image": image, "label": int(label),
                    "bias_label": int(colour)}
