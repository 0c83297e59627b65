"""SIGTERM / SIGINT during a run (docs/RELIABILITY.md, "Preemption and exact resume").

Real ``jaxent train`` subprocesses are signalled mid-run; an in-process run
signals itself after a chosen step, then resumes, and ends bitwise equal to
an uninterrupted run; the grace-period watchdog and the second signal are
checked on the ``Preemption`` object with its process exit replaced.
"""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxent import config as C
from jaxent.errors import EXIT_PREEMPTED, Preempted
from jaxent.train import _build, _loop, _preempt
from tests._tiny import run_config, write_config, metrics_rows

BASE = run_config("pre")
TIMING = ("step_time_s", "sample_time_s", "tokens_per_s")


def _cfg_file(tmp, **train):
  return write_config(tmp, {**BASE, "train": {**BASE["train"], **train}})


_rows = metrics_rows


def _steps(run_dir):
  d = os.path.join(run_dir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _n_rows(run_dir):
  try:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
      return sum(1 for _ in f)
  except FileNotFoundError:
    return 0


def _signal_after_rows(proc, run_dir, rows, signals, timeout=240):
  """Sends ``signals`` (in order, back to back) once ``run_dir`` has ``rows`` metrics rows."""
  t0 = time.monotonic()
  while proc.poll() is None and time.monotonic() - t0 < timeout:
    if _n_rows(run_dir) >= rows:
      for s in signals:
        proc.send_signal(s)
      return time.monotonic()
    time.sleep(0.01)
  raise AssertionError(f"the run never logged {rows} rows (rc {proc.poll()})")


def _launch(cfg_path, run_dir):
  return subprocess.Popen([sys.executable, "-m", "jaxent.cli", "train", cfg_path, "--run-dir", run_dir],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ))


def test_sigterm_saves_within_grace_and_exits_75(tmp_path):
  """A real CLI process: SIGTERM after step >= 2 saves that step's checkpoint (none is due
  before step 1000) and exits 75 with one line naming it, inside the grace period."""
  tmp = str(tmp_path)
  run_dir = os.path.join(tmp, "run")
  cfg_path = _cfg_file(tmp, steps=1000, ckpt_every=0, preempt_grace_s=60)
  proc = _launch(cfg_path, run_dir)
  try:
    t_term = _signal_after_rows(proc, run_dir, 2, [signal.SIGTERM])
    out, err = proc.communicate(timeout=120)
    took = time.monotonic() - t_term
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
  saved = _steps(run_dir)
  assert len(saved) == 1 and saved[0] >= 2                 # the step it stopped after
  n = saved[0]
  ck_dir = os.path.realpath(os.path.join(run_dir, "checkpoints"))
  lines = err.strip().splitlines()
  assert lines[-2:] == [
      "jaxent: SIGTERM: finishing the current step, then saving a checkpoint within "
      "train.preempt_grace_s=60 s (a second signal exits at once)",
      f"jaxent: SIGTERM after step {n}: checkpoint {n} saved in {ck_dir}; continue with --resume"]
  assert took < 60                                          # inside the grace period
  assert [r["step"] for r in _rows(run_dir)] == list(range(1, n + 1))
  assert os.path.exists(os.path.join(ck_dir, str(n), "jaxent_manifest.json"))
  assert open(os.path.join(run_dir, "run.lock")).read() == ""  # released on the way out
  assert "Traceback" not in err


# The main thread sits in one long C call, as it does inside a device program: the
# grace-period watchdog and a second signal must act without waiting for it.
_SLEEPER = r"""
import sys, time
from jaxent.train import _preempt
with _preempt.Preemption(float(sys.argv[1]), lambda: 7):
  print("ready", flush=True)
  time.sleep(60)
print("not reached", flush=True)
"""


@pytest.mark.parametrize("grace, signals, want", [
    (1.0, [signal.SIGTERM],
     "jaxent: SIGTERM: no checkpoint could be saved within train.preempt_grace_s=1 s; "
     "the last complete checkpoint is 7"),
    (60.0, [signal.SIGINT, signal.SIGINT],
     "jaxent: second SIGINT: exiting at once without a checkpoint; the last complete checkpoint is 7"),
])
def test_grace_expiry_and_second_signal_end_the_process_at_once(tmp_path, grace, signals, want):
  script = tmp_path / "sleeper.py"
  script.write_text(_SLEEPER)
  proc = subprocess.Popen([sys.executable, str(script), str(grace)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=dict(os.environ))
  try:
    assert proc.stdout.readline().strip() == "ready"
    t0 = time.monotonic()
    proc.send_signal(signals[0])
    if len(signals) > 1:
      assert proc.stderr.readline().startswith("jaxent: SIGINT: finishing the current step")
      proc.send_signal(signals[1])
    out, err = proc.communicate(timeout=30)
    took = time.monotonic() - t0
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == EXIT_PREEMPTED == 75
  assert err.strip().splitlines()[-1] == want and "not reached" not in out
  assert took < grace + 5 and (len(signals) == 1 or took < 5)
  if len(signals) == 1:
    assert took > grace - 0.1                                # not before the grace period ends


def _strip(rows):
  return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _wait_for_notice(capsys):
  """Until the signal's reader thread has printed its notice (it acts on the signal there)."""
  t0 = time.monotonic()
  while "finishing the current step" not in capsys.readouterr().err:
    assert time.monotonic() - t0 < 30, "the signal was never noticed"
    time.sleep(0.005)


def test_preempted_then_resumed_equals_uninterrupted(tmp_path, capsys):
  """The run signals itself during step 3 (ckpt_every=2): it saves checkpoint 3, raises
  Preempted; --resume ends with the uninterrupted run's metrics and bitwise parameters."""
  tmp = str(tmp_path)
  cfg = C.from_dict(BASE, ["train.steps=5"])
  ref_dir = os.path.join(tmp, "ref")
  ref = _loop.train(cfg, ref_dir, _build.build_components(cfg, ref_dir))

  run_dir = os.path.join(tmp, "run")

  def on_step(row):
    if row["step"] == 3:
      os.kill(os.getpid(), signal.SIGTERM)
      _wait_for_notice(capsys)

  handler = signal.getsignal(signal.SIGTERM)
  with pytest.raises(Preempted) as e:
    _loop.train(cfg, run_dir, _build.build_components(cfg, run_dir), on_step=on_step)
  assert e.value.exit_code == EXIT_PREEMPTED == 75
  ck_dir = os.path.realpath(os.path.join(run_dir, "checkpoints"))
  assert str(e.value) == (f"SIGTERM after step 3: checkpoint 3 saved in {ck_dir}; "
                          f"continue with --resume")
  assert signal.getsignal(signal.SIGTERM) is handler        # the previous handler is back
  assert _steps(run_dir) == [2, 3]
  assert [r["step"] for r in _rows(run_dir)] == [1, 2, 3]

  res = _loop.train(cfg, run_dir, _build.build_components(cfg, run_dir), resume=True)
  assert res.start_step == 3
  assert _strip(_rows(run_dir)) == _strip(_rows(ref_dir))
  for a, b in zip(jax.tree.leaves(res.state.params), jax.tree.leaves(ref.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_should_stop_weighs_the_last_save_against_the_time_left():
  pre = _preempt.Preemption(5.0, lambda: None, exit_now=lambda line: None)
  with pre:
    assert pre.should_stop(save_s=None) == (False, True)   # no signal: go on
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(500):                                     # the reader thread records it
      if pre.signum is not None:
        break
      time.sleep(0.01)
    assert pre.signum == signal.SIGTERM
    assert pre.should_stop(save_s=None) == (True, True)    # no save timed yet: try
    assert pre.should_stop(save_s=0.5) == (True, True)
    assert pre.should_stop(save_s=10.0) == (True, False)   # would not finish in time
  assert signal.getsignal(signal.SIGTERM) is not _preempt._ignore  # handlers restored
