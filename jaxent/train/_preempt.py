"""SIGTERM and SIGINT during a run: finish the step, save if there is time, exit ``EXIT_PREEMPTED``.

Spot and preemptible VMs send SIGTERM some seconds before they stop the
machine (about 30 s on Cloud TPU); SIGINT is Ctrl-C. While ``train`` runs,
:class:`Preemption` catches both:

* the first signal starts the grace period (``train.preempt_grace_s``); the
  step under way finishes (its device programs cannot be interrupted), then
  every process agrees on stopping after that step (``should_stop``: a
  one-scalar gather over the processes, so all of them save the same step);
  the loop saves it when the last save's duration fits in the time left, and
  raises :class:`Preempted` (exit code ``EXIT_PREEMPTED``) with one line
  naming the saved step;
* when the grace period ends first, a watchdog thread prints one line naming
  the last complete checkpoint and ends the process with the same code;
* a second signal ends the process at once (same code, one line).

The previous handlers come back when the run ends. Handlers can only be
installed from the main thread; elsewhere the run is left to the default
handlers.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from typing import Callable

from jaxent import sharding
from jaxent.errors import EXIT_PREEMPTED, Preempted

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _ignore(signum, frame) -> None:
  """The Python-level handler: the wakeup-fd reader thread acts on the signal."""


def _exit_now(line: str) -> None:
  print(f"jaxent: {line}", file=sys.stderr, flush=True)
  os._exit(EXIT_PREEMPTED)


class Preemption:
  """The signal state of one run; ``last_saved()`` names the newest complete checkpoint.

  Signals are read from ``signal.set_wakeup_fd`` by a thread: Python runs a
  signal handler only between bytecodes of the main thread, which may sit
  for minutes inside one device program, so the grace period's clock and a
  second signal are seen from that thread at once.
  """

  def __init__(self, grace_s: float, last_saved: Callable[[], int | None], *,
               exit_now: Callable[[str], None] = _exit_now):
    self.grace_s = grace_s
    self.signum: int | None = None
    self.deadline: float | None = None
    self._last_saved = last_saved
    self._exit_now = exit_now
    self._previous: dict[int, object] = {}
    self._old_wakeup: int | None = None
    self._pipe: tuple[socket.socket, socket.socket] | None = None
    self._timer: threading.Timer | None = None
    self._lock = threading.Lock()
    self._done = threading.Event()  # set once the loop has finished its preemption save

  @property
  def signame(self) -> str:
    return signal.Signals(self.signum).name if self.signum else "signal"

  def __enter__(self) -> "Preemption":
    if threading.current_thread() is not threading.main_thread():
      return self
    r, w = socket.socketpair()
    w.setblocking(False)
    self._pipe = (r, w)
    self._old_wakeup = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
    for s in _SIGNALS:
      self._previous[s] = signal.signal(s, _ignore)  # the reader thread acts on it
    threading.Thread(target=self._read, args=(r,), name="jaxent-preemption", daemon=True).start()
    return self

  def __exit__(self, *exc) -> None:
    self._done.set()
    if self._timer is not None:
      self._timer.cancel()
    for s, h in self._previous.items():
      signal.signal(s, h)
    self._previous.clear()
    if self._pipe is not None:
      signal.set_wakeup_fd(self._old_wakeup)
      self._pipe[1].close()  # the reader sees EOF and ends
      self._pipe = None

  def _read(self, r: socket.socket) -> None:
    with r:
      while True:
        try:
          data = r.recv(64)
        except OSError:
          return
        if not data:
          return
        for signum in data:
          if signum in _SIGNALS:
            self._on_signal(signum)

  def _kept(self) -> str:
    last = self._last_saved()
    return f"the last complete checkpoint is {last}" if last is not None else "no checkpoint yet"

  def _on_signal(self, signum: int) -> None:
    with self._lock:
      first = self.signum is None
      if first:
        self.signum = signum
        self.deadline = time.monotonic() + self.grace_s
    if not first:
      self._exit_now(f"second {signal.Signals(signum).name}: exiting at once without a checkpoint; "
                     f"{self._kept()}")
      return
    print(f"jaxent: {self.signame}: finishing the current step, then saving a checkpoint within "
          f"train.preempt_grace_s={self.grace_s:g} s (a second signal exits at once)",
          file=sys.stderr, flush=True)
    self._timer = threading.Timer(self.grace_s, self._expire)
    self._timer.daemon = True
    self._timer.start()

  def _expire(self) -> None:
    if not self._done.is_set():
      self._exit_now(f"{self.signame}: no checkpoint could be saved within "
                     f"train.preempt_grace_s={self.grace_s:g} s; {self._kept()}")

  def should_stop(self, save_s: float | None) -> tuple[bool, bool]:
    """(stop, save): agreed by every process after a step.

    ``stop`` when any process got a signal; ``save`` when, on every process
    that got one, the time left exceeds ``save_s`` (the last save's duration;
    unknown counts as fitting). One gather of two scalars per step with
    several processes; none with one.
    """
    got = self.signum is not None
    fits = not got or save_s is None or time.monotonic() + save_s < self.deadline
    votes = sharding.sum_counters({"stop": int(got), "no_time": int(not fits)})
    return votes["stop"] > 0, votes["no_time"] == 0

  def saved(self) -> None:
    """The loop's preemption save is done: the watchdog no longer ends the process."""
    self._done.set()

  def error(self, step: int, saved: int | None, directory: str, *,
            nothing_new: bool = False) -> Preempted:
    """The ``Preempted`` error after ``step``: ``saved`` is the checkpoint of that step, or None
    (``nothing_new``: no step was done since the run started)."""
    if saved is not None:
      what = f"checkpoint {saved} saved in {directory}"
    elif nothing_new:
      what = f"no step done since the start; {self._kept()}"
    else:
      what = f"no time to save within train.preempt_grace_s={self.grace_s:g} s; {self._kept()}"
    return Preempted(f"{self.signame} after step {step}: {what}; continue with --resume")
