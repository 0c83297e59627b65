"""One owner per run directory; fresh runs never replace a run; resume checks before it writes.

docs/RELIABILITY.md, "Run directory: one owner, nothing lost". The CLI runs in
this process (``cli.main``) on the tiny config of tests/test_reliability.py,
so the runs share compiled programs; the lock holder is a real process,
killed with SIGKILL to leave a stale lock.
"""
import glob
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import yaml

from jaxent import cli
from jaxent import config as C
from jaxent.errors import ConfigError, RunDirError
from jaxent.train import _rundir
from tests._tiny import run_config, write_config

BASE = run_config("rd", steps=2)


def _cfg_file(tmp):
  return write_config(tmp, BASE)


def _tree(root):
  """{relative path: sha256} of every file under ``root`` (the directory's exact contents)."""
  out = {}
  for d, _, files in os.walk(root):
    for n in files:
      p = os.path.join(d, n)
      out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
  return out


def _err_lines(capsys):
  return capsys.readouterr().err.strip().splitlines()


_HOLDER = r"""
import sys, time
from jaxent.train import _rundir
_rundir.lock(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def test_one_owner_stale_lock_fresh_overwrite_and_checked_resume(tmp_path, capsys):
  tmp = str(tmp_path)
  cfg = _cfg_file(tmp)
  run_dir = os.path.join(tmp, "run")
  train = lambda *extra: cli.main(["train", cfg, "--run-dir", run_dir, *extra])  # noqa: E731

  # -- a live owner: a second launch exits 2 with one line naming its host and pid
  script = tmp_path / "holder.py"
  script.write_text(_HOLDER)
  holder = subprocess.Popen([sys.executable, str(script), run_dir], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    assert train() == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and err[0].startswith(f"jaxent: error: run directory {run_dir} is in use "
                                               f"by pid {holder.pid} on host {socket.gethostname()}")
    assert os.listdir(run_dir) == ["run.lock"]               # nothing else written
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # -- the owner died holding it: the stale lock is reported and taken over
  assert train() == 0
  err = _err_lines(capsys)
  assert any(f"took over a stale lock of pid {holder.pid} on host {socket.gethostname()}" in line
             for line in err)
  assert open(os.path.join(run_dir, "run.lock")).read() == ""  # released at the end
  run1 = _tree(run_dir)
  assert {"config.yaml", "metrics.jsonl", "history.jsonl"} <= set(run1)

  # -- a fresh launch into the run: exit 2 naming --resume and --overwrite, nothing touched
  assert train() == 2
  err = _err_lines(capsys)
  assert len(err) == 1 and f"run directory {run_dir} already holds a run (" in err[0]
  assert "continue it with --resume, or start over with --overwrite" in err[0]
  assert _tree(run_dir) == run1

  # -- resume with incompatible fields: exit 2 listing each, nothing written
  assert train("--resume", "--set", "model.arch.hidden_size=64",
               "--set", "rollout.prompts_per_step=8", "--set", "train.steps=3") == 2
  err = _err_lines(capsys)
  assert len(err) == 1 and "--resume: the config is incompatible with the run in" in err[0]
  assert "model.arch.hidden_size 32 -> 64" in err[0] and "rollout.prompts_per_step 4 -> 8" in err[0]
  assert "train.steps" not in err[0]                         # a compatible change is not listed
  assert _tree(run_dir) == run1
  # a changed loss needs saying so
  assert train("--resume", "--set", "loss.name=clip_cov") == 2
  assert "loss.name changes from kl_cov to clip_cov; pass --change-loss" in _err_lines(capsys)[-1]
  assert _tree(run_dir) == run1
  # train.steps below the checkpoint: a clear message, nothing written
  assert train("--resume", "--set", "train.steps=1") == 2
  assert ("--resume: train.steps=1 is below the run's latest checkpoint (2)"
          in _err_lines(capsys)[-1])
  assert _tree(run_dir) == run1
  # train.steps equal to it: nothing to do, said so
  assert train("--resume") == 0
  assert "already at step 2 = train.steps; nothing to do" in capsys.readouterr().out

  # -- a compatible change resumes, and the history keeps each launch's diff and command line
  assert train("--resume", "--set", "train.steps=3", "--set", "train.ckpt_every=1") == 0
  rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [1, 2, 3]
  hist = [json.loads(line) for line in open(os.path.join(run_dir, "history.jsonl"))]
  assert [h["resume"] for h in hist] == [False, True, True]
  assert [h["start_step"] for h in hist] == [0, 2, 2]
  assert hist[-1]["config_diff"] == [{"key": "train.ckpt_every", "old": 2, "new": 1},
                                     {"key": "train.steps", "old": 2, "new": 3}]
  assert hist[-1]["command"][-4:] == ["--set", "train.steps=3", "--set", "train.ckpt_every=1"]
  assert yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))["train"]["steps"] == 3
  run2 = _tree(run_dir)

  # -- --overwrite moves the whole old run aside (byte for byte) and starts afresh
  assert train("--overwrite") == 0
  aside = glob.glob(os.path.join(tmp, "run.old-*"))
  assert len(aside) == 1
  assert _tree(aside[0]) == {k: v for k, v in run2.items() if k != "run.lock"}
  assert any(f"moved the previous contents of {run_dir} to {aside[0]}" in line
             for line in _err_lines(capsys))
  rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [1, 2]
  assert len(open(os.path.join(run_dir, "history.jsonl")).readlines()) == 1


def test_loss_change_with_flag_and_changed_data_content(tmp_path):
  """check_resume on its own: --change-loss admits a new loss.name; a training file whose
  content changed since the last launch is refused (its fingerprint is in the history)."""
  data = tmp_path / "train.jsonl"
  data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
  jsonl = {"model": {"path": str(tmp_path)}, "data": {"train_path": str(data)}}
  cfg = C.from_dict(jsonl)
  run_dir = str(tmp_path / "run")
  claim = _rundir.claim(run_dir, cfg, resume=False, command=["jaxent", "train"])
  claim.record(cfg, start_step=0)
  claim.release()
  fp = json.loads(open(os.path.join(run_dir, "history.jsonl")).readline())["data"]
  assert fp["size"] == data.stat().st_size
  assert fp["hash"] == hashlib.sha256(data.read_bytes()).hexdigest()

  new_loss = C.from_dict(jsonl, ["loss.name=clip_cov"])
  with pytest.raises(RunDirError, match="pass --change-loss"):
    _rundir.check_resume(run_dir, new_loss, fingerprint=_rundir.data_fingerprint(new_loss))
  diff = _rundir.check_resume(run_dir, new_loss, change_loss=True,
                              fingerprint=_rundir.data_fingerprint(new_loss))
  assert diff == [("loss.name", "ppo_clip", "clip_cov")]

  data.write_text('{"prompt": "1+2=", "answer": "3"}\n')   # same size, other content
  with pytest.raises(RunDirError, match=r"the content of data.train_path .*train.jsonl \(34 -> 34 "
                                        r"bytes, sha256 differs\)"):
    _rundir.check_resume(run_dir, cfg, fingerprint=_rundir.data_fingerprint(cfg))


@pytest.mark.parametrize("name", ["/tmp/abs", "../up", "a/../../b", "", "~/x"])
def test_run_name_must_be_relative(tmp_path, capsys, name):
  with pytest.raises(ConfigError, match="^name: must be a relative name"):
    C.from_dict({**BASE, "name": name})
  cfg = _cfg_file(str(tmp_path))
  assert cli.main(["train", cfg, "--set", f"name={name!r}"]) == 2
  assert _err_lines(capsys)[0].startswith("jaxent: error: name: must be a relative name")
