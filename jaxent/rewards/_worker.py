"""The grading workers and the pool that bounds them (runs in the server).

``LocalPool`` forks ``num_workers`` processes from the grader server (a fresh
interpreter that has imported math-verify and graded one item, so forks start
warm in milliseconds) and feeds them one item at a time over pipes. The
server waits on all pipes with a deadline per item; a worker that overruns
is killed with SIGKILL (a sympy power tower spinning in C code ignores
anything gentler) and replaced, and its item scores 0. A worker that dies
(segfault, MemoryError under its address-space limit) is replaced the same
way. Nothing here imports JAX: forking is safe in the server, which runs no
threads, unlike the trainer.
"""
from __future__ import annotations

import collections
# imported here, in the server, so that freshly forked workers have it
import ctypes
import math
import multiprocessing
import os
import pickle
import signal
import time
from multiprocessing import connection

try:
  import resource
except ImportError:  # not POSIX: no address-space limit, the time bound holds
  resource = None

# A worker sends this instead of a value when the reward function raised.
FAILED = "failed"


def _die_with_parent(parent_pid: int) -> None:
  """Linux: SIGKILL this process when the server dies, even mid-computation.

  PR_SET_PDEATHSIG fires when the creating *thread* exits; the server is
  single-threaded, so that is the server's death.
  """
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    return  # not Linux: orphans still exit on EOF once their item is done
  if os.getppid() != parent_pid:  # the server died before prctl took effect
    os._exit(0)


def worker_main(conn, memory_limit_mb: int | None, parent_pid: int,
                close_fds: tuple[int, ...]) -> None:
  """Grades items sent over ``conn`` until it closes or ``None`` arrives.

  ``close_fds``: descriptors inherited through fork that belong to the server
  (its request/reply pipes, the other workers' pipes). Holding them would
  keep those pipes open after the server died, so nobody would see EOF.
  """
  for fd in close_fds:
    try:
      os.close(fd)
    except OSError:
      pass
  _die_with_parent(parent_pid)
  # Ctrl-C goes to the whole process group; the trainer decides what happens.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  if memory_limit_mb and resource is not None:
    try:
      limit = int(memory_limit_mb) << 20
      resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ValueError, OSError):
      pass  # no RLIMIT_AS on this platform: the time bound still holds
  fns: dict[bytes, object] = {}
  while True:
    try:
      msg = conn.recv()
    except (EOFError, OSError):
      return
    if msg is None:
      return
    index, fn_blob, response, answer = msg
    try:
      fn = fns.get(fn_blob)
      if fn is None:
        # fn_blob is pickled by the trainer from its own registry (a
        # reference to a module-level function), never from model output.
        fn = fns[fn_blob] = pickle.loads(fn_blob)
      out = (index, float(fn(response, answer)))
    except BaseException:  # pylint: disable=broad-except
      # MemoryError and RecursionError included: any failure scores 0.
      out = (index, FAILED)
    try:
      conn.send(out)
    except (EOFError, OSError):
      return


class ParentGone(Exception):
  """The trainer closed the request pipe while a batch was being graded."""


class _Slot:
  """One worker process and the server's end of its pipe."""

  def __init__(self, pool: LocalPool):
    self._pool = pool
    self.conn = None
    self.start()

  def start(self) -> None:
    pool = self._pool
    parent_conn, child_conn = pool._ctx.Pipe(duplex=True)
    # every server-side descriptor the child would inherit, except its own
    close_fds = tuple(pool._server_fds) + tuple(
        s.conn.fileno() for s in pool._slots
        if s is not self and s.conn is not None and not s.conn.closed)
    close_fds += (parent_conn.fileno(),)
    self.process = pool._ctx.Process(
        target=worker_main,
        args=(child_conn, pool._memory_limit_mb, os.getpid(), close_fds),
        daemon=True, name="jaxent-grader")
    self.process.start()
    child_conn.close()
    self.conn = parent_conn

  def kill(self) -> None:
    try:
      self.conn.close()
    except OSError:
      pass
    if self.process.is_alive():
      self.process.kill()
    self.process.join(timeout=5.0)


class LocalPool:
  """Forked grading workers with a per-item deadline (used by the server)."""

  def __init__(self, num_workers: int, memory_limit_mb: int | None,
               server_fds: tuple[int, ...] = ()):
    self._ctx = multiprocessing.get_context("fork")
    self._memory_limit_mb = memory_limit_mb
    self._server_fds = tuple(server_fds)
    self.restarts = 0
    self._slots: list[_Slot] = []
    for _ in range(num_workers):
      self._slots.append(_Slot(self))

  def _restart(self, slot: _Slot) -> None:
    slot.kill()
    self.restarts += 1
    slot.start()

  def close(self, graceful: bool = True) -> None:
    """Stops the workers: asks idle ones to exit (``graceful``), kills the rest."""
    if graceful:
      for slot in self._slots:
        try:
          slot.conn.send(None)
        except (OSError, ValueError):
          pass
      deadline = time.monotonic() + 1.0
      for slot in self._slots:
        slot.process.join(timeout=max(0.0, deadline - time.monotonic()))
    for slot in self._slots:
      slot.kill()

  def grade(self, fn_blob: bytes, responses, answers, timeout_s: float,
            watch=None) -> tuple[list[float], int, int]:
    """``(rewards, failures, timeouts)`` of ``fn(responses[i], answers[i])``.

    ``None`` in either list marks an item that is not text: it scores 0 and
    counts as a failure without reaching a worker. ``watch``: a connection
    that stays silent while the caller waits for the reply; if it becomes
    readable (EOF: the trainer died) grading stops with ``ParentGone``.
    """
    n = len(responses)
    rewards = [0.0] * n
    failures = 0
    timeouts = 0
    pending = collections.deque()
    for i in range(n):
      if responses[i] is None or answers[i] is None:
        failures += 1
      else:
        pending.append(i)
    busy: dict[_Slot, tuple[int, float]] = {}
    while pending or busy:
      for slot in self._slots:
        if not pending:
          break
        if slot in busy:
          continue
        i = pending[0]
        try:
          slot.conn.send((i, fn_blob, responses[i], answers[i]))
        except (OSError, ValueError):
          # died while idle: replace it and retry the item on the next pass
          self._restart(slot)
          continue
        pending.popleft()
        busy[slot] = (i, time.monotonic() + timeout_s)
      if not busy:
        continue

      by_conn = {slot.conn: slot for slot in busy}
      wait_s = max(0.0, min(d for _, d in busy.values()) - time.monotonic())
      ready = connection.wait(list(by_conn) + ([watch] if watch else []), timeout=wait_s)
      if watch is not None and watch in ready:
        raise ParentGone
      for conn in ready:
        slot = by_conn[conn]
        i, _ = busy.pop(slot)
        try:
          index, value = conn.recv()
        except (EOFError, OSError):
          # the worker died (segfault, killed by the OS): its item fails
          failures += 1
          self._restart(slot)
          continue
        if index == i and value != FAILED and math.isfinite(value):
          rewards[i] = value
        else:
          failures += 1

      now = time.monotonic()
      for slot, (i, deadline) in list(busy.items()):
        if deadline <= now and not slot.conn.poll():
          busy.pop(slot)
          timeouts += 1
          self._restart(slot)
    return rewards, failures, timeouts
