r"""ResNet-18 SupCon train step on CPU: our JAX step against PyTorch.

Both steps train ResNet-18 with the CIFAR stem (3x3/1 conv, no max-pool;
stages 64-128-256-512, BN after every conv, zero-init last BN of each block)
and SupContrast's head (512-ReLU-128, no BN) on 32 x 32 RGB, 128 images x 2
views = 256 views folded into the batch (BN over all 256), with SupCon L_out
at tau 0.1 (scaled by tau / 0.07, as configs/cifar.py) and SGD momentum 0.9,
weight decay 1e-4 on kernels only (the project's CIFAR SupCon optimizer, so
no LARS substitution was needed):

- jax: the project's own `models.create`, `losses.get_with_metrics("supcon")`,
  `optim.create` and `train.train_step`, jitted on one device with the state
  donated (as `training_loop` does, minus the non-finite guard). It also
  computes the loss metrics, grad and param norms.
- torch: the same network, loss (SupContrast's `SupConLoss`) and optimizer
  written here; NCHW (PyTorch's default, oneDNN convolutions).

Same process, same batch, same thread count (`NPROC` for XLA's intra-op
pool, read when the backend starts; `torch.set_num_threads`); after a
warm-up step of each, rounds run every step once in turn, and the ratio is
the median over rounds of torch time / JAX time (= JAX img/s / torch img/s),
so load from other processes hits both alike. JAX variants are the same
step compiled with other XLA:CPU options (`VARIANTS`), in the same process.

  .venv/bin/python benchmarks/train_step.py               # ~3 min
  .venv/bin/python benchmarks/train_step.py --variants jax jax_no_xnnpack \
      jax_onednn jax_fast_math jax_xnn_graph --sharded 8
  .venv/bin/python benchmarks/train_step.py --profile /tmp/ts_profile
  .venv/bin/python benchmarks/train_step.py --convs        # convs alone
  .venv/bin/python benchmarks/train_step.py \
      --xla-flags=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution

Findings (2026-11-29, 2-core x86_64 AMD EPYC with AVX-512, shared with
another training run and tests: load average 8-10, so absolute rates are
depressed ~2x; ratios are the figures to read). Ratio = JAX / torch img/s:

- XLA defaults (jaxlib 0.10.2): 0.50 and 0.54 in two runs (12.9 and 11.8 vs
  6.4-6.5 s per step) -- the issue's "half PyTorch's speed".
- Where it goes (`--profile`, one traced step, thunk time summed over
  threads): weight-gradient convolutions 45 % at 22 GFLOP/s, transposes
  feeding them 20 %, forward convs 16 % (61 GFLOP/s), data-gradient convs
  15 % (68 GFLOP/s), BN/ReLU/optimizer elementwise 3 %, BN reductions 1 %.
  PyTorch: `convolution_backward` 51 % (data + filter, 73 GFLOP/s),
  forward convs 24 % (77 GFLOP/s), BN 9 %, ReLU and adds ~7 %.
  By default XLA:CPU hands weight-gradient (and at this size forward)
  convolutions to YNNPACK (`__ynn_fusion`): a weight gradient is a
  convolution of the transposed activation ([C, H, W, N]) with the output
  gradient as a 32 x 32 "window", which YNNPACK runs at 22 GFLOP/s.
- The fix, a CPU-only XLA option: no YNNPACK convolutions.
  `--xla_cpu_experimental_ynn_fusion_type=-individual_convolution` (in
  XLA_FLAGS; keeps YNNPACK dots and reductions): 0.80; every YNNPACK fusion
  off (`jax_no_ynn`): 0.85, 0.77 and 0.89 in three runs; convolutions then
  run in XLA's Eigen convolution thunk. Alone (`--convs`), weight gradients
  go from 1.4-5.1x PyTorch's time to 0.96-1.2x; forward and data-gradient
  convolutions are 0.8-1.4x either way. Loss unchanged (7.936694 vs 7.936695).
  Same option with the step sharded over 8 simulated devices
  (`--sharded 8`, batch-sharded as in training): 0.98.
- No effect (within noise, same run as the defaults): oneDNN
  (`xla_cpu_use_onednn`) 0.51, fast math 0.51, XNNPACK off 0.49, XNN graph
  fusion (greedy) 0.49. YNNPACK for dots only (compile option
  `LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT`): 0.49 -- slower than both the
  defaults-minus-convolutions and no YNNPACK at all; not analysed.
- Model-side, rejected: the weight gradient as 9 per-tap dots or as one
  im2col dot (custom VJP; same values to 1e-6) is 1.8-7x slower than XLA's
  Eigen convolution at stages 1-3 (3.6 s / 2.7 s vs 0.48 s at 32x32x64) and
  faster only at 4x4x512 (0.16 vs 0.33 s), so no change to resnet.py.
  Layout: Flax convs are NHWC; XLA:CPU canonicalises every convolution to
  NHWC/HWIO anyway, and the transposes are those of the weight-gradient
  formulation, which a model layout cannot remove. The state is already
  donated; default f32 precision is already full precision on CPU.
- With the option, the remaining gap is the transposes of the weight-
  gradient convolutions (~50 % of the measured thunk time) and BN/ReLU
  elementwise passes (unfused into the convolutions, unlike oneDNN's
  post-ops in PyTorch). With Eigen convolutions the trace only times their
  launch (they run asynchronously), so `--profile` understates them.
"""

import argparse
import collections
import glob
import gzip
import json
import math
import os
import re
import shutil
import statistics
import sys
import time

# The thread counts and host devices must be set before JAX (XLA reads NPROC
# for its intra-op pool and XLA_FLAGS at backend start) and torch start.
_PARSER = argparse.ArgumentParser(description=__doc__.split("\n")[0])
_PARSER.add_argument("--batch", type=int, default=128,
                     help="Global batch in images (x --views views).")
_PARSER.add_argument("--views", type=int, default=2)
_PARSER.add_argument("--size", type=int, default=32, help="Image side.")
_PARSER.add_argument("--width", type=float, default=1.0,
                     help="ResNet width multiplier (1.0: 64-128-256-512).")
_PARSER.add_argument("--threads", type=int, default=os.cpu_count(),
                     help="Intra-op threads of both frameworks.")
_PARSER.add_argument("--rounds", type=int, default=3,
                     help="Timed rounds; each runs every variant once.")
_PARSER.add_argument("--warmup", type=int, default=1,
                     help="Untimed steps of each variant after compiling.")
_PARSER.add_argument("--variants", nargs="+", default=["jax", "jax_no_ynn"],
                     help="JAX variants (see VARIANTS) timed against torch.")
_PARSER.add_argument("--xla-flags", default="",
                     help="Appended to XLA_FLAGS for every JAX step of the "
                     "process (per-variant options override them).")
_PARSER.add_argument("--sharded", type=int, default=0,
                     help="Also time the step sharded over this many "
                     "simulated host devices (e.g. 8); 0: off.")
_PARSER.add_argument("--convs", action="store_true",
                     help="Instead: time each stage's 3x3 convolution "
                     "(forward, data and filter gradients) in both.")
_PARSER.add_argument("--profile", default="",
                     help="Directory: write a jax.profiler trace of one step "
                     "of each JAX variant and a torch.profiler table.")
ARGS = _PARSER.parse_args() if __name__ == "__main__" else None

if ARGS is not None:
  os.environ["NPROC"] = str(ARGS.threads)
  os.environ.setdefault("OMP_NUM_THREADS", str(ARGS.threads))
  if ARGS.xla_flags:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " " + ARGS.xla_flags)
  if ARGS.sharded:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") +
        f" --xla_force_host_platform_device_count={ARGS.sharded}")

# pylint: disable=g-import-not-at-top,wrong-import-position
import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from configs import cifar
from contrastive import losses
from contrastive import models
from contrastive import optim
from contrastive import sharding
from contrastive import state as state_lib
from contrastive import train

NUM_CLASSES = 10
TOTAL_STEPS = 1000  # For the schedules only: the learning rate is not 0.

# JAX variants: XLA debug options passed to this step's compile only, so
# that every variant runs in the same process as the PyTorch step.
VARIANTS = {
    "jax": {},
    # Every convolution and dot through XLA's own thunks (Eigen) rather than
    # XNNPACK.
    "jax_no_xnnpack": {"xla_cpu_use_xnnpack": False},
    # No YNNPACK fusions (by default weight-gradient convolutions and the BN
    # reductions run in YNNPACK).
    "jax_no_ynn": {"xla_cpu_experimental_ynn_fusion_type": ""},
    # YNNPACK for dots only: every convolution in the convolution thunk.
    "jax_ynn_dots_only": {"xla_cpu_experimental_ynn_fusion_type":
                          "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
    "jax_onednn": {"xla_cpu_use_onednn": True},
    "jax_fast_math": {"xla_cpu_enable_fast_math": True},
    "jax_xnn_graph": {"xla_cpu_experimental_xnn_graph_fusion_mode":
                      "XNN_GRAPH_FUSION_MODE_GREEDY"},
}


def make_config(args):
  """The SupCon CIFAR setting (configs/cifar.py) with ResNet-18.

  SupContrast's ResNet-18: CIFAR stem, head 512-ReLU-128 without BN; SGD
  momentum 0.9, weight decay 1e-4 on kernels only, tau 0.1 with the loss
  scaled by tau / 0.07.
  """
  config = cifar.cifar_config("cifar10", "supcon", 1000)
  config.model.update(depth=18, width=args.width)
  config.model.head.update(hidden_dims=(int(512 * args.width),))
  config.input.update(batch_size=args.batch, views=args.views,
                      image_size=args.size)
  return config


def make_batch(args, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(
      size=(args.batch, args.views, args.size, args.size, 3)).astype(
          np.float32)
  labels = rng.integers(0, NUM_CLASSES, size=args.batch).astype(np.int32)
  return images, labels


# ----------------------------------------------------------------------------
# JAX: the project's own model, loss, optimizer and train step.
# ----------------------------------------------------------------------------


def jax_step(args, batch, devices, compiler_options=None):
  """Returns `run()`: one jitted train step (state donated), synchronised."""
  config = make_config(args)
  model = models.create(config.model)
  schedule = optim.learning_rate_schedule(config.optim, args.batch,
                                          TOTAL_STEPS, 10)
  tx = optim.create(config.optim, schedule)
  mesh = sharding.make_mesh(devices=devices)
  image_shape = (args.size, args.size, 3)
  state = state_lib.create_train_state(model, tx, jax.random.key(0),
                                       image_shape, mesh)
  step = functools.partial(
      train.train_step, model=model, tx=tx,
      loss_fn=losses.get_with_metrics(config.loss.name),
      loss_config=config.loss, schedule=schedule)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  replicated = sharding.replicated(mesh)
  with jax.set_mesh(mesh):
    batch = sharding.make_global_batch(
        mesh, {"image": batch[0], "label": batch[1]})
    compiled = jax.jit(
        step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,)).lower(state, batch).compile(compiler_options)
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], batch)
    return float(jax.device_get(metrics["loss"]))

  return run, compiled


# ----------------------------------------------------------------------------
# PyTorch: the same network, loss and optimizer, written for this benchmark.
# ----------------------------------------------------------------------------


class BasicBlock(nn.Module):

  def __init__(self, in_planes, planes, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    nn.init.zeros_(self.bn2.weight)
    self.shortcut = nn.Sequential()
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Sequential(
          nn.Conv2d(in_planes, planes, 1, stride, bias=False),
          nn.BatchNorm2d(planes))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + self.shortcut(x))


class TorchSupConNet(nn.Module):
  """ResNet-18 (CIFAR stem) + 512-ReLU-128 head, L2-normalised output."""

  def __init__(self, width=1.0):
    super().__init__()
    planes = [max(int(64 * width * 2**s), 8) for s in range(4)]
    self.stem = nn.Sequential(
        nn.Conv2d(3, planes[0], 3, 1, 1, bias=False),
        nn.BatchNorm2d(planes[0]), nn.ReLU())
    blocks, in_planes = [], planes[0]
    for stage, p in enumerate(planes):
      for i in range(2):
        blocks.append(BasicBlock(in_planes, p, 2 if stage and not i else 1))
        in_planes = p
    self.blocks = nn.Sequential(*blocks)
    self.head = nn.Sequential(nn.Linear(in_planes, int(512 * width)),
                              nn.ReLU(), nn.Linear(int(512 * width), 128))

  def forward(self, x):
    h = self.blocks(self.stem(x)).mean(dim=(2, 3))
    return F.normalize(self.head(h), dim=1)


def torch_supcon(z, labels, temperature=0.1, base_temperature=0.07):
  """SupContrast's `SupConLoss` (L_out, contrast_mode "all") on `[B, V, D]`."""
  batch, views = z.shape[:2]
  mask = torch.eq(labels[:, None], labels[None, :]).float()
  features = torch.cat(torch.unbind(z, dim=1), dim=0)
  logits = features @ features.T / temperature
  logits = logits - logits.max(dim=1, keepdim=True).values.detach()
  mask = mask.repeat(views, views)
  logits_mask = 1 - torch.eye(batch * views)
  mask = mask * logits_mask
  exp_logits = torch.exp(logits) * logits_mask
  log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
  mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1).clamp(min=1)
  return -(temperature / base_temperature) * mean_log_prob_pos.mean()


def torch_step(args, batch, channels_last=False):
  """Returns `run()`: one forward + backward + SGD step."""
  torch.manual_seed(0)
  config = make_config(args)
  net = TorchSupConNet(args.width).train()
  decay = [p for p in net.parameters() if p.ndim > 1]
  no_decay = [p for p in net.parameters() if p.ndim <= 1]
  opt = torch.optim.SGD(
      [{"params": decay, "weight_decay": config.optim.weight_decay},
       {"params": no_decay, "weight_decay": 0.0}],
      lr=config.optim.lr, momentum=config.optim.momentum)
  images = torch.from_numpy(batch[0])  # [B, V, H, W, C]
  # Views folded into the batch as the JAX step does (image-major); the
  # loss takes them back to [B, V, D].
  x = images.reshape(-1, *images.shape[2:]).permute(0, 3, 1, 2).contiguous()
  if channels_last:
    net = net.to(memory_format=torch.channels_last)
    x = x.to(memory_format=torch.channels_last)
  labels = torch.from_numpy(batch[1]).long()

  def run():
    opt.zero_grad(set_to_none=True)
    z = net(x).reshape(args.batch, args.views, -1)
    loss = torch_supcon(z, labels, config.loss.temperature,
                        config.loss.kwargs.base_temperature)
    loss.backward()
    opt.step()
    return float(loss.detach())

  return run, net


# ----------------------------------------------------------------------------
# Profiles: where each framework spends the step, by kind of op.
# ----------------------------------------------------------------------------

_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%(?P<name>\S+) = (?P<shape>\S+) (?P<op>[a-z\-]+)\(")


def _hlo_instructions(hlo_text):
  """name -> (shape text, opcode, whole line) of every HLO instruction."""
  out = {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      out[m["name"]] = (m["shape"], m["op"], line)
  return out


def _dims(shape_text):
  m = re.match(r"\w+\[([\d,]*)\]", shape_text)
  return tuple(int(d) for d in m[1].split(",") if d) if m else ()


def _classify_conv(line, instructions):
  """('conv fwd' | 'conv bwd-data' | 'conv bwd-filter', GFLOP)."""
  shape = _dims(line.split(" = ")[1].split(" ")[0])
  operands = re.search(r"convolution\(%(\S+), %([^)\s,]+)\)", line)
  kernel = _dims(instructions[operands[2]][0]) if operands else ()
  window = [int(w) for w in re.search(r"size=([\dx]+)", line)[1].split("x")]
  dilation = re.search(r"lhs_dilate=([\dx]+)", line)
  dilation = math.prod(int(d) for d in dilation[1].split("x")) if dilation else 1
  # kernel is [*window, in, out] (01io): 2 x out elements x window x in,
  # skipping the zeros of a dilated input (data gradient of a strided conv).
  flops = 2 * math.prod(shape) * math.prod(kernel[:-1]) // max(dilation, 1)
  # At these image sizes every activation is >= 2 x 2 while weight gradients
  # come out as [in, kh, kw, out] with kh, kw in (1, 3) and the activation
  # as the "window".
  if shape[1:3] in ((3, 3), (1, 1)) and tuple(window) not in ((3, 3), (1, 1)):
    kind = "conv bwd-filter"
  elif "transpose(jvp" in line:
    kind = "conv bwd-data"
  else:
    kind = "conv fwd"
  return kind, flops / 1e9


def _classify(name, instructions, fused):
  """Category and GFLOP of a top-level instruction (a thunk)."""
  if name not in instructions:
    return "other", 0.0
  _, op, line = instructions[name]
  if op == "convolution":
    return _classify_conv(line, instructions)
  if op == "fusion":
    body = fused.get(re.search(r"calls=%([\w.\-]+)", line)[1], "")
    conv = re.search(r"^.*= \S+ convolution\(.*$", body, re.M)
    if conv:
      kind, flops = _classify_conv(conv[0], instructions)
      return kind, flops
    if " dot(" in body:
      return "matmul", 0.0
    if "__ynn_fusion" in line and " reduce(" in body:
      return "reduce (YNN: BN statistics, bias grads)", 0.0
    if name.startswith(("transpose", "copy")):
      return "transpose / copy", 0.0
    if " reduce(" in body:
      return "reduce fusion", 0.0
    return "elementwise fusion (BN, ReLU, optimizer)", 0.0
  if op in ("copy", "transpose"):
    return "transpose / copy", 0.0
  if op == "dot":
    return "matmul", 0.0
  return op, 0.0


def _fused_computations(hlo_text):
  bodies, current, lines = {}, None, []
  for line in hlo_text.splitlines():
    m = re.match(r"^%(\S+) \(.*\{$", line)
    if m:
      current, lines = m[1], []
    elif line.startswith("}") and current:
      bodies[current], current = "\n".join(lines), None
    elif current:
      lines.append(line)
  return bodies


def profile_jax(run, compiled, directory, name):
  """Traces one step; returns {category: (ms, GFLOP, count)} and the top ops.

  The XLA:CPU runtime records one trace event per executed thunk, named after
  its top-level HLO instruction; each is classified from the compiled HLO.
  Durations are summed over threads, so they can exceed the step's wall time
  where thunks ran concurrently.
  """
  run()
  trace_dir = os.path.join(directory, name)
  shutil.rmtree(trace_dir, ignore_errors=True)
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    start = time.perf_counter()
    run()
    wall = time.perf_counter() - start
  (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"),
                      recursive=True)
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  hlo = compiled.as_text()
  with open(os.path.join(directory, f"{name}.hlo.txt"), "w") as f:
    f.write(hlo)
  instructions = _hlo_instructions(hlo.split("\nENTRY", 1)[1])
  everything = _hlo_instructions(hlo)
  fused = _fused_computations(hlo)
  categories = collections.defaultdict(lambda: [0.0, 0.0, 0])
  ops = collections.Counter()
  for e in events:
    if e.get("ph") != "X" or e.get("name") not in instructions:
      continue
    kind, gflop = _classify(e["name"], everything, fused)
    entry = categories[kind]
    entry[0] += e["dur"] / 1e3
    entry[1] += gflop
    entry[2] += 1
    ops[(kind, e["name"], instructions[e["name"]][0])] += e["dur"] / 1e3
  return wall, dict(categories), ops


def profile_torch(run):
  """Traces one step; returns (wall seconds, key_averages sorted by self)."""
  run()
  with torch.profiler.profile(
      activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    start = time.perf_counter()
    run()
    wall = time.perf_counter() - start
  return wall, prof.key_averages()


def conv_table(args, repeats=3):
  """Times the 3x3 stride-1 convolution of each stage alone, both ways.

  Forward, data gradient and filter gradient of `[views, s, s, c]` with a
  `[3, 3, c, c]` kernel: JAX as jitted `lax.conv_general_dilated` (NHWC,
  HWIO, as Flax) and its VJPs, torch as `conv2d` and
  `aten.convolution_backward` (NCHW, the default). Best of `repeats`, ms.
  """
  views = args.batch * args.views
  rows = []
  for stage in range(4):
    size = args.size // 2**stage
    c = max(int(64 * args.width * 2**stage), 8)
    rng = np.random.default_rng(stage)
    x = rng.standard_normal((views, size, size, c), np.float32)
    w = rng.standard_normal((3, 3, c, c), np.float32) * 0.05
    g = rng.standard_normal((views, size, size, c), np.float32)

    def conv(x, w):
      return jax.lax.conv_general_dilated(
          x, w, (1, 1), ((1, 1), (1, 1)),
          dimension_numbers=("NHWC", "HWIO", "NHWC"))

    jx, jw, jg = (jax.device_put(a) for a in (x, w, g))
    jax_fns = {
        "fwd": (jax.jit(conv), (jx, jw)),
        "bwd-data": (jax.jit(lambda w, g: jax.vjp(
            lambda x: conv(x, w), jx)[1](g)[0]), (jw, jg)),
        "bwd-filter": (jax.jit(lambda x, g: jax.vjp(
            lambda w: conv(x, w), jw)[1](g)[0]), (jx, jg)),
    }
    tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    tw = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous()
    tg = torch.from_numpy(g).permute(0, 3, 1, 2).contiguous()

    def backward(mask):
      return lambda: torch.ops.aten.convolution_backward(
          tg, tx, tw, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)

    torch_fns = {
        "fwd": lambda: F.conv2d(tx, tw, padding=1),
        "bwd-data": backward([True, False, False]),
        "bwd-filter": backward([False, True, False]),
    }
    gflop = 2 * views * size * size * 9 * c * c / 1e9
    for kind in ("fwd", "bwd-data", "bwd-filter"):
      fn, fn_args = jax_fns[kind]
      jax.block_until_ready(fn(*fn_args))
      torch_fns[kind]()
      jax_ms, torch_ms = [], []
      for _ in range(repeats):  # Interleaved, as the steps.
        start = time.perf_counter()
        jax.block_until_ready(fn(*fn_args))
        jax_ms.append(1e3 * (time.perf_counter() - start))
        start = time.perf_counter()
        torch_fns[kind]()
        torch_ms.append(1e3 * (time.perf_counter() - start))
      rows.append((f"{size}x{size}x{c}", kind, gflop, min(jax_ms),
                   min(torch_ms)))
  print(f"\n3x3 convolutions alone, {views} views, best of {repeats} "
        "(GFLOP/s in brackets)\n")
  print("| activation | pass | GFLOP | JAX ms | torch ms | JAX / torch time |")
  print("|---|---|---|---|---|---|")
  for shape, kind, gflop, jax_ms, torch_ms in rows:
    print(f"| {shape} | {kind} | {gflop:.2f} | {jax_ms:.1f} "
          f"({gflop / jax_ms * 1e3:.0f}) | {torch_ms:.1f} "
          f"({gflop / torch_ms * 1e3:.0f}) | {jax_ms / torch_ms:.2f} |")


def print_profiles(runs, compiled, directory):
  os.makedirs(directory, exist_ok=True)
  for name, exe in compiled.items():
    wall, categories, ops = profile_jax(runs[name], exe, directory, name)
    total = sum(ms for ms, _, _ in categories.values())
    print(f"\n{name}: one traced step {wall * 1e3:.0f} ms wall, "
          f"{total:.0f} ms in thunks (summed over threads)\n")
    print("| category | ms | % of thunk time | thunks | GFLOP | GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for kind, (ms, gflop, count) in sorted(categories.items(),
                                           key=lambda kv: -kv[1][0]):
      rate = f"{gflop / ms * 1e3:.1f}" if gflop else ""
      print(f"| {kind} | {ms:.0f} | {100 * ms / total:.1f} | {count} | "
            f"{gflop:.1f} | {rate} |")
    print(f"\n{name}: top 15 thunks\n")
    for (kind, op, shape), ms in ops.most_common(15):
      print(f"  {ms:8.1f} ms  {kind:16.16s}  {op} {shape}")
  wall, averages = profile_torch(runs["torch"])
  total = sum(a.self_cpu_time_total for a in averages) / 1e3
  print(f"\ntorch: one profiled step {wall * 1e3:.0f} ms wall, "
        f"{total:.0f} ms self CPU time\n")
  print("| op | self ms | % | calls |")
  print("|---|---|---|---|")
  for a in sorted(averages, key=lambda a: -a.self_cpu_time_total)[:20]:
    ms = a.self_cpu_time_total / 1e3
    print(f"| {a.key} | {ms:.0f} | {100 * ms / total:.1f} | {a.count} |")


# ----------------------------------------------------------------------------


def time_interleaved(runs, rounds, warmup):
  """Times each `run` once per round, in turn; returns seconds per run."""
  losses_ = {}
  for _ in range(warmup):
    for name, run in runs.items():
      losses_.setdefault(name, run())
  if losses_:
    # Same initial parameters and batch: the first losses should agree to
    # float32 rounding across JAX variants (a check that a variant computes
    # the same step; torch has its own initialisation).
    print("# first-step loss: " + ", ".join(
        f"{name} {loss:.6f}" for name, loss in losses_.items()), flush=True)
  seconds = {name: [] for name in runs}
  for _ in range(rounds):
    for name, run in runs.items():
      start = time.perf_counter()
      run()
      seconds[name].append(time.perf_counter() - start)
  return seconds


def main():
  args = ARGS
  torch.set_num_threads(args.threads)
  torch.set_num_interop_threads(1)
  if args.convs:
    conv_table(args)
    return
  batch = make_batch(args)
  runs, compiled = {}, {}
  for name in args.variants:
    start = time.perf_counter()
    runs[name], compiled[name] = jax_step(args, batch, jax.devices()[:1],
                                          VARIANTS[name])
    print(f"# compiled {name} in {time.perf_counter() - start:.0f} s",
          flush=True)
  if args.sharded:
    start = time.perf_counter()
    runs[f"jax_{args.sharded}dev"], _ = jax_step(
        args, batch, jax.devices()[:args.sharded])
    print(f"# compiled jax_{args.sharded}dev in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
  runs["torch"], _ = torch_step(args, batch)
  if args.profile:
    print_profiles(runs, compiled, args.profile)
    return
  seconds = time_interleaved(runs, args.rounds, args.warmup)
  images = args.batch
  print(f"\nResNet-18 (width {args.width}) SupCon train step, "
        f"{args.batch} images x {args.views} views at {args.size} px, "
        f"{args.threads} threads, jax {jax.__version__}, "
        f"torch {torch.__version__}, {args.rounds} interleaved rounds\n")
  print("| step | median s/step | img/s (median) | views/s | "
        "median ratio vs torch (img/s) |")
  print("|---|---|---|---|---|")
  for name, secs in seconds.items():
    med = statistics.median(secs)
    ratio = statistics.median(
        t / s for s, t in zip(secs, seconds["torch"]))
    print(f"| {name} | {med:.3f} | {images / med:.1f} | "
          f"{images * args.views / med:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
  main()
