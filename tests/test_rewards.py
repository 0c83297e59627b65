"""Reward registry, graders, and the bounded grader pool (issue 7, issue 9).

One GraderPool (2 workers) is shared by the module: its startup (a fresh
interpreter importing sympy and math-verify) is the main fixed cost.
"""
import math
import os
import signal
import threading
import time

import numpy as np
import pytest

from jaxent import rewards as R

TIMEOUT = 1.5  # per-item bound used by the adversarial tests (seconds)
WORKERS = 2


@pytest.fixture(scope="module")
def pool():
  p = R.GraderPool(WORKERS)
  yield p
  p.close()


# Module-level reward functions: workers import them by reference.
def _raises(response, answer):
  raise RuntimeError("boom")


def _sleeps(response, answer):
  time.sleep(1000)
  return 1.0


def _segfaults(response, answer):
  os.kill(os.getpid(), signal.SIGSEGV)
  return 1.0


def _allocates(response, answer):
  return float(len(bytearray(3 << 30)))  # 3 GiB > the 2 GiB RLIMIT_AS


def _nan(response, answer):
  return math.nan


def _length(response, answer):
  return float(len(response))


# --- registry ---------------------------------------------------------------

def test_registry_names_and_unknown_name():
  for name in ("math", "arithmetic_exact", "arithmetic_partial", "exact_match"):
    assert name in R.reward_names()
    assert callable(R.get_reward(name))
  with pytest.raises(ValueError, match="unknown reward 'nope'.*arithmetic_exact.*math"):
    R.get_reward("nope")
  with pytest.raises(ValueError, match="unknown reward"):
    R.grade_batch("nope", ["1"], ["1"])
  with pytest.raises(ValueError, match="module-level"):
    R.register_reward("lambda_reward", lambda r, a: 1.0)
  with pytest.raises(ValueError, match="already registered"):
    R.register_reward("math", R.math_reward)
  assert R.reward_spec("math").isolated and not R.reward_spec("arithmetic_exact").isolated


def test_grade_batch_argument_errors():
  with pytest.raises(ValueError, match="same length"):
    R.grade_batch("arithmetic_exact", ["1$"], ["1$", "2$"])
  for bad in (0, -1.0, math.inf, math.nan, "5"):
    with pytest.raises(ValueError, match="timeout_s"):
      R.grade_batch("arithmetic_exact", ["1$"], ["1$"], timeout_s=bad)


# --- arithmetic (inline) ----------------------------------------------------

def test_arithmetic_exact_hand_cases():
  gold = "46;102$"  # 12+34+56
  cases = [
      ("46;102$", 1.0, 1.0),
      ("45;102$", 1.0, 0.5),       # final right, partial wrong
      ("46;101$", 0.0, 0.5),
      ("46;102$___", 1.0, 1.0),    # padding after EOS is ignored
      ("46;102$7;8$", 1.0, 1.0),   # only the text before the first $ counts
      ("0046;0102$", 1.0, 1.0),    # leading zeros: same numbers
      ("102$", 1.0, 0.0),          # one step instead of two: final counts
      ("46;102", 0.0, 0.0),        # no EOS: truncated response
      ("46;;102$", 0.0, 0.0),      # malformed
      ("46;10 2$", 0.0, 0.0),
      ("", 0.0, 0.0),
      ("$", 0.0, 0.0),
      ("46;1e2$", 0.0, 0.0),
  ]
  responses = [c[0] for c in cases]
  exact = R.grade_batch("arithmetic_exact", responses, [gold] * len(cases))
  partial = R.grade_batch("arithmetic_partial", responses, [gold] * len(cases))
  np.testing.assert_array_equal(exact.rewards, np.float32([c[1] for c in cases]))
  np.testing.assert_array_equal(partial.rewards, np.float32([c[2] for c in cases]))
  assert exact.rewards.dtype == np.float32
  assert (exact.failures, exact.timeouts) == (0, 0)
  # a bare final sum is accepted as the gold
  assert R.arithmetic_exact("46;102$", "102") == 1.0


def test_inline_failures_are_counted_not_raised():
  res = R.grade_batch("arithmetic_exact",
                      ["46;102$", None, 12, b"46;102$", "\ud800;102$", "46;102$"],
                      ["46;102$", "46;102$", "46;102$", "46;102$", "46;102$", "not a gold"])
  # None and 12 are not text; the malformed gold raises inside the grader;
  # bytes are decoded; the lone surrogate becomes '?' and the row is malformed.
  np.testing.assert_array_equal(res.rewards, np.float32([1, 0, 0, 1, 0, 0]))
  assert res.failures == 3 and res.timeouts == 0
  assert res.counters() == {"reward_failures": 3, "reward_timeouts": 0}


def test_exact_match():
  res = R.grade_batch("exact_match", [" yes\n", "no"], ["yes", "yes"])
  np.testing.assert_array_equal(res.rewards, np.float32([1, 0]))


# --- math-verify through the pool -------------------------------------------

MATH_CASES = [
    (r"So the result is \boxed{1/2}.", "0.5", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"We get $\frac{1}{2}$", "1/2", 1.0),
    (r"\boxed{\dfrac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", 1.0),   # bare LaTeX gold
    ("The answer is 42", "42", 1.0),
    ("The final answer is 42.", 42, 1.0),                       # numeric gold
    ("The answer is 41", "42", 0.0),
    (r"\boxed{3} wait, no: \boxed{4}", "4", 1.0),               # the last box
    (r"\boxed{\frac{2}{4}}", r"\frac{1}{2}", 1.0),
    (r"\boxed{x+1}", "1+x", 1.0),
    (r"\boxed{x+2}", "1+x", 0.0),
    ("I do not know.", "7", 0.0),
]


def test_math_normal_cases(pool):
  responses, golds, expected = zip(*MATH_CASES)
  res = R.grade_batch("math", responses, golds, timeout_s=10.0, pool=pool)
  np.testing.assert_array_equal(res.rewards, np.float32(expected))
  assert (res.failures, res.timeouts) == (0, 0)


def test_math_unparseable_gold_counts_as_failure(pool):
  res = R.grade_batch("math", [r"\boxed{1}"], ["}"], timeout_s=10.0, pool=pool)
  assert res.rewards.tolist() == [0.0] and res.failures == 1


def _adversarial():
  """(name, response, gold) that are slow, huge or broken; none is correct."""
  return [
      ("power tower", "The answer is 10^10^10^10", "5"),
      ("boxed tower", r"\boxed{9^{9^{9^{9}}}}", "5"),
      ("tower vs tower", r"\boxed{10^{10^{10^{10}}}}", r"10^{10^{10^{10}}}+1"),
      ("10k braces", r"\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}", "2"),
      ("10k parens", "The answer is " + "(" * 10_000 + "1" + ")" * 10_000, "2"),
      ("megabyte sum", "1+" * 500_000 + "1", "5"),
      ("megabyte junk", "\\" * 1_000_000, "5"),
      ("lone surrogates", "\ud800\udfff\\boxed{\ud800}", "5"),
      ("invalid utf-8", b"\xff\xfe\\boxed{\xc3}", "5"),
      ("nested frac", r"\boxed{" + r"\frac{1}{" * 2000 + "2" + "}" * 2000 + "}", "1"),
      ("underbrace spam", r"\boxed{" + r"\underbrace{1}_{2}" * 20_000 + "}", "1"),
      ("factorial", r"\boxed{100000!}", "1"),
      ("code", "__import__('os').system('touch /tmp/jaxent_pwned')", "0"),
      ("boxed code", r"\boxed{__import__('os').system('touch /tmp/jaxent_pwned')}", "0"),
  ]


def test_math_adversarial_bounded_and_zero(pool):
  marker = "/tmp/jaxent_pwned"
  if os.path.exists(marker):
    os.remove(marker)
  cases = _adversarial()
  good = [(r"\boxed{7}", "7"), ("x" * 1_000_000 + r" so \boxed{5}", "5")]
  responses = [c[1] for c in cases] + [g[0] for g in good]
  golds = [c[2] for c in cases] + [g[1] for g in good]
  restarts = pool.restarts
  t0 = time.monotonic()
  res = R.grade_batch("math", responses, golds, timeout_s=TIMEOUT, pool=pool)
  wall = time.monotonic() - t0
  n = len(responses)
  bound = math.ceil(n / WORKERS) * TIMEOUT + 5.0
  assert wall < bound, f"batch took {wall:.1f} s > {bound:.1f} s"
  np.testing.assert_array_equal(res.rewards[: len(cases)], 0.0,
                                err_msg=str([c[0] for c in cases]))
  # the normal items in the same batch are graded correctly (one hung item
  # does not spoil its neighbours), the megabyte one included
  np.testing.assert_array_equal(res.rewards[len(cases):], 1.0)
  assert res.timeouts >= 1  # the power towers cannot finish in 1.5 s
  assert pool.restarts - restarts == res.timeouts  # each hung worker replaced
  assert not os.path.exists(marker), "model text was executed"
  # the pool is healthy afterwards
  again = R.grade_batch("math", [r"\boxed{2}"], ["2"], timeout_s=10.0, pool=pool)
  assert again.rewards.tolist() == [1.0]


@pytest.mark.parametrize("name", [c[0] for c in _adversarial()[:2]])
def test_math_single_pathological_item_bounded(pool, name):
  response, gold = {c[0]: c[1:] for c in _adversarial()}[name]
  t0 = time.monotonic()
  res = R.grade_batch("math", [response], [gold], timeout_s=0.5, pool=pool)
  assert time.monotonic() - t0 < 0.5 + 2.0
  assert res.rewards.tolist() == [0.0] and res.timeouts + res.failures == 1


def test_faulty_reward_functions_are_contained(pool):
  restarts = pool.restarts
  t0 = time.monotonic()
  out = {}
  for fn in (_raises, _sleeps, _segfaults, _allocates, _nan):
    # only the sleeper may reach its bound; the others fail at once (a
    # generous bound keeps a loaded machine from turning them into timeouts)
    out[fn.__name__] = pool.grade(fn, ["a"], ["b"], timeout_s=0.5 if fn is _sleeps else 10.0)
  assert time.monotonic() - t0 < 0.5 + 5.0
  for name, res in out.items():
    assert res.rewards.tolist() == [0.0], name
  counts = {k: (r.failures, r.timeouts) for k, r in out.items()}
  assert counts == {"_raises": (1, 0), "_sleeps": (0, 1), "_segfaults": (1, 0),
                    "_allocates": (1, 0), "_nan": (1, 0)}
  # the sleeper was killed and the segfaulted worker replaced
  assert pool.restarts - restarts == 2
  # strings of every kind reach the function intact (the module-level
  # function is imported by reference in the worker)
  texts = ["", "x" * 100_000, "é∑😀"]
  res = pool.grade(_length, texts, ["", "", ""], timeout_s=5.0)
  np.testing.assert_array_equal(res.rewards, np.float32([len(t) for t in texts]))


def test_grade_batch_off_main_thread(pool):
  results = {}

  def work():
    results["r"] = R.grade_batch("math", [r"\boxed{\frac{1}{2}}", "The answer is 3"],
                                 ["0.5", "4"], timeout_s=10.0, pool=pool)

  t = threading.Thread(target=work)
  t.start()
  t.join(60)
  assert results["r"].rewards.tolist() == [1.0, 0.0]
  assert results["r"].failures == 0


def _slow_length(response, answer):
  time.sleep(1.0)
  return float(len(response))


def test_server_death_regrades_the_batch_on_a_new_server(pool):
  """A server found dead between batches is replaced first; one that dies
  mid-batch is replaced and the batch graded again: no batch is lost."""
  before = pool.server_restarts
  os.kill(pool._proc.pid, signal.SIGKILL)
  pool._proc.wait()
  res = R.grade_batch("math", [r"\boxed{1}", r"\boxed{2}"], ["1", "2"],
                      timeout_s=10.0, pool=pool)
  assert res.rewards.tolist() == [1.0, 1.0] and (res.failures, res.timeouts) == (0, 0)
  assert pool.server_restarts == before + 1
  victim = pool._proc.pid
  killer = threading.Timer(0.3, os.kill, (victim, signal.SIGKILL))  # mid-batch: items sleep 1 s
  killer.start()
  res = pool.grade(_slow_length, ["abc", "z"], ["", ""], timeout_s=10.0)
  killer.join()
  assert pool._proc.pid != victim and pool.server_restarts == before + 2
  assert res.rewards.tolist() == [3.0, 1.0] and (res.failures, res.timeouts) == (0, 0)


def test_server_killed_while_starting_is_restarted(monkeypatch):
  """The first server dies before it is ready: the pool starts another and grades."""
  from jaxent.rewards import _pool
  real_popen = _pool.subprocess.Popen
  started = []

  def popen(*args, **kwargs):
    proc = real_popen(*args, **kwargs)
    started.append(proc.pid)
    if len(started) == 1:
      proc.kill()  # dies while importing math-verify, before "ready"
    return proc

  monkeypatch.setattr(_pool.subprocess, "Popen", popen)
  with R.GraderPool(1) as p:
    assert len(started) == 2 and p.server_restarts == 1
    res = R.grade_batch("math", [r"\boxed{7}"], ["7"], timeout_s=10.0, pool=p)
    assert res.rewards.tolist() == [1.0]

  def always_dies(*args, **kwargs):
    proc = real_popen(*args, **kwargs)
    proc.kill()
    return proc

  monkeypatch.setattr(_pool.subprocess, "Popen", always_dies)
  with pytest.raises(RuntimeError, match=r"failed to start.*2 attempts in a row"):
    R.GraderPool(1, start_attempts=2)


def test_trainer_death_takes_grader_processes_down(tmp_path):
  """SIGKILL of the trainer mid-batch: server and workers exit, none linger."""
  import subprocess
  import sys
  script = tmp_path / "victim.py"
  script.write_text(
      "import os, sys\n"
      "from jaxent import rewards as R\n"
      "p = R.GraderPool(2)\n"
      "print(p._proc.pid, flush=True)\n"
      "R.grade_batch('math', [r'\\boxed{9^{9^{9^{9}}}}'] * 2, ['1'] * 2,"
      " timeout_s=60, pool=p)\n")
  proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                          text=True)
  server_pid = int(proc.stdout.readline())
  workers = [int(p) for p in open(f"/proc/{server_pid}/task/{server_pid}/children").read().split()]
  assert len(workers) == 2
  time.sleep(0.3)  # the batch is now being graded (and hangs for 60 s)
  proc.kill()
  proc.wait()
  deadline = time.monotonic() + 10.0
  alive = [server_pid] + workers
  while alive and time.monotonic() < deadline:
    time.sleep(0.1)
    alive = [p for p in alive if _running(p)]
  assert not alive, f"grader processes outlived the trainer: {alive}"


def test_grader_processes_never_run_the_trainers_main(tmp_path):
  """Workers fork from the grader server, never from the trainer, and nothing
  re-imports the trainer's ``__main__`` (multiprocessing's spawn and forkserver
  re-import it in every worker, with all it imports: JAX, in a trainer)."""
  import subprocess
  import sys
  marker = tmp_path / "imported"
  script = tmp_path / "trainer.py"
  script.write_text(
      "import os, sys\n"
      f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\n"
      "from jaxent import rewards as R\n"
      "if __name__ == '__main__':\n"
      "  p = R.GraderPool(2)\n"
      "  res = R.grade_batch('math', ['The answer is 10^10^10^10', r'\\boxed{1}'],"
      " ['5', '1'], timeout_s=0.5, pool=p)\n"
      "  pid = p._proc.pid\n"
      "  kids = open(f'/proc/{pid}/task/{pid}/children').read().split()\n"
      "  print(res.rewards.tolist(), res.timeouts, len(kids), flush=True)\n"
      "  p.close()\n")
  out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=120, check=True).stdout.split("\n")[0]
  # the timed-out worker was replaced by a fork of the server: still 2 children
  assert out == "[0.0, 1.0] 1 2"
  assert marker.read_text() == "__main__\n"


def _running(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split(")")[-1].split()[0] != "Z"  # a zombie is gone
  except FileNotFoundError:
    return False
