"""Checkpoints are verified when restored (docs/RELIABILITY.md, "Damaged checkpoints").

One tiny run saves checkpoints 1, 2, 3; each test damages a copy of it the way
a disk or a crash does (bytes flipped, a file truncated or removed, a garbled
host state, NaN parameters with a valid manifest) and drives the real CLI:
``--resume`` skips the damaged newest checkpoint with one warning line and
resumes from 2; ``export`` refuses it.
"""
import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest

from jaxent import cli
from jaxent import config as C
from jaxent.train import _build, _checkpoint, _loop
from tests._tiny import run_config, write_config

BASE = run_config("ck", steps=3, ckpt_every=1, keep_checkpoints=10)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp("ck"))
  cfg_path = write_config(tmp, BASE)
  cfg = C.load(cfg_path)
  run_dir = os.path.join(tmp, "run")
  res = _loop.train(cfg, run_dir, _build.build_components(cfg, run_dir))
  return tmp, cfg_path, run_dir, res


def _copy(run, name):
  tmp, _, run_dir, _ = run
  dst = os.path.join(tmp, name)
  shutil.copytree(run_dir, dst, symlinks=True)
  return dst


def _state_files(run_dir, step):
  d = os.path.join(run_dir, "checkpoints", str(step))
  return sorted((p for p in glob.glob(os.path.join(d, "state", "**"), recursive=True)
                 if os.path.isfile(p)), key=os.path.getsize)


def _flip(path):
  b = bytearray(open(path, "rb").read())
  b[len(b) // 2] ^= 0xFF
  open(path, "wb").write(bytes(b))


def _steps(run_dir):
  return sorted(int(n) for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.isdigit())


def _drop_manifest(run_dir, step):
  os.remove(os.path.join(run_dir, "checkpoints", str(step), _checkpoint.MANIFEST))


def _nan_params(run_dir, res):
  """Checkpoint 3 rewritten with NaN parameters through the Checkpointer: a valid manifest."""
  ck = _checkpoint.Checkpointer(os.path.join(run_dir, "checkpoints"), keep=10)
  state, host = ck.restore(3, res.state)
  shutil.rmtree(os.path.join(run_dir, "checkpoints", "3"))
  ck._mgr.reload()
  state = state._replace(params=jax.tree.map(lambda x: x * np.float32(np.nan), state.params))
  ck.save(3, state, host)
  ck.close()
  assert ck.verify(3) is None                                # the files are as written


def _damage(kind, run_dir, res):
  if kind == "flipped bytes":                                # the largest array file
    _flip(_state_files(run_dir, 3)[-1])
    return "does not match its checksum"
  if kind == "truncated, no manifest":
    _drop_manifest(run_dir, 3)
    for p in _state_files(run_dir, 3):
      if os.path.getsize(p) > 64:
        with open(p, "r+b") as f:
          f.truncate(os.path.getsize(p) // 2)
    return "cannot be read"
  if kind == "metadata removed":
    os.remove(os.path.join(run_dir, "checkpoints", "3", "state", "_METADATA"))
    return "state/_METADATA is missing"
  if kind == "garbled host state, no manifest":
    _drop_manifest(run_dir, 3)
    for p in glob.glob(os.path.join(run_dir, "checkpoints", "3", "host", "*")):
      if os.path.isfile(p) and not p.endswith("commit_success.txt"):
        open(p, "wb").write(b"\x00{not json")
    return "cannot be read"
  if kind == "NaN parameters":
    _nan_params(run_dir, res)
    return "parameter array(s) hold NaN or inf"
  raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["flipped bytes", "truncated, no manifest", "metadata removed",
                                  "garbled host state, no manifest", "NaN parameters"])
def test_resume_skips_a_damaged_newest_checkpoint(run, capsys, kind):
  _, cfg_path, _, res = run
  run_dir = _copy(run, kind.replace(" ", "_").replace(",", ""))
  why = _damage(kind, run_dir, res)
  assert cli.main(["train", cfg_path, "--run-dir", run_dir, "--resume", "--set", "train.steps=4"]) == 0
  warn = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
  assert len(warn) == 1, warn
  assert warn[0].startswith("jaxent: warning: skipped damaged checkpoint 3 (") and why in warn[0]
  assert warn[0].endswith("resuming from checkpoint 2")
  # the damaged checkpoint was moved aside, not deleted; steps 3 and 4 were trained again
  aside = os.listdir(os.path.join(run_dir, "checkpoints_damaged"))
  assert len(aside) == 1 and aside[0].startswith("3-")
  assert _steps(run_dir) == [1, 2, 3, 4]
  rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  hist = [json.loads(line) for line in open(os.path.join(run_dir, "history.jsonl"))]
  assert hist[-1]["start_step"] == 2


def test_no_intact_checkpoint_exit_2_and_export_refuses_damage(run, capsys, tmp_path):
  _, cfg_path, _, res = run
  # every checkpoint damaged: exit 2 naming each, nothing trained
  run_dir = _copy(run, "all_bad")
  for step in (1, 2, 3):
    _flip(_state_files(run_dir, step)[-1])
  before = open(os.path.join(run_dir, "metrics.jsonl")).read()
  assert cli.main(["train", cfg_path, "--run-dir", run_dir, "--resume", "--set", "train.steps=4"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--resume: no intact checkpoint under" in err[0]
  for step in (3, 2, 1):
    assert f"checkpoint {step}: state/" in err[0]
  assert open(os.path.join(run_dir, "metrics.jsonl")).read() == before
  # export refuses a checkpoint whose bytes changed, and one holding NaN
  flipped = _copy(run, "export_flipped")
  _flip(_state_files(flipped, 3)[-1])
  assert cli.main(["export", flipped, str(tmp_path / "out1")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "checkpoint 3 in" in err[0] and "is damaged: state/" in err[0]
  assert "choose another with --step (complete: 1, 2)" in err[0]
  assert not (tmp_path / "out1").exists()
  nan = _copy(run, "export_nan")
  _nan_params(nan, res)
  assert cli.main(["export", nan, str(tmp_path / "out2")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "has NaN or inf in" in err[0] and "refusing to use it" in err[0]
  assert not (tmp_path / "out2").exists()
  # an intact earlier step still exports
  assert cli.main(["export", nan, str(tmp_path / "out3"), "--step", "2"]) == 0
  assert os.path.exists(tmp_path / "out3" / "config.json")


def test_manifest_records_every_file(run):
  """The manifest's sizes and CRC-32s are those of the files (zlib re-derived here)."""
  import zlib
  _, _, run_dir, _ = run
  d = os.path.join(run_dir, "checkpoints", "2")
  man = json.load(open(os.path.join(d, _checkpoint.MANIFEST)))["files"]
  files = sorted(os.path.relpath(os.path.join(r, n), d) for r, _, ns in os.walk(d) for n in ns)
  assert sorted(man) == [f for f in files if f != _checkpoint.MANIFEST]
  for rel, m in man.items():
    data = open(os.path.join(d, rel), "rb").read()
    assert m == {"size": len(data), "crc32": zlib.crc32(data)}
