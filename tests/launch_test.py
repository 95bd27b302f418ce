"""launch/tpu.py: exact gcloud argument lists, validation, injection, watch.

A fake `gcloud` on PATH records its argv (JSON lines) and answers the two
queries the launcher makes (`accelerator-types list`, `describe`). For `ssh`
it can run the remote `--command` with bash in a sandbox "worker" whose
`.venv/bin/python` records the trainer's argv, so quoting is checked by a
real shell, not by reading strings.
"""

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "tpu", os.path.join(REPO, "launch", "tpu.py"))
tpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tpu)

_FAKE_GCLOUD = r'''#!{python}
import json, os, subprocess, sys
argv = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
  f.write(json.dumps(argv) + "\n")
if "list" in argv and "accelerator-types" in argv:
  print("\n".join(os.environ.get("FAKE_GCLOUD_TYPES", "").split(",")))
elif "describe" in argv:
  path = os.environ["FAKE_GCLOUD_STATES"]
  with open(path) as f:
    states = f.read().split()
  state = states.pop(0) if len(states) > 1 else states[0]
  with open(path, "w") as f:
    f.write("\n".join(states))
  if state == "NOT_FOUND":
    sys.exit("ERROR: (gcloud) NOT_FOUND: Resource not found")
  print(state)
elif "create" in argv and os.path.exists(os.environ["FAKE_GCLOUD_LOG"] +
                                         ".fail_create"):
  os.remove(os.environ["FAKE_GCLOUD_LOG"] + ".fail_create")
  sys.exit("ERROR: (gcloud) There is no more capacity in the zone")
elif "ssh" in argv and os.environ.get("FAKE_GCLOUD_WORKER"):
  command = [a for a in argv if a.startswith("--command=")][0]
  sys.exit(subprocess.run(["bash", "-c", command[len("--command="):]],
                          cwd=os.environ["FAKE_GCLOUD_WORKER"]).returncode)
'''

_FAKE_TRAINER = r'''#!{python}
import json, os, sys, time
with open(os.path.join(os.path.dirname(__file__), "argv.json"), "w") as f:
  json.dump(sys.argv[1:], f)
time.sleep(float(os.environ.get("FAKE_TRAINER_SECONDS", "0")))
'''

NAME, PROJECT, ZONE = "my-tpu", "my-project", "us-central2-b"
WHERE = [f"--project={PROJECT}", f"--zone={ZONE}"]
TPU_VM = ["gcloud", "compute", "tpus", "tpu-vm"]
QUEUED = ["gcloud", "compute", "tpus", "queued-resources"]
RUN = ["--config=configs/supcon_imagenet.py:r50", "--workdir=gs://b/run"]


def _executable(path, text):
  path.write_text(text.format(python=sys.executable))
  path.chmod(0o755)


@pytest.fixture
def gcloud(tmp_path, monkeypatch):
  """Installs the fake gcloud; returns a function reading its calls."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _executable(bin_dir / "gcloud", _FAKE_GCLOUD)
  log = tmp_path / "gcloud.jsonl"
  log.touch()
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_GCLOUD_LOG", str(log))
  monkeypatch.setenv("FAKE_GCLOUD_TYPES", "v4-8,v4-16,v4-32")
  monkeypatch.setenv("FAKE_GCLOUD_STATES", str(tmp_path / "states"))
  (tmp_path / "states").write_text("READY")
  for var in ("CLOUDSDK_CORE_PROJECT", "CLOUDSDK_COMPUTE_ZONE"):
    monkeypatch.delenv(var, raising=False)

  def calls():
    return [json.loads(line) for line in log.read_text().splitlines()]
  return calls


def _states(tmp_path, *states):
  (tmp_path / "states").write_text("\n".join(states))


def _launch(*argv):
  return tpu.main([argv[0], NAME, *WHERE, *argv[1:]])


def _printed_commands(out):
  return [shlex.split(line) for line in out.splitlines()
          if line and not line.startswith("#")]


def _ssh(command, worker="all"):
  return [*TPU_VM, "ssh", NAME, *WHERE, f"--worker={worker}",
          f"--command={command}"]


SETUP_COMMAND = (
    "(command -v python3.11 >/dev/null || (sudo apt-get update -qq && "
    "sudo apt-get install -y -qq python3.11 python3.11-venv)) && "
    "rm -rf contrastive && mkdir -p contrastive && "
    "tar -xzf contrastive.tar.gz -C contrastive && cd contrastive && "
    "python3.11 -m venv .venv && .venv/bin/pip install -q --upgrade pip && "
    ".venv/bin/pip install -q -r requirements.txt && "
    ".venv/bin/pip install -q 'jax[tpu]==0.10.2'")
RUN_COMMAND = (
    "cd contrastive || exit 1; if [ -f train.pid ] && kill -0 "
    "-\"$(cat train.pid)\" 2>/dev/null; then echo 'A run is already going; "
    "stop it first.' >&2; exit 1; fi; setsid nohup .venv/bin/python -m "
    "contrastive.main --config=configs/supcon_imagenet.py:r50 "
    "--workdir=gs://b/run --config.total_steps=10 > train.log 2>&1 "
    "< /dev/null & echo $! > train.pid")


def _expected_dry_run(tmp):
  tarball = os.path.join(tmp, f"{NAME}-contrastive.tar.gz")
  return {
      ("create", "--accelerator-type=v4-32", "--spot"): [
          [*TPU_VM, "accelerator-types", "list", *WHERE,
           "--format=value(type)"],
          [*TPU_VM, "create", NAME, *WHERE, "--accelerator-type=v4-32",
           "--version=tpu-ubuntu2204-base", "--spot"],
      ],
      ("create", "--accelerator-type=v4-32", "--preemptible",
       "--version=tpu-vm-v4-base"): [
          [*TPU_VM, "accelerator-types", "list", *WHERE,
           "--format=value(type)"],
          [*TPU_VM, "create", NAME, *WHERE, "--accelerator-type=v4-32",
           "--version=tpu-vm-v4-base", "--preemptible"],
      ],
      ("create", "--accelerator-type=v5p-64", "--spot", "--queued"): [
          [*TPU_VM, "accelerator-types", "list", *WHERE,
           "--format=value(type)"],
          [*QUEUED, "create", NAME, f"--node-id={NAME}", *WHERE,
           "--accelerator-type=v5p-64", "--runtime-version=v2-alpha-tpuv5",
           "--spot"],
      ],
      ("setup",): [
          [*TPU_VM, "scp", tarball, f"{NAME}:contrastive.tar.gz", *WHERE,
           "--worker=all"],
          _ssh(SETUP_COMMAND),
      ],
      ("run", *RUN, "--config.total_steps=10"): [_ssh(RUN_COMMAND)],
      ("logs",): [_ssh("tail --lines=100 -F contrastive/train.log", "0")],
      ("logs", "--worker=3", "--no-follow", "--lines=20"): [
          _ssh("tail --lines=20 contrastive/train.log", "3")],
      ("status",): [[*TPU_VM, "describe", NAME, *WHERE,
                     "--format=value(state)"]],
      ("status", "--queued"): [[*QUEUED, "describe", NAME, *WHERE,
                                "--format=value(state.state)"]],
      ("stop",): [_ssh(
          "if [ -f contrastive/train.pid ]; then kill -TERM -- "
          "-\"$(cat contrastive/train.pid)\" 2>/dev/null || true; "
          "rm -f contrastive/train.pid; fi")],
      ("delete",): [[*TPU_VM, "delete", NAME, *WHERE, "--quiet"]],
      ("delete", "--queued"): [[*QUEUED, "delete", NAME, *WHERE, "--force",
                                "--quiet"]],
      ("watch", "--accelerator-type=v4-32", "--spot", *RUN,
       "--config.total_steps=10"): [
          [*TPU_VM, "describe", NAME, *WHERE, "--format=value(state)"],
          [*TPU_VM, "delete", NAME, *WHERE, "--quiet"],
          [*TPU_VM, "accelerator-types", "list", *WHERE,
           "--format=value(type)"],
          [*TPU_VM, "create", NAME, *WHERE, "--accelerator-type=v4-32",
           "--version=tpu-ubuntu2204-base", "--spot"],
          [*TPU_VM, "scp", tarball, f"{NAME}:contrastive.tar.gz", *WHERE,
           "--worker=all"],
          _ssh(SETUP_COMMAND),
          _ssh(RUN_COMMAND),
      ],
  }


def test_dry_run_of_every_verb_prints_exact_commands_and_runs_none(
    gcloud, capsys):
  expected = _expected_dry_run(tempfile.gettempdir())
  assert {argv[0] for argv in expected} == set(tpu._VERBS)
  for argv, commands in expected.items():
    assert _launch(*argv, "--dry-run") == 0, argv
    out = capsys.readouterr().out
    assert _printed_commands(out) == commands, argv
  assert gcloud() == []


def test_dry_run_needs_no_gcloud(monkeypatch, capsys):
  monkeypatch.setenv("PATH", "")
  assert _launch("delete", "--dry-run") == 0
  assert _printed_commands(capsys.readouterr().out) == [
      [*TPU_VM, "delete", NAME, *WHERE, "--quiet"]]


def test_cli_entry_point(gcloud):
  del gcloud
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "tpu.py"), "status",
       NAME, *WHERE, "--dry-run"], capture_output=True, text=True, check=True)
  assert _printed_commands(proc.stdout) == [
      [*TPU_VM, "describe", NAME, *WHERE, "--format=value(state)"]]


def test_create_runs_list_then_create(gcloud, capsys):
  assert _launch("create", "--accelerator-type=v4-16") == 0
  capsys.readouterr()
  assert [call[:5] for call in gcloud()] == [
      ["compute", "tpus", "tpu-vm", "accelerator-types", "list"],
      ["compute", "tpus", "tpu-vm", "create", NAME]]


def test_unoffered_accelerator_type_creates_nothing(gcloud, capsys):
  assert _launch("create", "--accelerator-type=v4-4096", "--spot") == 2
  err = capsys.readouterr().err
  assert "does not offer accelerator type 'v4-4096'" in err
  assert "v4-8, v4-16, v4-32" in err
  assert [call[3] for call in gcloud()] == ["accelerator-types"]


def test_missing_gcloud_is_a_clear_error(gcloud, monkeypatch, capsys):
  del gcloud
  monkeypatch.setenv("PATH", "")
  assert _launch("create", "--accelerator-type=v4-32") == 2
  assert "gcloud is not on PATH" in capsys.readouterr().err


def test_missing_project_and_zone_are_clear_errors(gcloud, capsys):
  assert tpu.main(["delete", NAME]) == 2
  assert "Missing --project and --zone" in capsys.readouterr().err
  assert tpu.main(["delete", NAME, f"--project={PROJECT}"]) == 2
  assert "Missing --zone" in capsys.readouterr().err
  assert gcloud() == []


def test_project_and_zone_from_gcloud_environment(gcloud, monkeypatch,
                                                  capsys):
  monkeypatch.setenv("CLOUDSDK_CORE_PROJECT", PROJECT)
  monkeypatch.setenv("CLOUDSDK_COMPUTE_ZONE", ZONE)
  assert tpu.main(["delete", NAME]) == 0
  capsys.readouterr()
  assert gcloud() == [["compute", "tpus", "tpu-vm", "delete", NAME, *WHERE,
                       "--quiet"]]


@pytest.mark.parametrize("argv,message", [
    (("create", "--accelerator-type=v4-32", "--spot", "--preemptible"),
     "one of --spot and --preemptible"),
    (("create", "--accelerator-type=v4-32", "--preemptible", "--queued"),
     "take --spot, not --preemptible"),
    (("run", "--config=c.py", "--workdir=/tmp/run"), "must be a gs:// path"),
    (("run", *RUN, "--workdir2=x"), "Unexpected argument '--workdir2=x'"),
    (("delete", "--config.x=1"), "Unexpected arguments"),
])
def test_bad_requests_fail_before_any_gcloud_call(gcloud, capsys, argv,
                                                  message):
  assert _launch(*argv) == 2
  assert message in capsys.readouterr().err
  assert gcloud() == []


@pytest.fixture
def worker(gcloud, tmp_path, monkeypatch):
  """A sandbox home directory where the fake gcloud runs `ssh --command`."""
  del gcloud
  home = tmp_path / "worker"
  (home / "contrastive" / ".venv" / "bin").mkdir(parents=True)
  _executable(home / "contrastive" / ".venv" / "bin" / "python",
              _FAKE_TRAINER)
  monkeypatch.setenv("FAKE_GCLOUD_WORKER", str(home))
  return home


def _alive(pid: int) -> bool:
  """Running, neither gone nor a zombie awaiting its reaper."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def test_run_refuses_a_second_trainer_and_stop_kills_it(worker, monkeypatch,
                                                        capsys):
  monkeypatch.setenv("FAKE_TRAINER_SECONDS", "60")
  pid_file = worker / "contrastive" / "train.pid"
  try:
    assert _launch("run", *RUN) == 0
    pid = int(pid_file.read_text())
    assert _alive(pid)
    assert _launch("run", *RUN) == 2
    assert int(pid_file.read_text()) == pid
    assert _launch("stop") == 0
    for _ in range(100):
      if not _alive(pid):
        break
      time.sleep(0.05)
    assert not _alive(pid)
    assert not pid_file.exists()
    assert _launch("run", *RUN) == 0
    assert _launch("stop") == 0
  finally:
    if pid_file.exists():  # Do not leave a sleeping stand-in behind.
      os.killpg(int(pid_file.read_text()), 9)
  capsys.readouterr()


def test_override_with_shell_syntax_reaches_trainer_intact(worker, capsys):
  hostile = ("--config.input.data_dir=gs://b/it's \"a\" dir; touch pwned "
             "$(touch pwned2) `touch pwned3` && touch pwned4 &")
  assert _launch("run", *RUN, hostile) == 0
  capsys.readouterr()
  argv_file = worker / "contrastive" / ".venv" / "bin" / "argv.json"
  for _ in range(100):  # The trainer runs detached.
    if argv_file.exists() and argv_file.read_text():
      break
    time.sleep(0.05)
  assert json.loads(argv_file.read_text()) == [
      "-m", "contrastive.main", *RUN, hostile]
  assert not list(worker.rglob("pwned*"))
  assert (worker / "contrastive" / "train.pid").read_text().strip().isdigit()


def test_watch_recreates_sets_up_and_reruns_after_preemption(
    gcloud, tmp_path, capsys):
  _states(tmp_path, "READY", "PREEMPTED", "READY")
  assert _launch("watch", "--accelerator-type=v4-32", "--spot", *RUN,
                 "--poll-seconds=0", "--max-polls=3") == 0
  assert "my-tpu is PREEMPTED: re-creating" in capsys.readouterr().out
  verbs = [call[3] if call[2] == "tpu-vm" else call[2] for call in gcloud()]
  assert verbs == ["describe", "describe", "delete", "accelerator-types",
                   "create", "scp", "ssh", "ssh", "describe"]
  assert gcloud()[-2][-1] == _ssh(
      RUN_COMMAND.replace(" --config.total_steps=10", ""))[-1]


def test_watch_creates_a_missing_queued_resource_and_waits(gcloud, tmp_path,
                                                           capsys):
  _states(tmp_path, "NOT_FOUND", "WAITING_FOR_RESOURCES", "ACTIVE")
  assert _launch("watch", "--queued", "--accelerator-type=v4-32", "--spot",
                 *RUN, "--poll-seconds=0", "--max-polls=1") == 0
  capsys.readouterr()
  calls = gcloud()
  assert [call[3] for call in calls] == [
      "describe", "accelerator-types", "create", "describe", "describe",
      "scp", "ssh", "ssh"]
  assert calls[2][:4] == ["compute", "tpus", "queued-resources", "create"]


def test_watch_gives_up_after_max_restarts(gcloud, tmp_path, capsys):
  del gcloud
  _states(tmp_path, "PREEMPTED")
  assert _launch("watch", "--accelerator-type=v4-32", *RUN,
                 "--poll-seconds=0", "--max-restarts=1") == 2
  assert "giving up" in capsys.readouterr().err


def test_setup_ships_the_code_without_local_state(gcloud, capsys):
  assert _launch("setup") == 0
  capsys.readouterr()
  scp = gcloud()[0]
  with tarfile.open(scp[4]) as tar:
    names = set(tar.getnames())
  assert {"requirements.txt", "contrastive/main.py", "launch/tpu.py",
          "configs/supcon_imagenet.py"} <= names
  assert not any(part in (".git", ".venv", "__pycache__")
                 for name in names for part in name.split("/"))


def test_watch_retries_a_failed_re_creation(gcloud, tmp_path, capsys):
  _states(tmp_path, "PREEMPTED", "NOT_FOUND", "READY")
  (tmp_path / "gcloud.jsonl.fail_create").touch()  # No capacity, once.
  assert _launch("watch", "--accelerator-type=v4-32", "--spot", *RUN,
                 "--poll-seconds=0", "--max-polls=3") == 0
  assert "Re-creating my-tpu failed" in capsys.readouterr().out
  verbs = [call[3] for call in gcloud()]
  assert verbs == ["describe", "delete", "accelerator-types", "create",
                   "describe", "accelerator-types", "create", "scp", "ssh",
                   "ssh", "describe"]
