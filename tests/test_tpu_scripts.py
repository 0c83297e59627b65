"""tpu_scripts/: dry runs print the right gcloud commands and run nothing;
real runs (against a fake gcloud) pass exactly the printed arguments; the
command strings sent to the workers are valid shell that does what it says
(executed here against a fake jaxent); bad arguments exit 2 naming the flag.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS_DIR = ROOT / "tpu_scripts"
SCRIPTS = sorted(p.name for p in SCRIPTS_DIR.glob("*.sh"))
ENTRY_SCRIPTS = [s for s in SCRIPTS if s != "common.sh"]
TARGET = ["--name", "my-tpu", "--zone", "us-east5-a", "--project", "my-project"]
SCOPE = ["--zone=us-east5-a", "--project=my-project"]

# Records every call (argv as one JSON line) and touches a marker; answers the
# queued-resource state poll with ACTIVE.
_FAKE_TOOL = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["FAKE_CALLS"], "a") as f:
  f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
open(os.environ["FAKE_MARKER"], "w").close()
if "describe" in sys.argv:
  print("ACTIVE")
"""


@pytest.fixture
def env(tmp_path):
  fake_bin = tmp_path / "bin"
  fake_bin.mkdir()
  for tool in ("gcloud", "tar", "curl"):
    (fake_bin / tool).write_text(_FAKE_TOOL)
    (fake_bin / tool).chmod(0o755)
  e = {k: v for k, v in os.environ.items() if not k.startswith("JAXENT_TPU_")}
  e.update(PATH=f"{fake_bin}:/usr/bin:/bin", HOME=str(tmp_path / "home"),
           FAKE_CALLS=str(tmp_path / "calls.jsonl"), FAKE_MARKER=str(tmp_path / "marker"))
  (tmp_path / "home").mkdir()
  return e


def run(env, script, *args, stdin=""):
  return subprocess.run(["bash", str(SCRIPTS_DIR / script), *args], env=env, input=stdin,
                        capture_output=True, text=True, timeout=60)


def calls(env):
  p = Path(env["FAKE_CALLS"])
  return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def dry(env, script, *args):
  """Runs with --dry-run; returns the printed commands as argv lists."""
  r = run(env, script, "--dry-run", *args)  # before a `--`: launch.sh passes what follows to jaxent
  assert r.returncode == 0, r.stderr
  assert not Path(env["FAKE_MARKER"]).exists(), "a dry run executed a command"
  cmds, pending = [], ""
  for line in r.stdout.splitlines(keepends=True):  # a quoted worker script spans lines
    pending += line
    try:
      argv = shlex.split(pending, comments=True)
    except ValueError:  # the quote is still open
      continue
    if argv:
      cmds.append(argv)
    pending = ""
  assert not pending, f"unterminated command: {pending!r}"
  return cmds


def remote_command(argv):
  (cmd,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  return cmd


def assert_valid_shell(cmd):
  r = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
  assert r.returncode == 0, (cmd, r.stderr)


# ------------------------------------------------------------------ basics ---

@pytest.mark.parametrize("script", SCRIPTS)
def test_syntax(script):
  r = subprocess.run(["bash", "-n", str(SCRIPTS_DIR / script)], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr


def test_every_script_is_strict_and_documented():
  assert set(ENTRY_SCRIPTS) == {"create.sh", "setup.sh", "stage.sh", "launch.sh", "logs.sh",
                                "stop.sh", "teardown.sh"}
  for s in ENTRY_SCRIPTS:
    text = (SCRIPTS_DIR / s).read_text()
    assert "set -euo pipefail" in text, s
    assert os.access(SCRIPTS_DIR / s, os.X_OK), f"{s} is not executable"


@pytest.mark.parametrize("script", ENTRY_SCRIPTS)
def test_help(env, script):
  r = run(env, script, "--help")
  assert r.returncode == 0 and r.stdout.startswith(f"Usage: {script}"), r.stdout
  assert "--dry-run" in r.stdout
  assert not Path(env["FAKE_MARKER"]).exists()


def test_shellcheck():
  exe = shutil.which("shellcheck")
  if exe is None:
    pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
  r = subprocess.run([exe, "-x", *SCRIPTS], cwd=SCRIPTS_DIR, capture_output=True, text=True)
  assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------ create ---

def test_create_queued_dry_run(env):
  cmds = dry(env, "create.sh", *TARGET, "--accelerator-type", "v5p-64", "--spot", "--wait")
  assert cmds[0] == ["gcloud", "compute", "tpus", "queued-resources", "create", "my-tpu", *SCOPE,
                     "--node-id=my-tpu", "--accelerator-type=v5p-64",
                     "--runtime-version=v2-alpha-tpuv5", "--spot"]
  assert cmds[1] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "my-tpu", *SCOPE,
                     "--format=value(state.state)"]
  assert len(cmds) == 2


def test_create_direct_v6e_dry_run(env):
  cmds = dry(env, "create.sh", "--name=slice-a", "--zone=europe-west4-a", "--accelerator-type=v6e-16",
             "--mode", "direct", "--preemptible", "--runtime-version", "v2-alpha-tpuv6e-custom")
  assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "create", "slice-a", "--zone=europe-west4-a",
                   "--accelerator-type=v6e-16", "--version=v2-alpha-tpuv6e-custom", "--preemptible"]]


def test_create_real_run_passes_the_printed_arguments(env):
  args = [*TARGET, "--accelerator-type", "v6e-8", "--reserved", "--wait"]
  printed = dry(env, "create.sh", *args)
  r = run(env, "create.sh", *args)
  assert r.returncode == 0, r.stderr
  assert calls(env) == printed  # create, then the state poll (answered ACTIVE)


# ------------------------------------------------------------------- setup ---

def test_setup_from_local_source_dry_run(env, tmp_path):
  src = tmp_path / "checkout"
  src.mkdir()
  (src / "pyproject.toml").write_text("[project]\nname='x'\n")
  cmds = dry(env, "setup.sh", *TARGET, "--src", str(src))
  tar, scp, unpack, install, probe = cmds
  assert tar[:4] == ["tar", "-C", str(src), "-czf"] and "--exclude=./.git" in tar and tar[-1] == "."
  tarball = tar[4]
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "my-tpu:jaxent-src.tar.gz",
                 *SCOPE, "--worker=all"]
  for c in (unpack, install, probe):
    assert c[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert "--worker=all" in c
    assert_valid_shell(remote_command(c))
  assert 'tar -xzf "$HOME"/jaxent-src.tar.gz -C "$HOME"/jaxent' in remote_command(unpack)
  inst = remote_command(install)
  assert "uv venv" in inst and "--python 3.12" in inst and "-e '.[tpu]'" in inst
  assert "jax.distributed.initialize()" in remote_command(probe)


def test_setup_from_git_dry_run(env):
  cmds = dry(env, "setup.sh", *TARGET, "--repo-url", "https://github.com/example/jaxent.git",
             "--ref", "v0.1.0", "--system-python", "/usr/bin/python3.11", "--workdir", "/opt/jaxent",
             "--no-check", "--internal-ip")
  fetch, install = cmds
  assert "--internal-ip" in fetch
  f = remote_command(fetch)
  assert "git clone --quiet https://github.com/example/jaxent.git /opt/jaxent" in f
  assert "fetch --quiet origin v0.1.0" in f and "checkout --quiet --detach FETCH_HEAD" in f
  i = remote_command(install)
  assert i.startswith('set -e; /usr/bin/python3.11 -m venv "$HOME"/jaxent-venv')
  assert "cd /opt/jaxent" in i and "pip install --quiet -e '.[tpu]'" in i
  for c in cmds:
    assert_valid_shell(remote_command(c))


# ------------------------------------------------------------------- stage ---

def test_stage_from_gcs_dry_run(env):
  (cmd,) = dry(env, "stage.sh", *TARGET, "--src", "gs://my-bucket/models/Qwen2.5-7B/",
               "--dest", "/data/models/Qwen2.5-7B")
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"] and "--worker=all" in cmd
  c = remote_command(cmd)
  assert_valid_shell(c)
  assert ("gcloud storage rsync --recursive gs://my-bucket/models/Qwen2.5-7B /data/models/Qwen2.5-7B"
          in c)
  assert "gcloud storage cp gs://my-bucket/models/Qwen2.5-7B /data/models/Qwen2.5-7B" in c
  assert "mkdir -p /data/models" in c


def test_stage_local_file_and_directory_dry_run(env, tmp_path):
  f = tmp_path / "dapo-math-17k.jsonl"
  f.write_text("{}\n")
  mk, scp = dry(env, "stage.sh", *TARGET, "--src", str(f), "--dest", "/data/dapo-math-17k.jsonl")
  assert "mkdir -p /data" in remote_command(mk)
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", str(f), "my-tpu:/data/dapo-math-17k.jsonl",
                 *SCOPE, "--worker=all"]
  d = tmp_path / "model"
  d.mkdir()
  check, scp = dry(env, "stage.sh", *TARGET, "--src", str(d), "--dest", "models/m")
  assert_valid_shell(remote_command(check))
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", str(d), "my-tpu:models/m",
                 *SCOPE, "--worker=all"]


# --------------------------------------------- launch / logs / stop (run) ---

def _local(cmd, env, timeout=30):
  """Runs a worker command string here, as the worker's shell would."""
  return subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=timeout)


def _alive(pid):
  """The process exists and has not exited (a zombie counts as exited)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def test_launch_logs_stop_commands_work_on_a_worker(env, tmp_path):
  """Executes the exact strings sent to the workers against a fake jaxent."""
  home = Path(env["HOME"])
  (home / "jaxent").mkdir()
  venv_bin = home / "jaxent-venv" / "bin"
  venv_bin.mkdir(parents=True)
  out = tmp_path / "jaxent-args.json"
  (venv_bin / "jaxent").write_text(
      f"#!{sys.executable}\nimport json, os, sys, time\n"
      "json.dump({'args': sys.argv[1:], 'cwd': os.getcwd(), 'x': os.environ.get('X_FLAG')},"
      " open(os.environ['FAKE_OUT'], 'w'))\n"
      "print('step 1 reward 0.5', flush=True)\ntime.sleep(60)\n")
  (venv_bin / "jaxent").chmod(0o755)
  jaxent_args = ["train", "configs/paper/qwen2.5-7b-kl-cov.yaml", "--set", "name=it's a $HOME run",
                 "--set", "train.steps=2"]
  launch = [*TARGET, "--tag", "kl", "--env", f"FAKE_OUT={out}", "--env", "X_FLAG=a b", "--", *jaxent_args]
  printed = dry(env, "launch.sh", *launch)
  r = run(env, "launch.sh", *launch)
  assert r.returncode == 0, r.stderr
  assert calls(env) == printed
  Path(env["FAKE_MARKER"]).unlink()  # so that the dry runs below are checked again
  worker_cmd = remote_command(printed[0])

  r = _local(worker_cmd, env)
  assert r.returncode == 0, r.stderr
  host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
  pid_file = home / "jaxent-logs" / f"kl-{host}.pid"
  log_file = home / "jaxent-logs" / f"kl-{host}.log"
  pid = int(pid_file.read_text())
  try:
    deadline = time.time() + 20
    while not out.exists() and time.time() < deadline:
      time.sleep(0.05)
    got = json.loads(out.read_text())
    assert got == {"args": jaxent_args, "cwd": str(home / "jaxent"), "x": "a b"}
    # A second launch with the same tag refuses while the first one runs.
    again = _local(worker_cmd, env)
    assert again.returncode == 1 and "kl is already running" in again.stderr

    (logs,) = dry(env, "logs.sh", *TARGET, "--tag", "kl", "--no-follow", "--lines", "5")
    assert "--worker=0" in logs
    deadline = time.time() + 10
    while "reward" not in log_file.read_text() and time.time() < deadline:
      time.sleep(0.05)
    assert _local(remote_command(logs), env).stdout == "step 1 reward 0.5\n"
    (logs_all,) = dry(env, "logs.sh", *TARGET, "--tag", "kl", "--worker", "all", "--no-follow")
    assert _local(remote_command(logs_all), env).stdout == f"{host}: step 1 reward 0.5\n"

    (stop,) = dry(env, "stop.sh", *TARGET, "--tag", "kl")
    s = _local(remote_command(stop), env)
    assert s.returncode == 0 and f"stopped pid {pid}" in s.stdout, s.stderr
    assert not pid_file.exists()
    assert not _alive(pid)
  finally:
    try:
      os.kill(pid, 9)  # only the fake jaxent this test started
    except ProcessLookupError:
      pass


# ---------------------------------------------------------------- teardown ---

def test_teardown_dry_run_does_not_ask(env):
  cmds = dry(env, "teardown.sh", *TARGET)
  assert cmds == [["gcloud", "compute", "tpus", "queued-resources", "delete", "my-tpu", *SCOPE,
                   "--force", "--quiet"]]


def test_teardown_asks_and_respects_no(env):
  r = run(env, "teardown.sh", *TARGET, stdin="n\n")
  assert r.returncode == 1 and "not deleted" in r.stderr
  assert "Delete TPU slice 'my-tpu'" in r.stderr
  assert not Path(env["FAKE_MARKER"]).exists()
  r = run(env, "teardown.sh", *TARGET, stdin="")  # no terminal, no answer
  assert r.returncode == 1 and not Path(env["FAKE_MARKER"]).exists()


def test_teardown_deletes_on_yes(env):
  r = run(env, "teardown.sh", *TARGET, "--mode", "direct", stdin="y\n")
  assert r.returncode == 0, r.stderr
  assert calls(env) == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu", *SCOPE, "--quiet"]]
  r = run(env, "teardown.sh", *TARGET, "--yes", "--async")
  assert r.returncode == 0, r.stderr
  assert calls(env)[-1] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "my-tpu", *SCOPE,
                            "--force", "--quiet", "--async"]


def test_environment_supplies_the_target(env):
  e = dict(env, JAXENT_TPU_NAME="env-tpu", JAXENT_TPU_ZONE="us-central2-b")
  r = subprocess.run(["bash", str(SCRIPTS_DIR / "teardown.sh"), "--dry-run"], env=e,
                     capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  assert shlex.split(r.stdout) == ["gcloud", "compute", "tpus", "queued-resources", "delete", "env-tpu",
                                   "--zone=us-central2-b", "--force", "--quiet"]


# ---------------------------------------------------------------- bad input ---

BAD = [
    ("create.sh", ["--zone", "us-east5-a", "--accelerator-type", "v5p-8"], "--name is required"),
    ("create.sh", ["--name", "My_TPU", "--zone", "us-east5-a", "--accelerator-type", "v5p-8"], "--name 'My_TPU'"),
    ("create.sh", ["--name", "t", "--accelerator-type", "v5p-8"], "--zone is required"),
    ("create.sh", ["--name", "t", "--zone", "useast5", "--accelerator-type", "v5p-8"], "--zone 'useast5'"),
    ("create.sh", ["--name", "t", "--zone", "us-east5-a"], "--accelerator-type is required"),
    ("create.sh", ["--name", "t", "--zone", "us-east5-a", "--accelerator-type", "v5p-12"], "multiple of 8"),
    ("create.sh", ["--name", "t", "--zone", "us-east5-a", "--accelerator-type", "v6e-2"], "--accelerator-type 'v6e-2'"),
    ("create.sh", ["--name", "t", "--zone", "us-east5-a", "--accelerator-type", "v3-8"], "--accelerator-type 'v3-8'"),
    ("create.sh", ["--name", "t", "--zone", "us-east5-a", "--accelerator-type", "v5p-8", "--mode", "fast"], "--mode 'fast'"),
    ("create.sh", ["--name", "t", "--zone", "us-east5-a", "--accelerator-type", "v5p-8", "--preemptible"], "--preemptible"),
    ("create.sh", ["--name", "t", "--zone", "us-east5-a", "--accelerator-type", "v5p-8", "--spot", "--reserved"], "exclude each other"),
    ("create.sh", ["--name", "t", "--zone", "us-east5-a", "--accelerator-type", "v5p-8", "--project", "X"], "--project 'X'"),
    ("create.sh", ["--name"], "--name needs a value"),
    ("create.sh", ["--name", "--zone", "us-east5-a"], "--name needs a value"),
    ("create.sh", ["--frobnicate"], "unknown argument '--frobnicate'"),
    ("setup.sh", ["--name", "t", "--zone", "us-east5-a"], "give the source"),
    ("setup.sh", ["--name", "t", "--zone", "us-east5-a", "--src", "/nonexistent-dir"], "--src '/nonexistent-dir'"),
    ("setup.sh", ["--name", "t", "--zone", "us-east5-a", "--repo-url", "not a url"], "--repo-url 'not a url'"),
    ("setup.sh", ["--name", "t", "--zone", "us-east5-a", "--repo-url", "https://x/y.git", "--workdir", "~/j"], "--workdir"),
    ("setup.sh", ["--name", "t", "--zone", "us-east5-a", "--repo-url", "https://x/y.git", "--python", "py3"], "--python 'py3'"),
    ("stage.sh", ["--name", "t", "--zone", "us-east5-a", "--dest", "/data/x"], "--src is required"),
    ("stage.sh", ["--name", "t", "--zone", "us-east5-a", "--src", "gs://b/x"], "--dest is required"),
    ("stage.sh", ["--name", "t", "--zone", "us-east5-a", "--src", "gs://b/$(id)", "--dest", "/d"], "--src 'gs://b/$(id)'"),
    ("stage.sh", ["--name", "t", "--zone", "us-east5-a", "--src", "s3://b/x", "--dest", "/d"], "only gs://"),
    ("stage.sh", ["--name", "t", "--zone", "us-east5-a", "--src", "gs://b/x", "--dest", "/d x"], "--dest '/d x'"),
    ("launch.sh", ["--name", "t", "--zone", "us-east5-a"], "no jaxent command"),
    ("launch.sh", ["--name", "t", "--zone", "us-east5-a", "--", "--help"], "must start with a subcommand"),
    ("launch.sh", ["--name", "t", "--zone", "us-east5-a", "--env", "1X=2", "--", "train", "c.yaml"], "--env '1X=2'"),
    ("launch.sh", ["--name", "t", "--zone", "us-east5-a", "train", "c.yaml"], "goes after --"),
    ("logs.sh", ["--name", "t", "--zone", "us-east5-a", "--worker", "first"], "--worker 'first'"),
    ("logs.sh", ["--name", "t", "--zone", "us-east5-a", "--lines", "-3"], "--lines '-3'"),
    ("stop.sh", ["--name", "t", "--zone", "us-east5-a", "--signal", "HUP"], "--signal 'HUP'"),
    ("teardown.sh", ["--name", "t", "--zone", "us-east5-a", "--mode", "all"], "--mode 'all'"),
    ("teardown.sh", ["--zone", "us-east5-a", "--yes"], "--name is required"),
]


@pytest.mark.parametrize("script,args,message", BAD, ids=[f"{s}:{m}" for s, _, m in BAD])
def test_bad_arguments_exit_2(env, script, args, message):
  for extra in ([], ["--dry-run"]):
    r = run(env, script, *args, *extra)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr, r.stderr
    assert r.stdout == ""
  assert not Path(env["FAKE_MARKER"]).exists()
