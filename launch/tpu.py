r"""Cloud TPU lifecycle for `contrastive`: create, setup, run, logs, watch, ...

  python launch/tpu.py create NAME --accelerator-type=v4-32 --spot
  python launch/tpu.py setup  NAME
  python launch/tpu.py run    NAME --config=configs/supcon_imagenet.py:r50 \
      --workdir=gs://BUCKET/supcon_r50 \
      --config.input.data_dir=gs://BUCKET/tensorflow_datasets
  python launch/tpu.py logs   NAME [--worker=3]
  python launch/tpu.py status NAME
  python launch/tpu.py watch  NAME --accelerator-type=v4-32 --spot \
      --config=... --workdir=gs://... [--config.key=value ...]
  python launch/tpu.py stop   NAME
  python launch/tpu.py delete NAME

Every verb takes `--project` and `--zone` (default: $CLOUDSDK_CORE_PROJECT,
$CLOUDSDK_COMPUTE_ZONE) and `--dry-run`, which prints the gcloud commands it
would run, one per line, shell-quoted, and runs nothing. `--queued` uses a
queued resource instead of a plain TPU VM (create, status, delete, watch).

Commands are argument lists, never shell strings. The one string that is run
by a shell is the remote `--command` of `tpu-vm ssh`; every value in it is
`shlex.quote`d, so a config override with spaces, quotes or `;` reaches the
trainer as one argument and executes nothing.

Standard library only: runs wherever gcloud does.
"""

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# On every worker, relative to the ssh user's home directory.
REMOTE_DIR = "contrastive"
REMOTE_TARBALL = "contrastive.tar.gz"
LOG_FILE = "train.log"  # In REMOTE_DIR.
PID_FILE = "train.pid"  # In REMOTE_DIR; the trainer's process group.
# Not copied to the workers: local state, caches and version control.
_EXCLUDED = {".git", ".venv", "__pycache__", ".pytest_cache", ".mypy_cache"}

# TPU VM states after which the slice must be deleted and created again.
_VM_LOST = {"PREEMPTED", "TERMINATED", "STOPPED"}
_QUEUED_LOST = {"SUSPENDED", "SUSPENDING", "FAILED"}
_NOT_FOUND = "NOT_FOUND"


class LaunchError(Exception):
  """A problem with the request itself; reported without a traceback."""


def default_runtime_version(accelerator_type: str) -> str:
  """The TPU VM image for an accelerator family (v5e, v5p, v6e differ)."""
  if accelerator_type.startswith(("v5litepod", "v5e")):
    return "v2-alpha-tpuv5-lite"
  if accelerator_type.startswith("v5p"):
    return "v2-alpha-tpuv5"
  if accelerator_type.startswith("v6e"):
    return "v2-alpha-tpuv6e"
  return "tpu-ubuntu2204-base"


def jax_version(requirements: str = os.path.join(REPO, "requirements.txt")
                ) -> str:
  """The pinned jax version, so the workers get jax[tpu] of that version."""
  with open(requirements) as f:
    for line in f:
      match = re.match(r"\s*jax==([\w.]+)", line)
      if match:
        return match.group(1)
  raise LaunchError(f"No 'jax==VERSION' pin in {requirements}.")


@dataclasses.dataclass
class Gcloud:
  """Builds gcloud argument lists for one slice and runs (or prints) them."""
  name: str
  project: str
  zone: str
  dry_run: bool = False
  queued: bool = False

  def _where(self) -> list[str]:
    return [f"--project={self.project}", f"--zone={self.zone}"]

  # --- Argument lists (pure; what the tests check). -----------------------

  def accelerator_types(self) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "accelerator-types",
            "list", *self._where(), "--format=value(type)"]

  def create(self, accelerator_type: str, version: str, spot: bool,
             preemptible: bool) -> list[str]:
    if self.queued:
      if preemptible:
        raise LaunchError("Queued resources take --spot, not --preemptible.")
      return ["gcloud", "compute", "tpus", "queued-resources", "create",
              self.name, f"--node-id={self.name}", *self._where(),
              f"--accelerator-type={accelerator_type}",
              f"--runtime-version={version}",
              *(["--spot"] if spot else [])]
    if spot and preemptible:
      raise LaunchError("Choose one of --spot and --preemptible.")
    return ["gcloud", "compute", "tpus", "tpu-vm", "create", self.name,
            *self._where(), f"--accelerator-type={accelerator_type}",
            f"--version={version}",
            *(["--spot"] if spot else []),
            *(["--preemptible"] if preemptible else [])]

  def describe(self) -> list[str]:
    if self.queued:
      return ["gcloud", "compute", "tpus", "queued-resources", "describe",
              self.name, *self._where(), "--format=value(state.state)"]
    return ["gcloud", "compute", "tpus", "tpu-vm", "describe", self.name,
            *self._where(), "--format=value(state)"]

  def delete(self) -> list[str]:
    if self.queued:
      # --force also deletes the TPU VM the queued resource holds.
      return ["gcloud", "compute", "tpus", "queued-resources", "delete",
              self.name, *self._where(), "--force", "--quiet"]
    return ["gcloud", "compute", "tpus", "tpu-vm", "delete", self.name,
            *self._where(), "--quiet"]

  def scp(self, local: str, remote: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local,
            f"{self.name}:{remote}", *self._where(), "--worker=all"]

  def ssh(self, command: str, worker: str = "all") -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.name,
            *self._where(), f"--worker={worker}", f"--command={command}"]

  # --- Execution. ----------------------------------------------------------

  def execute(self, argv: list[str], *, capture: bool = False,
              check: bool = True) -> subprocess.CompletedProcess:
    """Runs `argv` (or prints it under --dry-run)."""
    print(shlex.join(argv), flush=True)
    if self.dry_run:
      return subprocess.CompletedProcess(argv, 0, "", "")
    result = subprocess.run(argv, text=True, check=False,
                            capture_output=capture)
    if check and result.returncode:
      detail = f": {result.stderr.strip()}" if capture and result.stderr else ""
      raise LaunchError(f"`{shlex.join(argv)}` failed with exit status "
                        f"{result.returncode}{detail}")
    return result

  def state(self) -> str:
    """The slice's state, e.g. READY / PREEMPTED / ACTIVE, or NOT_FOUND."""
    result = self.execute(self.describe(), capture=True, check=False)
    if self.dry_run:
      return "READY"
    if result.returncode:
      if "NOT_FOUND" in result.stderr or "not found" in result.stderr.lower():
        return _NOT_FOUND
      raise LaunchError(f"Could not describe {self.name}: "
                        f"{result.stderr.strip()}")
    return result.stdout.strip() or "UNKNOWN"


# --- Remote shell scripts (every interpolated value is quoted). -------------


def setup_script(python: str, jax_tpu_version: str) -> str:
  """Unpacks the code and installs requirements + jax[tpu] on a worker."""
  q = shlex.quote
  return " && ".join([
      # Python 3.11+ is what the pins need; Ubuntu 22.04 ships 3.10.
      f"(command -v {q(python)} >/dev/null || (sudo apt-get update -qq && "
      f"sudo apt-get install -y -qq {q(python)} {q(python + '-venv')}))",
      f"rm -rf {q(REMOTE_DIR)}", f"mkdir -p {q(REMOTE_DIR)}",
      f"tar -xzf {q(REMOTE_TARBALL)} -C {q(REMOTE_DIR)}",
      f"cd {q(REMOTE_DIR)}",
      f"{q(python)} -m venv .venv",
      ".venv/bin/pip install -q --upgrade pip",
      ".venv/bin/pip install -q -r requirements.txt",
      f".venv/bin/pip install -q {q(f'jax[tpu]=={jax_tpu_version}')}",
  ])


def run_script(trainer_args: list[str]) -> str:
  """Starts the trainer detached (own process group), logging to LOG_FILE."""
  q = shlex.quote
  trainer = shlex.join([".venv/bin/python", "-m", "contrastive.main",
                        *trainer_args])
  # Not `cd && trainer &`: that would background the cd's subshell too.
  # setsid makes the trainer a process-group leader (pgid = $!) for `stop`.
  return (f"cd {q(REMOTE_DIR)} || exit 1; "
          # Two trainers on one workdir would corrupt each other's checkpoints.
          f"if [ -f {q(PID_FILE)} ] && kill -0 -\"$(cat {q(PID_FILE)})\" "
          "2>/dev/null; then echo 'A run is already going; stop it first.' "
          ">&2; exit 1; fi; "
          f"setsid nohup {trainer} > {q(LOG_FILE)} 2>&1 < /dev/null & "
          f"echo $! > {q(PID_FILE)}")


def stop_script() -> str:
  pid = shlex.quote(f"{REMOTE_DIR}/{PID_FILE}")
  return (f"if [ -f {pid} ]; then kill -TERM -- -\"$(cat {pid})\" "
          f"2>/dev/null || true; rm -f {pid}; fi")


def logs_script(lines: int, follow: bool) -> str:
  return shlex.join(["tail", f"--lines={lines}", *(["-F"] if follow else []),
                     f"{REMOTE_DIR}/{LOG_FILE}"])


def trainer_args(config: str, workdir: str, overrides: list[str]) -> list[str]:
  """The trainer's argv; a multi-worker slice needs a gs:// workdir."""
  if not workdir.startswith("gs://"):
    raise LaunchError(
        f"--workdir must be a gs:// path (got {workdir!r}): every worker "
        "writes checkpoints there, and a re-created slice resumes from it.")
  for override in overrides:
    if not override.startswith("--config."):
      raise LaunchError(f"Unexpected argument {override!r}; trainer config "
                        "overrides look like --config.key=value.")
  return [f"--config={config}", f"--workdir={workdir}", *overrides]


def pack_code(destination: str) -> None:
  """Tars the repository (minus local state) for copying to the workers."""

  def exclude(info: tarfile.TarInfo):
    parts = info.name.split("/")
    if _EXCLUDED.intersection(parts) or info.name.endswith(".pyc"):
      return None
    return info

  with tarfile.open(destination, "w:gz") as tar:
    for entry in sorted(os.listdir(REPO)):
      tar.add(os.path.join(REPO, entry), arcname=entry, filter=exclude)


# --- Verbs. -----------------------------------------------------------------


def check_accelerator_type(g: Gcloud, accelerator_type: str) -> None:
  result = g.execute(g.accelerator_types(), capture=True)
  if g.dry_run:
    return
  offered = list(dict.fromkeys(result.stdout.split()))  # gcloud's order.
  if accelerator_type not in offered:
    raise LaunchError(
        f"Zone {g.zone} does not offer accelerator type {accelerator_type!r}; "
        f"it offers: {', '.join(offered) or 'none'}. Nothing was created.")


def wait_until_ready(g: Gcloud, poll_s: float) -> None:
  """A queued resource is granted later: waits for ACTIVE."""
  if not g.queued or g.dry_run:
    return
  while (state := g.state()) != "ACTIVE":
    if state in _QUEUED_LOST:
      raise LaunchError(f"Queued resource {g.name} is {state}.")
    time.sleep(poll_s)


def create(g: Gcloud, args) -> None:
  version = args.version or default_runtime_version(args.accelerator_type)
  # Built (and so validated) before anything runs: nothing half-created.
  command = g.create(args.accelerator_type, version, args.spot,
                     args.preemptible)
  check_accelerator_type(g, args.accelerator_type)
  g.execute(command)
  wait_until_ready(g, args.poll_seconds)


def setup(g: Gcloud, args) -> None:
  local = os.path.join(tempfile.gettempdir(), f"{g.name}-{REMOTE_TARBALL}")
  if g.dry_run:
    print(f"# pack {REPO} (without {', '.join(sorted(_EXCLUDED))}) "
          f"into {local}")
  else:
    pack_code(local)
  g.execute(g.scp(local, REMOTE_TARBALL))
  g.execute(g.ssh(setup_script(args.python, jax_version())))


def run(g: Gcloud, args) -> None:
  g.execute(g.ssh(run_script(args.trainer_args)))


def logs(g: Gcloud, args) -> None:
  g.execute(g.ssh(logs_script(args.lines, not args.no_follow),
                  worker=str(args.worker)))


def status(g: Gcloud, args) -> None:
  del args
  state = g.state()
  if not g.dry_run:
    print(f"{g.name}: {state}")


def stop(g: Gcloud, args) -> None:
  del args
  g.execute(g.ssh(stop_script()))


def delete(g: Gcloud, args) -> None:
  del args
  g.execute(g.delete())


def watch(g: Gcloud, args) -> None:
  """Polls the slice; after a preemption re-creates it, sets up, re-runs.

  The trainer resumes from the latest checkpoint in the gs:// workdir.
  """
  polls = restarts = 0
  while True:
    state = g.state()
    polls += 1
    lost = state == _NOT_FOUND or state in (_QUEUED_LOST if g.queued
                                            else _VM_LOST)
    if lost or g.dry_run:
      if g.dry_run:
        print("# if the state is NOT_FOUND or one of "
              f"{sorted(_QUEUED_LOST if g.queued else _VM_LOST)}:")
      else:
        print(f"{g.name} is {state}: re-creating (restart {restarts + 1}).",
              flush=True)
      if restarts >= args.max_restarts:
        raise LaunchError(f"{g.name} lost again after {restarts} restarts; "
                          "giving up (raise --max-restarts).")
      restarts += 1
      try:
        if state != _NOT_FOUND:
          g.execute(g.delete(), check=False)
        create(g, args)
        setup(g, args)
        run(g, args)
      except LaunchError as e:
        # E.g. no spot capacity right now: the next poll tries again.
        print(f"Re-creating {g.name} failed ({e}); retrying after the next "
              "poll.", flush=True)
    if g.dry_run or (args.max_polls and polls >= args.max_polls):
      return
    time.sleep(args.poll_seconds)


_VERBS = {"create": create, "setup": setup, "run": run, "logs": logs,
          "status": status, "stop": stop, "delete": delete, "watch": watch}


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="launch/tpu.py", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  verbs = parser.add_subparsers(dest="verb", required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("name", help="TPU (and queued resource) name.")
  common.add_argument("--project",
                      default=os.environ.get("CLOUDSDK_CORE_PROJECT"))
  common.add_argument("--zone", default=os.environ.get("CLOUDSDK_COMPUTE_ZONE"))
  common.add_argument("--queued", action="store_true",
                      help="Use a queued resource (named like the TPU).")
  common.add_argument("--dry-run", action="store_true",
                      help="Print the gcloud commands; run nothing.")
  common.add_argument("--poll-seconds", type=float, default=60.0)

  create_flags = argparse.ArgumentParser(add_help=False)
  create_flags.add_argument("--accelerator-type", required=True,
                            help="e.g. v4-32, v5litepod-16, v5p-64.")
  create_flags.add_argument("--version", help="TPU VM runtime version "
                            "(default: by accelerator family).")
  create_flags.add_argument("--spot", action="store_true")
  create_flags.add_argument("--preemptible", action="store_true")
  setup_flags = argparse.ArgumentParser(add_help=False)
  setup_flags.add_argument("--python", default="python3.11",
                           help="Python on the workers (3.11+).")
  run_flags = argparse.ArgumentParser(add_help=False)
  run_flags.add_argument("--config", required=True,
                         help="e.g. configs/supcon_imagenet.py:r50")
  run_flags.add_argument("--workdir", required=True, help="gs://BUCKET/run")

  verbs.add_parser("create", parents=[common, create_flags])
  verbs.add_parser("setup", parents=[common, setup_flags])
  verbs.add_parser("run", parents=[common, run_flags],
                   epilog="Other --config.key=value flags go to the trainer.")
  logs_parser = verbs.add_parser("logs", parents=[common])
  logs_parser.add_argument("--worker", type=int, default=0)
  logs_parser.add_argument("--lines", type=int, default=100)
  logs_parser.add_argument("--no-follow", action="store_true")
  for verb in ("status", "stop", "delete"):
    verbs.add_parser(verb, parents=[common])
  watch_parser = verbs.add_parser(
      "watch", parents=[common, create_flags, setup_flags, run_flags])
  watch_parser.add_argument("--max-restarts", type=int, default=100)
  watch_parser.add_argument("--max-polls", type=int, default=0,
                            help="Stop after this many polls (0: never).")
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = _parser()
  args, extra = parser.parse_known_args(argv)
  try:
    if extra and args.verb not in ("run", "watch"):
      raise LaunchError(f"Unexpected arguments: {extra}")
    if args.verb in ("run", "watch"):
      args.trainer_args = trainer_args(args.config, args.workdir, extra)
    missing = [flag for flag, value in (("--project", args.project),
                                        ("--zone", args.zone)) if not value]
    if missing:
      raise LaunchError(f"Missing {' and '.join(missing)} (or set "
                        "$CLOUDSDK_CORE_PROJECT / $CLOUDSDK_COMPUTE_ZONE).")
    if not args.dry_run and shutil.which("gcloud") is None:
      raise LaunchError("gcloud is not on PATH: install the Google Cloud SDK "
                        "(https://cloud.google.com/sdk/docs/install) and run "
                        "`gcloud auth login`.")
    g = Gcloud(args.name, args.project, args.zone, dry_run=args.dry_run,
               queued=args.queued)
    _VERBS[args.verb](g, args)
  except LaunchError as e:
    print(f"launch/tpu.py {args.verb}: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
