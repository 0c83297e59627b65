"""The grader server: ``python -m jaxent.rewards._server WORKERS MEMORY_MB``.

A fresh interpreter started by ``GraderPool`` over stdin/stdout pipes. It
imports math-verify, grades one warm-up item, forks its workers
(``LocalPool``) and then answers requests ``(fn_blob, responses, answers,
timeout_s)`` with ``(rewards, failures, timeouts, restarts)`` until stdin
closes. A separate interpreter, not ``multiprocessing``'s spawn/forkserver:
those re-run the trainer's ``__main__`` module in every worker (importing
JAX and the models into each), and forking the trainer itself is unsafe once
JAX has started its threads.
"""
from __future__ import annotations

import os
import sys
from multiprocessing.connection import Connection


def main(argv: list[str]) -> int:
  num_workers = int(argv[0])
  memory_limit_mb = int(argv[1]) or None
  # Requests arrive on fd 0 and replies leave on fd 1; move them off the
  # standard descriptors so a stray print in a reward function cannot corrupt
  # the reply stream.
  rfd, wfd = os.dup(0), os.dup(1)
  devnull = os.open(os.devnull, os.O_RDWR)
  os.dup2(devnull, 0)
  os.dup2(2, 1)
  requests = Connection(rfd, writable=False)
  replies = Connection(wfd, readable=False)

  from jaxent.rewards import _math  # pylint: disable=g-import-not-at-top
  from jaxent.rewards._worker import LocalPool, ParentGone  # pylint: disable=g-import-not-at-top
  _math.warm_up()
  pool = LocalPool(num_workers, memory_limit_mb, server_fds=(rfd, wfd, devnull))
  replies.send("ready")
  graceful = True
  try:
    while True:
      try:
        request = requests.recv()
      except (EOFError, OSError):
        return 0
      if request is None:
        return 0
      fn_blob, responses, answers, timeout_s = request
      try:
        rewards, failures, timeouts = pool.grade(
            fn_blob, responses, answers, timeout_s, watch=requests)
      except ParentGone:
        graceful = False  # workers may be mid-item: kill, don't wait
        return 0
      replies.send((rewards, failures, timeouts, pool.restarts))
  finally:
    pool.close(graceful)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
