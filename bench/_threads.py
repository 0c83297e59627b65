"""Pin a benchmark process to its first N allowed cores, before jax or torch start.

Every library in one benchmark gets the same cores: the process is pinned to
the first ``N`` allowed cores (``--threads N``, default 1) before jax and
torch start their thread pools (XLA sizes its pool from the affinity mask;
XLA_FLAGS thread options do not bind the CPU runtime's matmuls), and OpenMP
users (torch, vLLM) get ``N`` threads. The default is 1 core: on a shared
machine a descheduled OpenMP/Eigen worker stalls every parallel region
(torch with 2 threads ran ~6x slower than with 1 under load; vLLM 16 tok/s
against 238).
"""
import os


def threads_from_argv(argv) -> int:
  for i, a in enumerate(argv):
    if a == "--threads" and i + 1 < len(argv):
      return int(argv[i + 1])
    if a.startswith("--threads="):
      return int(a.split("=", 1)[1])
  return 1


def pin(argv) -> int:
  """Pins the process as ``--threads`` in ``argv`` says; returns the thread count."""
  n = threads_from_argv(argv)
  if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:n])
  os.environ.setdefault("OMP_NUM_THREADS", str(n))
  return n
