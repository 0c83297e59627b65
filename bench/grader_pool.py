"""The hand-written grader pool vs ``pebble.ProcessPool``: speed and bounds.

Both pools grade the same batches in this process, 2 workers each:

  handwritten  ``jaxent.rewards.GraderPool``: a grader server (a fresh
               interpreter that imported math-verify and graded one item)
               forks its workers and enforces the per-item deadline.
  pebble       ``PebblePool`` below: ``pebble.ProcessPool`` on a forkserver
               context that preloads math-verify; one ``schedule(...,
               timeout=timeout_s)`` per item, TimeoutError -> timeout,
               ProcessExpired -> failure, a broken pool -> batch 0 and a new
               pool. Its worker initializer adds what pebble does not do:
               SIGTERM back to its default action (pebble's handler runs
               only when the worker checks for signals, so one in C code
               that never does, such as a C loop or GMP when sympy uses
               gmpy2, sits out pebble's 3 s grace before SIGKILL), RLIMIT_AS,
               warm-up, and a watchdog process that kills the worker when the
               trainer exits (forkserver children hold the forkserver's
               "alive" pipe, so it outlives a SIGKILLed trainer for as long as
               a worker is busy).
  pebble-bare  the same without the SIGTERM reset and the watchdog; run only
               in (c) and (g), to show why they are there.

Reported: start-up (constructor to the first graded item), then wall time
and items/s of (a) the hostile batch of
``tests/test_rewards.py::test_math_adversarial_bounded_and_zero`` (power
towers, 10k braces, megabyte strings, ... at a 1.5 s bound), (b) the faulty
reward functions of ``test_faulty_reward_functions_are_contained`` (raise,
sleep, segfault, 3 GiB, NaN; one per batch), (c) one item alone at a 0.5 s
bound (kill latency): a power tower, and ``c_loop`` (a C loop that never
checks for signals), (d) that tower then 8 ordinary items, 10 times
(kill and worker replacement), (e) 2,048 ordinary math items
(``\\boxed{3/4}`` vs ``0.75`` style pairs), twice, pools alternating; the
ratio pebble / handwritten of each; then the fault checks, each in fresh
processes: (f) the grader server / the forkserver SIGKILLed between
batches, (g) the trainer SIGKILLed mid-batch (grader processes still alive
10 s later), (h) start-up and kill + replacement when the trainer's
``__main__`` imports jax (forkserver children re-import it). About 2.5
minutes on 2 cores. pebble is not a jaxent dependency: ``pip install pebble``.

  .venv/bin/python bench/grader_pool.py [--items 2048] [--workers 2] [--skip-faults]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import fractions
import functools
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import numpy as np

from jaxent import rewards as R

_HERE = os.path.dirname(os.path.abspath(__file__))
_TESTS = os.path.join(os.path.dirname(_HERE), "tests")


# --- the pebble pool under test ---------------------------------------------

def _watchdog(trainer_pid: int) -> None:
  """Forks a process that SIGKILLs this worker when the trainer exits."""
  import ctypes  # pylint: disable=g-import-not-at-top
  import select  # pylint: disable=g-import-not-at-top
  worker = os.getpid()
  try:
    trainer = os.pidfd_open(trainer_pid)
  except ProcessLookupError:
    os._exit(0)
  if os.fork() == 0:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # dies with the worker
    if os.getppid() == worker:
      select.select([trainer], [], [])  # readable once the trainer has exited
      os.kill(worker, signal.SIGKILL)
    os._exit(0)
  os.close(trainer)


def _init_worker(memory_limit_mb, trainer_pid, bare):
  """Runs in each pebble worker before its first item."""
  import resource  # pylint: disable=g-import-not-at-top
  if not bare:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _watchdog(trainer_pid)
  if memory_limit_mb:
    limit = int(memory_limit_mb) << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
  from jaxent.rewards import _math  # pylint: disable=g-import-not-at-top
  _math.warm_up()


def c_loop(response, answer):
  """A reward that spins in C without checking for signals (for (c))."""
  return float(sum(range(10**11)) > 0)


def _grade_one(fn, response, answer):
  """``fn(response, answer)`` as a finite float, or None if it failed."""
  try:
    value = float(fn(response, answer))
  except BaseException:  # pylint: disable=broad-except
    return None
  return value if math.isfinite(value) else None


class PebblePool:
  """``GraderPool``'s interface on ``pebble.ProcessPool`` (forkserver).

  ``bare``: without the SIGTERM reset and the watchdog (pebble as it comes).
  """

  def __init__(self, num_workers: int = 2, *, memory_limit_mb: int | None = 2048,
               bare: bool = False):
    import pebble  # pylint: disable=g-import-not-at-top
    self._pebble = pebble
    self.bare = bare
    self.num_workers = num_workers
    self.memory_limit_mb = memory_limit_mb
    self.restarts = 0
    self.server_restarts = 0
    self._lock = threading.Lock()
    self._ctx = multiprocessing.get_context("forkserver")
    self._ctx.set_forkserver_preload(["math_verify", "jaxent.rewards._math"])
    self._pool = self._new_pool()

  def _new_pool(self):
    return self._pebble.ProcessPool(
        self.num_workers, initializer=_init_worker,
        initargs=(self.memory_limit_mb, os.getpid(), self.bare), context=self._ctx)

  def _restart_pool(self):
    self._pool.stop()
    self._pool.join(timeout=10)
    self.server_restarts += 1
    self._pool = self._new_pool()

  def close(self):
    with self._lock:
      self._pool.stop()
      self._pool.join(timeout=10)

  def grade(self, fn, responses, answers, *, timeout_s):
    n = len(responses)
    rewards = np.zeros(n, np.float32)
    failures = timeouts = 0
    batch_deadline = (math.ceil(n / self.num_workers) + 1) * timeout_s + 30.0
    with self._lock:
      if not self._pool.active:
        self._restart_pool()
      futures = {}
      for i, (r, a) in enumerate(zip(responses, answers)):
        if r is None or a is None:
          failures += 1
        else:
          futures[i] = self._pool.schedule(_grade_one, args=(fn, r, a), timeout=timeout_s)
      _, late = concurrent.futures.wait(futures.values(), timeout=batch_deadline)
      broken = bool(late)
      for i, fut in futures.items():
        if broken:
          break
        try:
          value = fut.result(timeout=0)
        except concurrent.futures.TimeoutError:
          timeouts += 1
          self.restarts += 1
        except self._pebble.ProcessExpired:
          failures += 1
          self.restarts += 1
        except Exception:  # pylint: disable=broad-except
          broken = True  # BrokenProcessPool: the pool aborted every task
        else:
          if value is None:
            failures += 1
          else:
            rewards[i] = value
      if broken:
        self._restart_pool()
        return R.GradeResult(np.zeros(n, np.float32), 0, n)
    return R.GradeResult(rewards, failures, timeouts)


POOLS = {"handwritten": R.GraderPool, "pebble": PebblePool,
         "pebble-bare": functools.partial(PebblePool, bare=True)}
MAIN = ("handwritten", "pebble")


# --- inputs -----------------------------------------------------------------

def _test_module():
  """tests/test_rewards.py: its hostile batch and faulty reward functions."""
  sys.path.insert(0, _TESTS)
  import test_rewards  # pylint: disable=g-import-not-at-top
  return test_rewards


def hostile_batch(t):
  """The batch of ``test_math_adversarial_bounded_and_zero`` (16 items)."""
  cases = t._adversarial()  # pylint: disable=protected-access
  good = [(r"\boxed{7}", "7"), ("x" * 1_000_000 + r" so \boxed{5}", "5")]
  return ([c[1] for c in cases] + [g[0] for g in good],
          [c[2] for c in cases] + [g[1] for g in good],
          np.float32([0.0] * len(cases) + [1.0] * len(good)))


def ordinary_batch(n: int):
  """``n`` (response, gold, expected) math items: fractions in four forms."""
  rng = np.random.RandomState(0)
  responses, golds, expected = [], [], []
  for i in range(n):
    q = int(rng.choice([2, 4, 5, 8, 10, 16, 20, 25]))    # terminating decimals
    p = int(rng.randint(1, 4 * q))
    v = fractions.Fraction(p, q)
    dec = f"{float(v):.6f}".rstrip("0").rstrip(".")
    frac = rf"\frac{{{v.numerator}}}{{{v.denominator}}}"
    form = i % 4
    if form == 0:
      responses.append(rf"Dividing, we get \boxed{{{p}/{q}}}.")
      golds.append(dec)
    elif form == 1:
      responses.append(rf"So $x = {dec}$ and the answer is \boxed{{{dec}}}")
      golds.append(frac)
    elif form == 2:
      responses.append(f"The final answer is {dec}.")
      golds.append(f"{v.numerator}/{v.denominator}")
    else:                                                 # a wrong answer
      responses.append(rf"\boxed{{\frac{{{p + q}}}{{{q}}}}}")
      golds.append(dec)
    expected.append(0.0 if form == 3 else 1.0)
  return responses, golds, np.float32(expected)


# --- measurements -----------------------------------------------------------

def _timed(pool, responses, answers, timeout_s):
  t0 = time.monotonic()
  res = R.grade_batch("math", responses, answers, timeout_s=timeout_s, pool=pool)
  return time.monotonic() - t0, res


def _row(name, kind, wall, n, res, extra=""):
  print(f"  {name:<34} {kind:<12} {wall:8.2f} s {n / wall:9.1f} items/s "
        f"fail={res.failures:<3} timeout={res.timeouts:<3}{extra}", flush=True)


def measure(args, t):
  out: dict[str, dict[str, float]] = {}
  pools = {}
  print(f"start-up (constructor -> first graded item), {args.workers} workers")
  for kind in MAIN:
    t0 = time.monotonic()
    pool = POOLS[kind](args.workers)
    res = pool.grade(R.math_reward, [r"\boxed{1/2}"], ["0.5"], timeout_s=10.0)
    wall = time.monotonic() - t0
    assert res.rewards.tolist() == [1.0], kind
    pools[kind] = pool
    out.setdefault("start-up", {})[kind] = wall
    print(f"  {kind:<12} {wall:6.2f} s", flush=True)

  print("(a) hostile batch of the tests, 16 items, timeout 1.5 s")
  hr, hg, hexp = hostile_batch(t)
  for kind, pool in pools.items():
    r0 = pool.restarts
    wall, res = _timed(pool, hr, hg, 1.5)
    ok = np.array_equal(res.rewards, hexp)
    _row("hostile", kind, wall, len(hr), res,
         f" replaced={pool.restarts - r0} rewards_as_tests_expect={ok}")
    out.setdefault("hostile", {})[kind] = wall

  print("(b) faulty reward functions, one per batch (sleeper at 0.5 s, others 10 s)")
  for kind, pool in pools.items():
    t0 = time.monotonic()
    counts = {}
    for fn in (t._raises, t._sleeps, t._segfaults, t._allocates, t._nan):  # pylint: disable=protected-access
      res = pool.grade(fn, ["a"], ["b"], timeout_s=0.5 if fn is t._sleeps else 10.0)  # pylint: disable=protected-access
      counts[fn.__name__] = (res.failures, res.timeouts)
    wall = time.monotonic() - t0
    print(f"  {'faulty x5':<34} {kind:<12} {wall:8.2f} s   {counts}", flush=True)
    out.setdefault("faulty", {})[kind] = wall

  print("(c) one item alone, timeout 0.5 s (kill latency): a power tower, and a C loop")
  # this module under its own name, so that workers import c_loop by reference
  import grader_pool  # pylint: disable=g-import-not-at-top,import-self
  pools["pebble-bare"] = POOLS["pebble-bare"](args.workers)
  for kind, pool in pools.items():
    for name, fn, response in (("power tower x3", R.math_reward, "The answer is 10^10^10^10"),
                               ("c_loop x3", grader_pool.c_loop, "x")):
      walls = []
      for _ in range(3):
        t0 = time.monotonic()
        res = pool.grade(fn, [response], ["5"], timeout_s=0.5)
        walls.append(time.monotonic() - t0)
      print(f"  {name:<34} {kind:<12} {' '.join(f'{w:.2f}' for w in walls)} s "
            f"(last: fail={res.failures} timeout={res.timeouts})", flush=True)
      out.setdefault(name.split()[0], {})[kind] = float(np.median(walls))
  pools.pop("pebble-bare").close()

  print("(d) a power tower (0.5 s bound) then 8 ordinary items, x10 (kill + replacement)")
  orr, org, oexp = ordinary_batch(8)
  for kind, pool in pools.items():
    t0 = time.monotonic()
    for _ in range(10):
      res = R.grade_batch("math", ["The answer is 10^10^10^10"], ["5"], timeout_s=0.5, pool=pool)
      res2 = R.grade_batch("math", orr, org, timeout_s=10.0, pool=pool)
    wall = time.monotonic() - t0
    print(f"  {'tower + 8 items, x10':<34} {kind:<12} {wall:8.2f} s  "
          f"{wall / 10 * 1000:.0f} ms per cycle; last timeout={res.timeouts} "
          f"8 items right={np.array_equal(res2.rewards, oexp)}", flush=True)
    out.setdefault("kill+8", {})[kind] = wall

  print(f"(e) {args.items} ordinary math items, timeout 5 s, 2 rounds alternating")
  orr, org, oexp = ordinary_batch(args.items)
  results = {}
  for rnd in range(2):
    for kind, pool in pools.items():
      wall, res = _timed(pool, orr, org, 5.0)
      _row(f"ordinary round {rnd + 1}", kind, wall, len(orr), res,
           f" correct_vs_label={float(np.mean(res.rewards == oexp)):.4f}")
      out.setdefault("ordinary", {}).setdefault(kind, []).append(wall)
      results[kind] = res.rewards
  same = np.array_equal(results["handwritten"], results["pebble"])
  print(f"  both pools give identical rewards: {same}")
  for pool in pools.values():
    pool.close()
  return out


# --- fault checks (separate processes) --------------------------------------

_VICTIM = textwrap.dedent("""\
    {prelude}
    import os, sys, time
    sys.path.insert(0, {here!r})
    from jaxent import rewards as R
    from grader_pool import POOLS
    if __name__ == "__main__":
      t0 = time.monotonic()
      p = POOLS[sys.argv[1]](2)
      R.grade_batch("math", [r"\\boxed{{1}}"], ["1"], timeout_s=60, pool=p)
      start = time.monotonic() - t0
      t0 = time.monotonic()
      for _ in range(5):
        R.grade_batch("math", ["The answer is 10^10^10^10"], ["5"], timeout_s=0.5, pool=p)
        R.grade_batch("math", [r"\\boxed{{1/2}}"] * 2, ["0.5"] * 2, timeout_s=60, pool=p)
      crash = (time.monotonic() - t0) / 5
      print(f"{{start:.2f}} {{crash:.3f}}", flush=True)
      if sys.argv[2] == "hang":
        R.grade_batch("math", [r"\\boxed{{9^{{9^{{9^{{9}}}}}}}}"] * 2, ["1"] * 2,
                      timeout_s=60, pool=p)
      p.close()
    """)


def _descendants(pid):
  out, todo = [], [pid]
  while todo:
    p = todo.pop()
    try:
      kids = [int(c) for c in open(f"/proc/{p}/task/{p}/children").read().split()]
    except OSError:
      kids = []
    out += kids
    todo += kids
  return out


def _running(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split(")")[-1].split()[0] != "Z"
  except OSError:
    return False


def _victim(kind, mode, prelude=""):
  path = os.path.join(tempfile.mkdtemp(), "victim.py")
  with open(path, "w") as f:
    f.write(_VICTIM.format(prelude=prelude, here=_HERE, ))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, path, kind, mode], stdout=subprocess.PIPE,
                          text=True, env=env)


def faults(args):
  print("(f) grader server / forkserver SIGKILLed between batches; next batch of 2")
  for kind in MAIN:
    pool = POOLS[kind](args.workers)
    pool.grade(R.math_reward, [r"\boxed{1}"], ["1"], timeout_s=10.0)
    if kind == "handwritten":
      victim = pool._proc.pid  # pylint: disable=protected-access
    else:
      victim = multiprocessing.forkserver._forkserver._forkserver_pid  # pylint: disable=protected-access
    os.kill(victim, signal.SIGKILL)
    time.sleep(0.3)
    tallies = []
    for _ in range(2):
      wall, res = _timed(pool, [r"\boxed{1}", r"\boxed{2}"], ["1", "2"], 10.0)
      tallies.append(f"{res.rewards.tolist()} fail={res.failures} timeout={res.timeouts} "
                     f"({wall:.2f} s)")
    print(f"  {kind:<12} next: {tallies[0]}; after: {tallies[1]}; "
          f"server_restarts={pool.server_restarts}", flush=True)
    pool.close()

  print("(g) trainer SIGKILLed mid-batch (2 hung items, 60 s bound): "
        "grader processes alive 10 s later")
  for kind in POOLS:
    proc = _victim(kind, "hang")
    proc.stdout.readline()
    time.sleep(0.5)
    procs = _descendants(proc.pid)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10.0
    alive = procs
    while alive and time.monotonic() < deadline:
      time.sleep(0.1)
      alive = [p for p in alive if _running(p)]
    print(f"  {kind:<12} {len(procs)} processes before, {len(alive)} alive after "
          f"{time.monotonic() - deadline + 10.0:.1f} s", flush=True)
    for p in alive:
      os.kill(p, signal.SIGKILL)

  print("(h) trainer's __main__ imports jax: start-up, then a tower (0.5 s) + 2 items")
  for kind in MAIN:
    for prelude in ("", "import jax, jax.numpy"):
      proc = _victim(kind, "quit", prelude)
      start, crash = proc.stdout.readline().split()
      proc.wait()
      label = "__main__ imports jax" if prelude else "plain __main__"
      print(f"  {kind:<12} {label:<22} start-up {float(start):5.2f} s, "
            f"tower + 2 items {float(crash) * 1000:6.0f} ms", flush=True)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--items", type=int, default=2048)
  ap.add_argument("--workers", type=int, default=2)
  ap.add_argument("--skip-faults", action="store_true")
  args = ap.parse_args()
  t = _test_module()
  print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.1f}")
  out = measure(args, t)
  print("ratio pebble / handwritten (wall time)")
  for key, v in out.items():
    hw, pb = np.median(v["handwritten"]), np.median(v["pebble"])  # pebble-bare: shown, not compared
    print(f"  {key:<10} {pb / hw:6.2f}x   ({hw:.2f} s vs {pb:.2f} s)")
  if not args.skip_faults:
    faults(args)


if __name__ == "__main__":
  main()
