"""Bounded, crash-proof grading of a batch of responses.

``grade_batch`` turns ``n`` responses and gold answers into ``n`` float32
rewards. Reward functions registered ``isolated`` run in a ``GraderPool``:

  trainer ──pipe──► grader server (fresh interpreter, math-verify loaded)
                      ├─ fork ─► worker 1   one item at a time, killed and
                      └─ fork ─► worker k   replaced past timeout_s

The server enforces the per-item deadline (``_worker.LocalPool``): a worker
that overruns is SIGKILLed and replaced, its item scores 0 and counts as a
timeout; an item whose function raises, returns a non-finite value, or kills
its worker scores 0 and counts as a failure. A server that dies (while it
starts, between batches, or during one) is restarted, up to
``start_attempts`` times in a row, and a batch it was grading is sent again
to the new server once. The trainer enforces a deadline on the whole batch as
well, so even a wedged server cannot hang the run: it is killed, restarted,
and the batch scores 0 (counted as timeouts). Wall time of
one call is at most about ``ceil(n / num_workers) * timeout_s`` plus
dispatch overhead (a few ms per item).
"""
from __future__ import annotations

import atexit
import dataclasses
import math
import os
import pickle
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import Sequence

import numpy as np

from jaxent.rewards._registry import reward_spec


@dataclasses.dataclass(frozen=True)
class GradeResult:
  """Rewards of one batch and what went wrong while computing them.

  Attributes:
    rewards: float32 ``[n]``; 0 for every failed or timed-out item.
    failures: items whose reward function raised or returned a non-finite
      value, whose worker died, or whose response/answer was not text.
    timeouts: items that ran past the per-item timeout (worker killed).
  """
  rewards: np.ndarray
  failures: int
  timeouts: int

  def counters(self) -> dict[str, int]:
    """The counters under the names the trainer logs."""
    return {"reward_failures": self.failures, "reward_timeouts": self.timeouts}


def _package_root() -> str:
  import jaxent  # pylint: disable=g-import-not-at-top
  return os.path.dirname(os.path.dirname(os.path.abspath(jaxent.__file__)))


class GraderPool:
  """A grader server with worker processes that bound each item's time.

  Args:
    num_workers: worker processes (default ``min(4, os.cpu_count())``).
    memory_limit_mb: address-space limit of each worker (``RLIMIT_AS``); an
      item that needs more fails with MemoryError and scores 0. None: none.
    startup_timeout_s: how long the server may take to start (it imports
      sympy and math-verify: about a second on an idle core).
    start_attempts: servers started in a row before giving up
      (``RuntimeError``) when each dies or hangs while starting.

  Thread-safe: concurrent ``grade`` calls are serialised. Use as a context
  manager or call ``close()``; the server exits when this process does
  (its stdin closes).
  """

  def __init__(self, num_workers: int | None = None, *,
               memory_limit_mb: int | None = 2048,
               startup_timeout_s: float = 120.0, start_attempts: int = 3):
    if num_workers is None:
      num_workers = min(4, os.cpu_count() or 1)
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
      raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}")
    if memory_limit_mb is not None and memory_limit_mb < 256:
      raise ValueError(f"memory_limit_mb must be None or >= 256, got {memory_limit_mb!r}")
    self.num_workers = num_workers
    self.memory_limit_mb = memory_limit_mb
    if not isinstance(start_attempts, int) or start_attempts < 1:
      raise ValueError(f"start_attempts must be an int >= 1, got {start_attempts!r}")
    self.startup_timeout_s = float(startup_timeout_s)
    self.start_attempts = start_attempts
    self.restarts = 0         # workers replaced after a timeout or crash
    self.server_restarts = 0  # servers replaced: died (starting or running) or missed a deadline
    self._restarts_base = 0
    self._lock = threading.Lock()
    self._closed = False
    self._proc = None
    self._start_server()

  def _start_server(self) -> None:
    """Starts a server, again (up to ``start_attempts`` in all) if one dies or hangs starting."""
    for attempt in range(1, self.start_attempts + 1):
      try:
        self._start_server_once()
        return
      except RuntimeError as e:
        if attempt == self.start_attempts:
          raise RuntimeError(f"{e} ({attempt} attempts in a row)") from None
        self.server_restarts += 1

  def _server_alive(self) -> bool:
    return self._proc is not None and self._proc.poll() is None

  def _start_server_once(self) -> None:
    env = dict(os.environ)
    # The server must import jaxent and any module holding a registered
    # reward function, as this process can: give it this process's path.
    path = [_package_root()] + [p for p in sys.path if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
    # The server forks its workers: keep BLAS/OpenMP thread pools out of it.
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    self._proc = subprocess.Popen(
        [sys.executable, "-m", "jaxent.rewards._server",
         str(self.num_workers), str(self.memory_limit_mb or 0)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        close_fds=True)
    self._send = Connection(os.dup(self._proc.stdin.fileno()), readable=False)
    self._recv = Connection(os.dup(self._proc.stdout.fileno()), writable=False)
    self._proc.stdin.close()
    self._proc.stdout.close()
    if not self._recv.poll(self.startup_timeout_s):
      self._kill_server()
      raise RuntimeError(
          f"grader server did not start within {self.startup_timeout_s:.0f} s")
    try:
      msg = self._recv.recv()
    except (EOFError, OSError):
      msg = None
    if msg != "ready":
      code = self._proc.poll()
      self._kill_server()
      raise RuntimeError(f"grader server failed to start (exit code {code}); see stderr")
    self._restarts_base = self.restarts

  def _kill_server(self) -> None:
    for conn in (self._send, self._recv):
      try:
        conn.close()
      except OSError:
        pass
    if self._proc is not None and self._proc.poll() is None:
      self._proc.kill()
    if self._proc is not None:
      self._proc.wait(timeout=10)

  def close(self) -> None:
    """Stops the server and its workers. Idempotent."""
    with self._lock:
      if self._closed:
        return
      self._closed = True
      try:
        self._send.send(None)
        self._proc.wait(timeout=5)
      except (OSError, ValueError, subprocess.TimeoutExpired):
        pass
      self._kill_server()

  def __enter__(self) -> GraderPool:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass

  def grade(self, fn, responses: Sequence[str | None],
            answers: Sequence[str | None], *, timeout_s: float) -> GradeResult:
    """Grades ``fn(responses[i], answers[i])`` for all ``i`` in the workers.

    ``None`` in either list marks an item that is not text: it scores 0 and
    counts as a failure without reaching a worker.
    """
    n = len(responses)
    if n == 0:
      return GradeResult(np.zeros(0, np.float32), 0, 0)
    fn_blob = pickle.dumps(fn)
    # Server-side scheduling is serial per worker; allow that plus slack for
    # dispatch and for replacing killed workers.
    batch_deadline = (math.ceil(n / self.num_workers) + 1) * timeout_s + 30.0
    request = (fn_blob, list(responses), list(answers), float(timeout_s))
    with self._lock:
      if self._closed:
        raise RuntimeError("GraderPool is closed")
      if not self._server_alive():  # died between batches
        self._restart()
      for attempt in (1, 2):
        try:
          self._send.send(request)
          if not self._recv.poll(batch_deadline):
            raise TimeoutError
          rewards, failures, timeouts, restarts = self._recv.recv()
        except TimeoutError:
          # Wedged: nothing of this batch is trusted, and grading it again
          # could wedge the next server too.
          self._restart()
          return GradeResult(np.zeros(n, np.float32), 0, n)
        except (OSError, EOFError, ValueError):
          # The server died: the batch goes once more to a new server.
          self._restart()
          if attempt == 2:
            return GradeResult(np.zeros(n, np.float32), n, 0)
          continue
        break
      self.restarts = self._restarts_base + restarts
    return GradeResult(np.asarray(rewards, np.float32), failures, timeouts)

  def _restart(self) -> None:
    self._kill_server()
    self.server_restarts += 1
    self._start_server()


_default_pool: GraderPool | None = None
_default_lock = threading.Lock()


def default_pool() -> GraderPool:
  """A process-wide pool, created on first use and closed at exit."""
  global _default_pool
  with _default_lock:
    if _default_pool is None or _default_pool._closed:  # pylint: disable=protected-access
      _default_pool = GraderPool()
      atexit.register(_default_pool.close)
    return _default_pool


def _as_text(x) -> str | None:
  """A clean str, or None for something that is not text.

  Bytes are decoded as UTF-8 with replacement; lone surrogates (invalid
  unicode that most parsers and encoders reject) become ``?``.
  """
  if isinstance(x, bytes):
    return x.decode("utf-8", "replace")
  if isinstance(x, str):
    try:
      x.encode("utf-8")
      return x
    except UnicodeEncodeError:
      return x.encode("utf-8", "replace").decode("utf-8")
  return None


def _as_answer(x) -> str | None:
  if isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool):
    return str(x)
  return _as_text(x)


def grade_batch(reward_name: str, responses: Sequence, answers: Sequence, *,
                timeout_s: float = 5.0,
                pool: GraderPool | None = None) -> GradeResult:
  """Rewards of ``responses`` against gold ``answers`` under a named reward.

  Args:
    reward_name: a registered reward (``reward_names()``).
    responses: ``n`` model responses (str; bytes are decoded as UTF-8;
      anything else scores 0 and is counted as a failure).
    answers: ``n`` gold answers (str or number).
    timeout_s: per-item bound for isolated rewards (inline rewards are
      bounded by construction and ignore it).
    pool: the ``GraderPool`` for isolated rewards (default:
      ``default_pool()``, started on first use).

  Returns:
    ``GradeResult``: float32 rewards ``[n]`` and failure/timeout counts. A
    reward function that raises, returns a non-finite value, crashes its
    worker or times out gives 0 and is counted; this never raises because of
    what a response contains.

  Raises:
    ValueError: unknown ``reward_name`` (listing the names), lengths differ,
      or ``timeout_s`` is not a positive number.
  """
  spec = reward_spec(reward_name)
  if len(responses) != len(answers):
    raise ValueError(
        f"responses and answers must have the same length, got "
        f"{len(responses)} and {len(answers)}")
  if (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
      or not math.isfinite(timeout_s) or timeout_s <= 0):
    raise ValueError(f"timeout_s must be a positive number, got {timeout_s!r}")
  texts = [_as_text(r) for r in responses]
  golds = [_as_answer(a) for a in answers]
  if spec.isolated:
    return (pool or default_pool()).grade(spec.fn, texts, golds, timeout_s=timeout_s)
  n = len(texts)
  rewards = np.zeros(n, np.float32)
  failures = 0
  for i, (text, gold) in enumerate(zip(texts, golds)):
    if text is None or gold is None:
      failures += 1
      continue
    try:
      value = float(spec.fn(text, gold))
    except Exception:  # pylint: disable=broad-except
      failures += 1
      continue
    if math.isfinite(value):
      rewards[i] = value
    else:
      failures += 1
  return GradeResult(rewards=rewards, failures=failures, timeouts=0)
