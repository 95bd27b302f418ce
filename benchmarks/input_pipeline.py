r"""SimCLR augmentation throughput of the tf.data input pipeline, in views/s.

Feeds synthetic JPEGs (natural-looking ~375 x 500 RGB images, ~76 KB each,
made once and held in memory as encoded strings) through two pipelines that
make two 224 x 224 views per image with the SimCLR ImageNet recipe: random
resized crop (area 8-100 %, aspect 3/4-4/3), flip, colour jitter strength
1.0 with p 0.8, grayscale p 0.2, Gaussian blur p 0.5 (sigma 0.1-2.0, kernel
10 % of the side):

- ours: `contrastive.data.input_pipeline.augmented_batches`, the code
  `pretrain_dataset` runs (fused decode of the crop windows' union, uint8
  until the crop, stateless seeded ops);
- baseline: the same recipe done the way google-research/simclr's
  `tf2/data_util.py` does it, written here from a reading of it (not copied):
  the whole JPEG decoded once per image (TFDS's default decoding), converted
  to float, each view cropped from the float image and resized, colour
  jitter in a random order of nested `tf.cond`s, grayscale, and a
  separable depthwise-conv blur per view (kernel 2 * (S // 20) + 1, SAME
  padding); views concatenated on channels as SimCLR's `map_fn` does.

Stages are cumulative, each a map over images then a batch of 32:

  decode     baseline: full decode; ours: the crop windows' union, fused
  +crop      random resized crop to 224, float32 [0, 1]
  +colour    flip, colour jitter, grayscale
  +blur      Gaussian blur: the whole view recipe
  pipeline   the whole pipeline: seeds, labels, parallel batch of 64 and
             prefetch (ours: `augmented_batches` itself)
  deferred   ours with `augment.on_device`: the pipeline decodes, crops and
             flips, and the jitted train step does colour jitter, grayscale
             and blur (`contrastive/data/device_augment.py`); against the
             baseline's whole pipeline, the same work of which ours leaves
             the device part to the accelerator. For scale, the worker also
             times that device part with JAX on the same CPU cores (a
             64-image batch of 224 px views), printed after the tables.

Cores: each core count runs in a child process pinned to that many CPUs
(`os.sched_setaffinity` before TF starts, so every TF thread inherits it),
with TF_NUM_INTEROP_THREADS / TF_NUM_INTRAOP_THREADS and
`tf.data.Options().threading.private_threadpool_size` set to it and
`max_intra_op_parallelism` 1 (one map call per thread, as the pipeline
runs). Each measurement warms up first (tf.data autotuning, kernel
caches), then counts views over a fixed time.

  .venv/bin/python benchmarks/input_pipeline.py               # ~2.5 min
  .venv/bin/python benchmarks/input_pipeline.py --cores 1 --seconds 2
"""

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# pylint: disable=g-import-not-at-top,wrong-import-position
# Workers are pinned to their cores before exec (`_run_cores`), so TF's
# thread pools, created at import, inherit the pinning.
import ml_collections
import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from configs import common
from contrastive.data import augment
from contrastive.data import input_pipeline

_STAGES = ("decode", "crop", "colour", "blur", "pipeline", "deferred")
_STAGE_NAMES = {"decode": "decode", "crop": "+crop", "colour": "+colour",
                "blur": "+blur", "pipeline": "pipeline",
                "deferred": "pipeline, colour + blur on device"}
_WHOLE = ("pipeline", "deferred")
_SIZE = 224
_VIEWS = 2
_STAGE_BATCH = 32
_PIPELINE_BATCH = 64
_STRENGTH = 1.0


# Synthetic JPEGs.


def make_jpegs(count: int, seed: int = 0, height: int = 375,
               width: int = 500, quality: int = 93) -> list[bytes]:
  """`count` random JPEGs with the statistics of photos, not of noise.

  Sums of upsampled noise at several scales (a 1/f-like spectrum: smooth
  regions, edges and texture), a random colour gradient and a little pixel
  noise; pure noise would compress far worse than a photo, flat images far
  better. At quality 93 a 375 x 500 image takes ~76 KB.
  """
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
  jpegs = []
  for _ in range(count):
    image = np.zeros((height, width, 3), np.float32)
    for cells, amplitude in ((3, 1.0), (12, 0.5), (48, 0.25), (160, 0.15)):
      small = rng.normal(size=(1, max(2, cells * height // width), cells, 3))
      image += amplitude * tf.image.resize(
          small.astype(np.float32), [height, width], "bicubic")[0].numpy()
    image += (rng.uniform(-1, 1, 3) * yy[..., None]
              + rng.uniform(-1, 1, 3) * xx[..., None])
    image = (image - image.min()) / (image.max() - image.min())
    image += rng.normal(scale=0.03, size=image.shape)
    pixels = np.clip(image * 255, 0, 255).astype(np.uint8)
    jpegs.append(tf.io.encode_jpeg(pixels, quality=quality).numpy())
  return jpegs


# Baseline: the google-research/simclr TF2 way.


def _baseline_maybe(fn, prob, x):
  """`fn(x)` with probability `prob` (stateful RNG, as SimCLR)."""
  return tf.cond(tf.random.uniform([]) < prob, lambda: fn(x), lambda: x)


def _baseline_crop(image):
  """Random resized crop of a decoded float image, bicubic to S x S."""
  begin, size, _ = tf.image.sample_distorted_bounding_box(
      tf.shape(image), tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=(0.08, 1.0), max_attempts=100,
      use_image_if_no_bounding_boxes=True)
  crop = tf.slice(image, begin, size)
  return tf.image.resize(crop[None], [_SIZE, _SIZE], method="bicubic")[0]


def _baseline_jitter(image):
  """Brightness, contrast, saturation, hue in a random order."""
  s = 0.8 * _STRENGTH
  ops = (lambda x: x * tf.random.uniform([], max(0.0, 1 - s), 1 + s),
         lambda x: tf.image.random_contrast(x, 1 - s, 1 + s),
         lambda x: tf.image.random_saturation(x, 1 - s, 1 + s),
         lambda x: tf.image.random_hue(x, 0.2 * _STRENGTH))
  order = tf.random.shuffle(tf.range(4))
  for i in range(4):
    k = order[i]
    image = tf.cond(
        k < 2,
        lambda: tf.cond(k < 1, lambda: ops[0](image), lambda: ops[1](image)),
        lambda: tf.cond(k < 3, lambda: ops[2](image), lambda: ops[3](image)))
    image = tf.clip_by_value(image, 0.0, 1.0)
  return image


def _baseline_blur(image):
  """Separable Gaussian blur, sigma ~ U[0.1, 2], kernel ~10 % of the side."""
  sigma = tf.random.uniform([], 0.1, 2.0)
  radius = _SIZE // 20
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernel = tf.exp(-x**2 / (2 * sigma**2))
  kernel /= tf.reduce_sum(kernel)
  horizontal = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, 3, 1])
  vertical = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, 3, 1])
  out = tf.nn.depthwise_conv2d(image[None], horizontal, [1] * 4, "SAME")
  out = tf.nn.depthwise_conv2d(out, vertical, [1] * 4, "SAME")
  return tf.clip_by_value(out[0], 0.0, 1.0)


def _baseline_view(image, stage):
  view = _baseline_crop(image)
  if stage in ("colour", "blur", *_WHOLE):
    view = tf.image.random_flip_left_right(view)
    view = _baseline_maybe(_baseline_jitter, 0.8, view)
    view = _baseline_maybe(
        lambda x: tf.tile(tf.image.rgb_to_grayscale(x), [1, 1, 3]), 0.2, view)
  if stage in ("blur", *_WHOLE):
    view = _baseline_maybe(_baseline_blur, 0.5, view)
  return tf.clip_by_value(view, 0.0, 1.0)


def baseline_dataset(source, stage: str):
  """The baseline's `stage` over (position, (jpeg, labels)) examples."""

  def per_image(position, example):
    del position
    jpeg, labels = example
    image = tf.io.decode_jpeg(jpeg, channels=3)
    if stage == "decode":
      return image[0, 0]
    image = tf.image.convert_image_dtype(image, tf.float32)
    views = [_baseline_view(image, stage) for _ in range(_VIEWS)]
    if stage in _WHOLE:
      return tf.concat(views, axis=-1), labels["label"]
    return tf.stack(views)

  dataset = source.map(per_image, num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=stage in _WHOLE)
  if stage in _WHOLE:
    dataset = dataset.batch(_PIPELINE_BATCH, drop_remainder=True)
    return dataset.prefetch(tf.data.AUTOTUNE)
  return dataset.batch(_STAGE_BATCH)


# Ours: contrastive.data at each stage.


def ours_dataset(source, stage: str):
  """Our pipeline's `stage` over (position, (jpeg, labels)) examples."""
  config = common.simclr_augment(_STRENGTH, blur_prob=0.5)
  config.on_device = stage == "deferred"
  if stage in ("decode", "crop"):
    config.update(flip=False, color_jitter_prob=0.0, grayscale_prob=0.0)
  if stage in ("decode", "crop", "colour"):
    config.blur_prob = 0.0
  seed = tf.constant([0, 0], tf.int64)
  if stage in _WHOLE:
    return input_pipeline.augmented_batches(
        source, seed=seed, local_batch_size=_PIPELINE_BATCH,
        num_views=_VIEWS, image_size=_SIZE, encoded=True, channels=3,
        augment_config=ml_collections.ConfigDict(config))
  # pylint: disable-next=protected-access
  kwargs = input_pipeline._view_kwargs(config)

  def per_image(position, example):
    jpeg, _ = example
    seeds = tf.random.experimental.stateless_split(
        tf.random.experimental.stateless_fold_in(seed, position), _VIEWS)
    if stage == "decode":
      # What `decode_and_random_resized_crops` decodes: the windows' union.
      shape = tf.image.extract_jpeg_shape(jpeg)
      windows = tf.stack([
          tf.stack(augment._sample_crop(  # pylint: disable=protected-access
              shape, tf.unstack(tf.random.experimental.stateless_split(
                  seeds[v], 6))[0], kwargs["area_range"],
              kwargs["aspect_range"]))
          for v in range(_VIEWS)])
      top_left = tf.reduce_min(windows[:, :2], 0)
      bottom_right = tf.reduce_max(windows[:, :2] + windows[:, 2:], 0)
      union = tf.image.decode_and_crop_jpeg(
          jpeg, tf.concat([top_left, bottom_right - top_left], 0), channels=3)
      return union[0, 0]
    return augment.simclr_views(jpeg, seeds, size=_SIZE, encoded=True,
                                channels=3, **kwargs)

  dataset = source.map(per_image, num_parallel_calls=tf.data.AUTOTUNE)
  return dataset.batch(_STAGE_BATCH)


# Measurement.


def _views_per_batch(stage: str) -> int:
  return (_PIPELINE_BATCH if stage in _WHOLE else _STAGE_BATCH) * _VIEWS


def _measure_device_ops(seconds: float) -> float:
  """Views/s of `device_augment.augment_views` jitted on this process's CPUs.

  The accelerator's share of the `deferred` stage, timed on the CPU only
  for scale: on a TPU or GPU it runs beside the encoder.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from contrastive.data import device_augment  # pylint: disable=import-outside-toplevel
  config = common.simclr_augment(_STRENGTH, blur_prob=0.5)
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(_PIPELINE_BATCH, _VIEWS, _SIZE, _SIZE, 3))
  images = jax.device_put(images.astype(np.float32))
  keys = jax.device_put(rng.integers(0, 2**32, (_PIPELINE_BATCH, _VIEWS, 2),
                                     dtype=np.uint32))
  fn = jax.jit(lambda x, k: device_augment.augment_views(
      x, k, color_jitter_prob=config.color_jitter_prob,
      color_strength=config.color_strength,
      grayscale_prob=config.grayscale_prob, blur_prob=config.blur_prob,
      solarize_prob=config.solarize_prob))
  jax.block_until_ready(fn(images, keys))
  start, batches = time.perf_counter(), 0
  while batches < 2 or time.perf_counter() - start < seconds:
    jax.block_until_ready(fn(images, keys))
    batches += 1
  return batches * _PIPELINE_BATCH * _VIEWS / (time.perf_counter() - start)


def _measure(dataset, views_per_batch: int, warmup_s: float,
             seconds: float) -> tuple[float, float]:
  """(views per second, views per CPU-second) after a warm-up.

  Runs `warmup_s` (and at least 2 batches) first, then counts views over
  `seconds` (at least 3 batches). CPU-seconds are this process's, over all
  its threads: on a shared machine they are the load-independent figure
  (for one core, the rate the core would give if the process had it alone).
  """
  iterator = iter(dataset)
  start, batches = time.perf_counter(), 0
  while batches < 2 or time.perf_counter() - start < warmup_s:
    next(iterator)
    batches += 1
  start, cpu_start, batches = time.perf_counter(), time.process_time(), 0
  while batches < 3 or time.perf_counter() - start < seconds:
    next(iterator)
    batches += 1
  views = batches * views_per_batch
  return (views / (time.perf_counter() - start),
          views / (time.process_time() - cpu_start))


def _worker(args) -> None:
  """Measures every stage of both pipelines on `args.worker` cores."""
  cores = args.worker
  tf.config.set_visible_devices([], "GPU")
  with open(args.jpegs, "rb") as f:
    jpegs = pickle.load(f)
  options = tf.data.Options()
  options.threading.private_threadpool_size = cores
  options.threading.max_intra_op_parallelism = 1
  source = tf.data.Dataset.from_tensor_slices(
      (jpegs, {"label": tf.zeros([len(jpegs)], tf.int64)}))
  # Cached in memory, endless, numbered: as `pretrain_dataset` hands
  # (position, (image, labels)) to the augmentation.
  source = source.cache().repeat().enumerate()
  make = {"baseline": baseline_dataset, "ours": ours_dataset}
  for stage in args.stages.split(","):
    for impl in ("baseline", "ours"):
      dataset = make[impl](source, stage).with_options(options)
      rate, cpu_rate = _measure(dataset, _views_per_batch(stage),
                                args.warmup, args.seconds)
      print(json.dumps(dict(cores=cores, stage=stage, impl=impl,
                            views_per_s=rate, views_per_cpu_s=cpu_rate)),
            flush=True)
    if stage == "deferred":
      print(json.dumps(dict(cores=cores, stage="device_ops", impl="jax",
                            views_per_s=_measure_device_ops(args.seconds))),
            flush=True)


def _run_cores(cores: int, jpeg_path: str, args) -> list[dict]:
  """Runs `_worker` in a child pinned to `cores` CPUs; returns its rows."""
  cpus = sorted(os.sched_getaffinity(0))
  if len(cpus) < cores:
    print(f"# only {len(cpus)} CPUs: skipping {cores} cores", flush=True)
    return []
  env = dict(os.environ, TF_NUM_INTEROP_THREADS=str(cores),
             TF_NUM_INTRAOP_THREADS=str(cores), OMP_NUM_THREADS="1",
             TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
  command = [sys.executable, __file__, "--worker", str(cores), "--jpegs",
             jpeg_path, "--stages", args.stages, "--seconds",
             str(args.seconds), "--warmup", str(args.warmup)]
  child = subprocess.run(
      command, env=env, capture_output=True, text=True, check=False,
      preexec_fn=lambda: os.sched_setaffinity(0, cpus[:cores]))
  if child.returncode:
    sys.stderr.write(child.stderr[-4000:])
    raise RuntimeError(f"worker on {cores} cores failed")
  return [json.loads(line) for line in child.stdout.splitlines()
          if line.startswith("{")]


def _table(rows: list[dict], cores_list: list[int], stages: list[str],
           key: str) -> str:
  """Markdown table of `key` per stage: baseline, ours, ratio per core count."""
  rate = {(r["cores"], r["stage"], r["impl"]): r[key] for r in rows
          if key in r}
  header = "| stage |" + "".join(
      f" baseline {c}c | ours {c}c | ours/base {c}c |" for c in cores_list)
  lines = [header, "|---|" + "---:|---:|---:|" * len(cores_list)]
  for stage in stages:
    line = f"| {_STAGE_NAMES[stage]} |"
    for c in cores_list:
      base = rate.get((c, stage, "baseline"))
      ours = rate.get((c, stage, "ours"))
      if base is None or ours is None:
        line += " - | - | - |"
      else:
        line += f" {base:.0f} | {ours:.0f} | {ours / base:.2f}x |"
    lines.append(line)
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cores", default="1,2",
                      help="comma-separated core counts")
  parser.add_argument("--stages", default=",".join(_STAGES))
  parser.add_argument("--images", type=int, default=192,
                      help="distinct synthetic JPEGs, cycled")
  parser.add_argument("--seconds", type=float, default=2.5,
                      help="measured seconds per stage and pipeline")
  parser.add_argument("--warmup", type=float, default=1.0,
                      help="warm-up seconds per stage and pipeline")
  parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument("--jpegs", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    _worker(args)
    return

  started = time.time()
  jpegs = make_jpegs(args.images)
  sizes = [len(j) for j in jpegs]
  print(f"# {len(jpegs)} synthetic JPEGs, 375x500, mean "
        f"{sum(sizes) / len(sizes) / 1e3:.1f} KB "
        f"(min {min(sizes) / 1e3:.0f}, max {max(sizes) / 1e3:.0f}); "
        f"{_VIEWS} views of {_SIZE}x{_SIZE}; views/s, "
        f"{args.warmup:g} s warm-up + {args.seconds:g} s each", flush=True)
  cores_list = [int(c) for c in args.cores.split(",")]
  stages = args.stages.split(",")
  rows = []
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, "jpegs.pkl")
    with open(path, "wb") as f:
      pickle.dump(jpegs, f)
    for cores in cores_list:
      rows += _run_cores(cores, path, args)
  print("\nviews/s (wall clock):")
  print(_table(rows, cores_list, stages, "views_per_s"))
  print("\nviews per CPU-second (all threads of the worker; on a loaded "
        "machine the closer to an idle core's views/s):")
  print(_table(rows, cores_list, stages, "views_per_cpu_s"))
  for row in rows:
    if row["stage"] == "device_ops":
      print(f"# deferred ops (colour jitter, grayscale, blur) jitted with "
            f"JAX on {row['cores']} CPU core(s): "
            f"{row['views_per_s']:.0f} views/s")
  print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} CPUs, load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}, "
        f"{time.time() - started:.0f} s")


if __name__ == "__main__":
  main()
