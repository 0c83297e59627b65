"""Reliability and security under faults and bad input (issue 9; docs/RELIABILITY.md).

Fault tests signal real processes: a ``jaxent train`` subprocess is killed
with SIGKILL after its first checkpoint and resumed, and a process is killed
inside an orbax checkpoint write. The other tests run the CLI in this process
(``cli.main``) on one tiny arithmetic config so they share compiled programs.
"""
import ast
import errno
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxent
from jaxent import cli
from jaxent import config as C
from jaxent import train as T
from jaxent.train import _build, _loop
from jaxent.errors import RunDirError
from jaxent.train._checkpoint import Checkpointer, run_path
from tests._tiny import run_config, write_config, metrics_rows

BASE = run_config("rel")
TIMING = ("step_time_s", "sample_time_s", "tokens_per_s")


def _cfg_file(tmp, **train):
  return write_config(tmp, {**BASE, "train": {**BASE["train"], **train}})


_rows = metrics_rows


def _strip(rows):
  return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _complete_steps(ckpt_dir):
  return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit()) if os.path.isdir(ckpt_dir) else []


def _params(run_dir, step=None):
  _, model, _, got = T.load_run(run_dir, step)
  return got, [np.asarray(x) for x in jax.tree.leaves(model.params)]


def _assert_bitwise(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def _one_line_error(capsys):
  err = capsys.readouterr().err.strip().splitlines()
  assert err, "no message on stderr"
  return err[-1]


# ------------------------------------------------------------------ exact resume after SIGKILL ---

@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
  """A CLI subprocess SIGKILLed after its first checkpoint, resumed; and an uninterrupted run.

  The uninterrupted reference runs in this process while the subprocess
  compiles (two cores); a watcher thread kills the subprocess once
  checkpoint 2 is complete and step 3 is logged, i.e. in the middle of the
  run with metrics past the checkpoint that the resume must rewrite.
  """
  tmp = str(tmp_path_factory.mktemp("resume"))
  cfg_path = _cfg_file(tmp)
  victim = os.path.join(tmp, "victim")
  log = open(os.path.join(tmp, "victim.log"), "w")
  proc = subprocess.Popen([sys.executable, "-m", "jaxent.cli", "train", cfg_path, "--run-dir", victim],
                          stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
  seen = {}

  def watch():
    metrics, ckpts = os.path.join(victim, "metrics.jsonl"), os.path.join(victim, "checkpoints")
    while proc.poll() is None:
      if 2 in _complete_steps(ckpts) and os.path.exists(metrics):
        with open(metrics) as f:
          n = sum(1 for _ in f)
        if n >= 3:
          proc.send_signal(signal.SIGKILL)
          proc.wait()
          seen.update(rows=n, steps=_complete_steps(ckpts))
          return
      time.sleep(0.01)

  watcher = threading.Thread(target=watch, daemon=True)
  watcher.start()
  try:
    cfg = C.load(cfg_path)
    ref = os.path.join(tmp, "reference")
    _loop.train(cfg, ref, _build.build_components(cfg, ref))
    watcher.join(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.wait()
    log.close()
  out = open(os.path.join(tmp, "victim.log")).read()
  assert proc.returncode == -signal.SIGKILL, \
      f"victim was not killed mid-run (rc {proc.returncode}):\n{out}"
  seen["resume_rc"] = cli.main(["train", cfg_path, "--run-dir", victim, "--resume"])
  return ref, victim, seen


def test_sigkill_after_checkpoint_then_resume_is_exact(killed_and_resumed):
  ref, victim, seen = killed_and_resumed
  # killed mid-run: past its first checkpoint, before its last
  assert 2 <= seen["steps"][-1] < 8 and seen["rows"] >= 3
  assert seen["resume_rc"] == 0
  # same metrics rows (data order and sampling RNG included), timing aside
  rows, ref_rows = _rows(victim), _rows(ref)
  assert [r["step"] for r in rows] == list(range(1, 9))
  assert _strip(rows) == _strip(ref_rows)
  assert all(r["grad_norm"] > 0 for r in rows)               # every update moved the parameters
  # bitwise-equal parameters at the end, loaded from each run's last checkpoint
  step_a, a = _params(victim)
  step_b, b = _params(ref)
  assert step_a == step_b == 8
  _assert_bitwise(a, b)
  ckpts = [_complete_steps(os.path.join(d, "checkpoints")) for d in (victim, ref)]
  assert ckpts[0] == ckpts[1]


# -------------------------------------------------------------- kill during a checkpoint write ---

_WRITER = r"""
import sys, time
import jax.numpy as jnp
from orbax.checkpoint._src.path import atomicity
from jaxent.train._checkpoint import Checkpointer

ck = Checkpointer(sys.argv[1])
ck.save(1, {"w": jnp.arange(6.0)}, {"rl_step": 1, "data": {"pos": 1}})

async def hang(self):  # every item is written; the commit (rename) is next
  print("committing", flush=True)
  time.sleep(600)

atomicity.AtomicRenameTemporaryPath.finalize = hang
ck.save(2, {"w": jnp.arange(6.0) + 100}, {"rl_step": 2, "data": {"pos": 2}})
"""


def test_kill_during_checkpoint_write_keeps_previous(tmp_path):
  """SIGKILL between writing step 2's data and renaming it into place: step 1 stays the latest."""
  script = tmp_path / "writer.py"
  script.write_text(_WRITER)
  ck_dir = str(tmp_path / "ck")
  proc = subprocess.Popen([sys.executable, str(script), ck_dir], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  watchdog = threading.Timer(120, proc.kill)               # never hang the suite
  watchdog.start()
  try:
    line = proc.stdout.readline()
  finally:
    watchdog.cancel()
    proc.kill()
    proc.wait()
  assert line.strip() == "committing", "the writer did not reach the commit of step 2"
  assert proc.returncode == -signal.SIGKILL
  names = sorted(os.listdir(ck_dir))
  assert names == ["1", "2.orbax-checkpoint-tmp"]           # the partial write is there
  assert os.listdir(os.path.join(ck_dir, "2.orbax-checkpoint-tmp"))
  ck = Checkpointer(ck_dir)
  try:
    assert ck.latest_step() == 1                             # ... and never listed
    state, host = ck.restore(1, {"w": jnp.zeros(6)})
    np.testing.assert_array_equal(state["w"], np.arange(6.0))
    assert host == {"rl_step": 1, "data": {"pos": 1}}
    # a resumed run saves step 2 again: the partial directory is replaced
    ck.save(2, {"w": jnp.arange(6.0) + 7}, {"rl_step": 2, "data": {"pos": 2}})
    assert sorted(os.listdir(ck_dir)) == ["1", "2"] and ck.latest_step() == 2
    np.testing.assert_array_equal(ck.restore(2, {"w": jnp.zeros(6)})[0]["w"], np.arange(6.0) + 7)
  finally:
    ck.close()


# ------------------------------------------------------------- full disk, unwritable run dir ---

def _fail_commit(monkeypatch, exc_for_step):
  """Makes orbax's commit of a checkpoint raise ``exc_for_step(step)`` (None: commit normally)."""
  from orbax.checkpoint._src.path import atomicity
  orig = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self):
    step = self.get_final().parent.name.split(".")[0]       # <step>.orbax-checkpoint-tmp/<item>
    exc = exc_for_step(step)
    if exc is not None:
      raise exc
    return await orig(self)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)


def test_checkpoint_write_failures_are_reported(tmp_path, monkeypatch):
  """OSError and tensorstore's status-coded ValueError become RunDirError; other errors pass through."""
  ck_dir = str(tmp_path / "ck")
  ck = Checkpointer(ck_dir)
  state = {"w": jnp.arange(4.0)}
  ck.save(1, state, {"rl_step": 1})
  ts_msg = ('RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "x": Failed to '
            "write 352759 bytes to file 11: No space left on device [os_error_code='28']")
  errors = {"2": OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "3": ValueError(ts_msg),
            "4": ValueError("a bug, not an I/O failure")}
  _fail_commit(monkeypatch, lambda step: errors.get(step))
  for step in (2, 3):
    with pytest.raises(RunDirError) as e:
      ck.save(step, state, {"rl_step": step})
    assert e.value.errno == errno.ENOSPC
    msg = str(e.value)
    assert f"cannot write checkpoint {step} to {ck_dir}" in msg and "No space left on device" in msg
    assert "the last complete checkpoint (1) is kept" in msg
    assert sorted(os.listdir(ck_dir)) == ["1"]               # partial write removed, space freed
  with pytest.raises(ValueError, match="a bug"):
    ck.save(4, state, {"rl_step": 4})
  assert ck.latest_step() == 1
  np.testing.assert_array_equal(ck.restore(1, state)[0]["w"], np.arange(4.0))
  outside = tmp_path / "outside"
  outside.mkdir()
  os.symlink(outside, os.path.join(ck_dir, "5"))            # orbax would write through it
  with pytest.raises(RunDirError, match="5 is a symlink; refusing"):
    ck.save(5, state, {"rl_step": 5})
  assert os.listdir(outside) == []
  ck.close()
  (tmp_path / "file").write_text("x")
  with pytest.raises(RunDirError, match=re.escape(f"{tmp_path / 'file'} exists and is not a directory")):
    Checkpointer(str(tmp_path / "file"))


def test_disk_full_mid_run_exit_2_keeps_checkpoint_then_resumes(tmp_path, monkeypatch, capsys):
  cfg_path = _cfg_file(str(tmp_path), steps=6)
  run_dir = str(tmp_path / "run")
  _fail_commit(monkeypatch, lambda step: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
               if step == "4" else None)
  assert cli.main(["train", cfg_path, "--run-dir", run_dir]) == 2
  msg = _one_line_error(capsys)
  ck_dir = os.path.realpath(os.path.join(run_dir, "checkpoints"))
  assert msg.startswith(f"jaxent: error: cannot write checkpoint 4 to {ck_dir}: ")
  assert "No space left on device" in msg and "checkpoint (2) is kept" in msg
  assert os.listdir(ck_dir) == ["2"]
  assert [r["step"] for r in _rows(run_dir)] == [1, 2, 3, 4]
  assert _params(run_dir)[0] == 2                            # the kept checkpoint loads
  # space freed: --resume continues from it to the end
  monkeypatch.undo()
  assert cli.main(["train", cfg_path, "--run-dir", run_dir, "--resume"]) == 0
  assert [r["step"] for r in _rows(run_dir)] == [1, 2, 3, 4, 5, 6]
  assert _complete_steps(ck_dir) == [2, 4, 6]


def test_unwritable_run_directory_exit_2_naming_the_path(tmp_path, capsys):
  cfg_path = _cfg_file(str(tmp_path))
  # the run directory lies under a regular file
  blocker = tmp_path / "blocker"
  blocker.write_text("")
  assert cli.main(["train", cfg_path, "--run-dir", str(blocker / "run")]) == 2
  msg = _one_line_error(capsys)
  assert str(blocker) in msg and "Not a directory" in msg
  # checkpoints/ is a regular file (tests run as root, so chmod would not stop a write)
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  (run_dir / "checkpoints").write_text("not a directory")
  assert cli.main(["train", cfg_path, "--run-dir", str(run_dir)]) == 2
  msg = _one_line_error(capsys)
  assert f"{os.path.realpath(run_dir / 'checkpoints')} exists and is not a directory" in msg
  assert not (run_dir / "metrics.jsonl").exists()            # stopped before any step
  # --resume with nothing to resume from
  os.remove(run_dir / "checkpoints")
  assert cli.main(["train", cfg_path, "--run-dir", str(run_dir), "--resume"]) == 2
  msg = _one_line_error(capsys)
  assert f"--resume: no complete checkpoint under {os.path.realpath(run_dir / 'checkpoints')}" in msg


# --------------------------------------------------------------------------- escaping paths ---

def test_run_path_refuses_paths_outside_the_run_directory(tmp_path):
  run, outside = tmp_path / "run", tmp_path / "outside"
  run.mkdir()
  outside.mkdir()
  assert run_path(str(run), "checkpoints") == os.path.join(os.path.realpath(run), "checkpoints")
  (run / "inner").mkdir()
  os.symlink(run / "inner", run / "ok")                      # a symlink that stays inside is fine
  assert run_path(str(run), "ok", "x") == os.path.realpath(run / "inner" / "x")
  linked = tmp_path / "linked_run"
  os.symlink(run, linked)                                    # the run directory itself may be a link
  assert run_path(str(linked), "metrics.jsonl") == os.path.join(os.path.realpath(run), "metrics.jsonl")
  with pytest.raises(RunDirError, match="outside the run directory"):
    run_path(str(run), "..", "outside")
  os.symlink(outside, run / "checkpoints")
  with pytest.raises(RunDirError, match=r"checkpoints resolves to .*outside, outside the run directory"):
    run_path(str(run), "checkpoints")
  with pytest.raises(RunDirError, match="outside the run directory"):
    run_path(str(run), "checkpoints", "2")
  os.symlink("/etc/passwd", run / "metrics.jsonl")
  with pytest.raises(RunDirError, match="outside the run directory"):
    run_path(str(run), "metrics.jsonl")


@pytest.mark.parametrize("name", ["checkpoints", "data", "config.yaml", "metrics.jsonl"])
def test_cli_refuses_symlinks_out_of_the_run_directory(tmp_path, capsys, name):
  cfg_path = _cfg_file(str(tmp_path), steps=1, ckpt_every=0)
  run_dir, outside = tmp_path / "run", tmp_path / "outside"
  run_dir.mkdir()
  outside.mkdir()
  target = outside / name
  if name in ("checkpoints", "data"):
    target.mkdir()
  else:
    target.write_text("precious\n")
  os.symlink(target, run_dir / name)
  assert cli.main(["train", cfg_path, "--run-dir", str(run_dir)]) == 2
  msg = _one_line_error(capsys)
  assert f"{run_dir / name} resolves to {os.path.realpath(target)}, outside the run directory" in msg
  if target.is_dir():
    assert os.listdir(target) == []                          # nothing written through the link
  else:
    assert target.read_text() == "precious\n"


# ---------------------------------------------------------------------- non-finite updates ---

NAN_STEPS = (2, 4, 5)  # RL steps whose mini-batches get NaN advantages: NaN loss and gradients


def test_nonfinite_updates_skipped_counted_then_stop_with_checkpoint(tmp_path, monkeypatch, capsys):
  """NaN is injected into the batches the jitted update receives at chosen steps.

  (Rewards cannot carry it: graders zero non-finite rewards and GRPO gives
  NaN scores advantage 0.) One update per step: steps 2 and 4 stay under
  optim.max_nonfinite=2, step 5 makes 2 in a row and stops the run.
  """
  real_jit = _loop.jit_train_step

  def jit_train_step(*args, **kwargs):
    step_fn, calls = real_jit(*args, **kwargs), []

    def poisoned(state, mb):
      calls.append(None)
      if len(calls) in NAN_STEPS:                            # one update per RL step
        mb = mb._replace(advantages=mb.advantages * np.float32(np.nan))
      return step_fn(state, mb)

    return poisoned

  monkeypatch.setattr(_loop, "jit_train_step", jit_train_step)
  cfg_path = _cfg_file(str(tmp_path), steps=8, ckpt_every=1, keep_checkpoints=10)
  run_dir = str(tmp_path / "run")
  assert cli.main(["train", cfg_path, "--run-dir", run_dir]) == 3
  ck_dir = os.path.realpath(os.path.join(run_dir, "checkpoints"))
  assert _one_line_error(capsys) == (
      f"jaxent: stopped at step 5: 2 non-finite updates in a row (optim.max_nonfinite=2); "
      f"checkpoint 5 saved in {ck_dir}")
  rows = _rows(run_dir)
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
  assert [r["skipped"] for r in rows] == [0, 1, 0, 1, 1]
  assert [r["nonfinite_in_a_row"] for r in rows] == [0, 1, 0, 1, 2]
  for r in rows:                                             # NaN is logged as null
    assert (r["loss"] is None) == (r["grad_norm"] is None) == (r["step"] in NAN_STEPS)
  assert _complete_steps(ck_dir) == [1, 2, 3, 4, 5]
  # a skipped update leaves the parameters exactly as they were
  p = {s: _params(run_dir, s)[1] for s in (1, 2, 3, 5)}
  _assert_bitwise(p[2], p[1])
  _assert_bitwise(p[5], p[3])
  assert any(not np.array_equal(x, y) for x, y in zip(p[3], p[2]))  # the finite step 3 did update
  for leaves in p.values():
    assert all(np.isfinite(x).all() for x in leaves)


# ------------------------------------------------------------------------------- bad data ---

BAD_ROWS = ['{"prompt": "1+2=", "answer"', '[1, 2]', '{"answer": "3$"}',
            '{"prompt": 12, "answer": "3$"}', '{"prompt": "1+x=", "answer": "3$"}',
            '{"prompt": "  ", "answer": "3$"}']


def test_bad_rows_skipped_and_counted_in_metrics(tmp_path, monkeypatch):
  real_files = _build.arithmetic_files

  def files(cfg, directory, **kw):
    train, held = real_files(cfg, directory, **kw)
    with open(train, "a") as f:
      f.write("\n".join(BAD_ROWS) + "\n")
    return train, held

  monkeypatch.setattr(_build, "arithmetic_files", files)
  cfg = C.from_dict(BASE, ["train.steps=2", "train.ckpt_every=0"])
  run_dir = str(tmp_path / "run")
  res = _loop.train(cfg, run_dir, _build.build_components(cfg, run_dir))
  assert len(res.history) == 2
  n_good = sum(1 for _ in open(os.path.join(run_dir, "data", "train.jsonl"))) - len(BAD_ROWS)
  for r in _rows(run_dir):
    assert (r["data_rows"], r["data_valid"]) == (n_good + 6, n_good)
    assert (r["data_malformed"], r["data_missing_field"], r["data_wrong_type"],
            r["data_tokenize_error"], r["data_empty"]) == (2, 1, 1, 1, 1)


@pytest.mark.parametrize("kind", ["empty", "only_bad", "directory", "missing", "not_utf8"])
def test_empty_or_unreadable_dataset_exit_2(tmp_path, monkeypatch, capsys, kind):
  bad = tmp_path / "bad.jsonl"
  if kind == "empty":
    bad.write_text("")
  elif kind == "only_bad":
    bad.write_text("\n".join(BAD_ROWS) + "\n")
  elif kind == "directory":
    bad.mkdir()
  elif kind == "not_utf8":
    bad.write_bytes(b"\xff\xfe\x00garbage\n\x80\x81\n")
  real_files = _build.arithmetic_files
  monkeypatch.setattr(_build, "arithmetic_files", lambda *a, **k: (str(bad), real_files(*a, **k)[1]))
  cfg_path = _cfg_file(str(tmp_path))
  run_dir = tmp_path / "run"
  assert cli.main(["train", cfg_path, "--run-dir", str(run_dir)]) == 2
  msg = _one_line_error(capsys)
  assert msg.startswith("jaxent: error: ") and "bad.jsonl" in msg
  assert {"empty": "no valid rows", "only_bad": "no valid rows", "directory": "directory",
          "missing": "not found", "not_utf8": "no valid rows"}[kind] in msg
  assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------- bad config ---

@pytest.mark.parametrize("override, needle", [
    ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
    ("train.steps=[1]", "train.steps: expected an integer"),
    ("loss.ratio=1.5", "loss.ratio: must be in (0, 1]"),
    ("optim.max_nonfinite=0", "optim.max_nonfinite: must be >= 1"),
    ("loss.name=grpo",
     "loss.name: 'grpo' is not allowed; choose one of ['ppo_clip', 'clip_cov', 'kl_cov', 'gspo', 'cispo', 'gmpo']"),
    ("train.stepz=3", "train.stepz: unknown key; did you mean 'train.steps'?"),
])
def test_cli_bad_config_exit_2_one_line_nothing_written(tmp_path, capsys, override, needle):
  cfg_path = _cfg_file(str(tmp_path))
  run_dir = tmp_path / "never"
  assert cli.main(["train", cfg_path, "--set", override, "--run-dir", str(run_dir)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("jaxent: error: ") and needle in err[0]
  assert not run_dir.exists()


# ------------------------------------------------------------------------- untrusted files ---

# (file, call) pairs allowed to deserialize with pickle, and why: the grader
# worker unpickles the reward function reference that its own parent pickled
# from the registry (never model output, never a file).
_PICKLE_ALLOWED = {("rewards/_worker.py", "pickle.loads")}


_PICKLERS = ("pickle.", "cPickle.", "dill.", "cloudpickle.", "marshal.", "shelve.")
_UNPICKLE = ("load", "loads", "Unpickler", "open")


def _dotted(node):
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  if isinstance(node, ast.Name):
    parts.append(node.id)
    return ".".join(reversed(parts))
  return None


def _unsafe_calls(tree):
  """(line, what) for each call in ``tree`` that could run code from data."""
  imported = {}  # local name -> module.attr for `from pickle import loads` and the like
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      for a in node.names:
        imported[a.asname or a.name] = f"{node.module}.{a.name}"
  found = []
  for node in ast.walk(tree):
    if not isinstance(node, ast.Call):
      continue
    name = _dotted(node.func)
    name = imported.get(name, name)
    kw = {k.arg: k.value for k in node.keywords if k.arg}
    if name in ("eval", "exec", "compile", "__import__", "builtins.eval", "builtins.exec"):
      found.append((node.lineno, name))
    elif name and name.startswith(_PICKLERS) and name.rsplit(".", 1)[1] in _UNPICKLE:
      found.append((node.lineno, name))
    elif name in ("torch.load", "yaml.load", "yaml.unsafe_load", "yaml.full_load", "joblib.load"):
      found.append((node.lineno, name))
    elif name in ("np.load", "numpy.load") and "allow_pickle" in kw:
      found.append((node.lineno, f"{name}(allow_pickle=...)"))
    if "trust_remote_code" in kw and not (isinstance(kw["trust_remote_code"], ast.Constant)
                                          and kw["trust_remote_code"].value is False):
      found.append((node.lineno, "trust_remote_code not False"))
  return found


def test_source_never_unpickles_evaluates_or_trusts_remote_code():
  root = pathlib.Path(jaxent.__file__).parent
  files = sorted(root.rglob("*.py"))
  assert len(files) > 20
  bad = []
  for path in files:
    rel = path.relative_to(root).as_posix()
    for line, what in _unsafe_calls(ast.parse(path.read_text(), filename=str(path))):
      if (rel, what) not in _PICKLE_ALLOWED:
        bad.append(f"jaxent/{rel}:{line}: {what}")
  assert not bad, "unsafe deserialization or code execution:\n" + "\n".join(bad)
  # the scanner itself finds each pattern (so a pass above means something)
  probe = ast.parse("import pickle, torch, yaml\nfrom pickle import loads\neval(s)\nexec(s)\n"
                    "pickle.load(f)\nloads(b)\ntorch.load(p)\nyaml.load(s)\n"
                    "np.load(p, allow_pickle=True)\n"
                    "AutoModel.from_pretrained(p, trust_remote_code=True)\nf(trust_remote_code=flag)\n"
                    "g(trust_remote_code=False)\nre.compile('x')\nmodel.eval()\n")
  assert [w for _, w in sorted(_unsafe_calls(probe))] == [
      "eval", "exec", "pickle.load", "pickle.loads", "torch.load", "yaml.load",
      "np.load(allow_pickle=...)", "trust_remote_code not False", "trust_remote_code not False"]
