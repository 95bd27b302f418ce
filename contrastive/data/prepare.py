r"""Prepares a TFDS dataset once, so that training can read it.

  python -m contrastive.data.prepare imagenet2012 \
      --data_dir=$HOME/tensorflow_datasets --manual_dir=$HOME/imagenet_tars
  python -m contrastive.data.prepare cifar10 --data_dir=DIR   # needs the network once
  python -m contrastive.data.prepare cifar_lt/cifar10_if100 --data_dir=DIR

TFDS's own `tfds build` command needs apache_beam, which the pinned
environment does not install (and which only Beam-based datasets use); this
entry point calls the same `download_and_prepare` through the Python API and
knows this package's builders (`fashion_mnist_idx`, `fashion_mnist_lt`,
`cifar_lt`, `open_world`, `biased_fashion_mnist`) without `--imports`.

For ImageNet, `--manual_dir` holds the official ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar. TFDS labels the validation images by their position
in the sorted list of file names (its `validation_labels.txt` holds the 50000
labels in that order): a partial validation tar must be a prefix of the
official names, ILSVRC2012_val_00000001.JPEG upwards, or its labels are wrong.
"""

import os
import sys

from absl import app
from absl import flags

# The modules whose import registers this package's TFDS builders.
BUILDER_MODULES = (
    "contrastive.data.fashion_mnist",
    "contrastive.data.long_tail",
    "contrastive.data.open_world",
    "contrastive.data.biased_fashion_mnist",
)


class DatasetNotPreparedError(FileNotFoundError):
  """A dataset (or the source it derives from) is not prepared; the message
  says which command prepares it."""


def expand_path(path: str | None) -> str | None:
  """`~` and `$VARIABLES` expanded: shells leave them in `--flag=~/x`."""
  if not path:
    return path
  return os.path.expandvars(os.path.expanduser(path))


def command(dataset: str, data_dir: str, manual_dir: str | None = None) -> str:
  """The shell command that prepares `dataset` in `data_dir`."""
  manual = f" --manual_dir={manual_dir}" if manual_dir else ""
  return (f"python -m contrastive.data.prepare {dataset} "
          f"--data_dir={data_dir}{manual}")


def _import_builders() -> None:
  import importlib  # pylint: disable=g-import-not-at-top
  for module in BUILDER_MODULES:
    importlib.import_module(module)


def prepare(dataset: str, data_dir: str | None = None,
            manual_dir: str | None = None):
  """Downloads (where it can) and prepares `dataset`; returns its builder.

  Raises:
    DatasetNotPreparedError: the dataset needs manual files that are not in
      `manual_dir`, with what to put there.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  _import_builders()
  data_dir, manual_dir = expand_path(data_dir), expand_path(manual_dir)
  builder = tfds.builder(dataset, data_dir=data_dir)
  instructions = builder.MANUAL_DOWNLOAD_INSTRUCTIONS
  if instructions and not builder.is_prepared():
    folder = manual_dir or os.path.join(builder.data_dir_root, "downloads",
                                        "manual")
    if not os.path.isdir(folder) or not os.listdir(folder):
      raise DatasetNotPreparedError(
          f"TFDS dataset '{dataset}' needs manually downloaded files in "
          f"{folder}, which is {'empty' if os.path.isdir(folder) else 'missing'}"
          f". {' '.join(instructions.split())} Then run "
          f"`{command(dataset, builder.data_dir_root, '<that folder>')}`.")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("Name one dataset, e.g. `python -m "
                         "contrastive.data.prepare imagenet2012 --data_dir=DIR "
                         "--manual_dir=DIR`.")
  try:
    builder = prepare(argv[1], flags.FLAGS.data_dir, flags.FLAGS.manual_dir)
  except DatasetNotPreparedError as e:
    sys.exit(f"FATAL {e}")
  splits = ", ".join(f"{name} {split.num_examples}"
                     for name, split in sorted(builder.info.splits.items()))
  print(f"Prepared {builder.info.full_name} in {builder.data_dir}: {splits}.")


def _define_flags() -> None:
  # Only when run as a command: `contrastive.main` imports this module.
  flags.DEFINE_string(
      "data_dir", None, "TFDS data_dir to prepare the dataset in (the run's "
      "input.data_dir); default $TFDS_DATA_DIR or ~/tensorflow_datasets.")
  flags.DEFINE_string(
      "manual_dir", None, "Folder with the manually downloaded source files, "
      "for datasets that need them (ImageNet's tars); default "
      "<data_dir>/downloads/manual.")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
