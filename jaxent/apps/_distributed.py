"""Joining the processes of a multi-host job into one JAX program.

On a TPU pod slice, a SLURM job or several GPU nodes the same command runs on
every host; :func:`initialize_distributed` calls ``jax.distributed.initialize``
so that ``jax.devices()`` lists the devices of every host and one SPMD program
spans them. It must run before JAX touches a device.

Where the job comes from:

* explicit: ``coordinator`` (``HOST:PORT`` of process 0), ``num_processes``
  and ``process_id`` as arguments or from ``JAXENT_COORDINATOR``,
  ``JAXENT_NUM_PROCESSES``, ``JAXENT_PROCESS_ID``;
* a SLURM job step with more than one task (``SLURM_JOB_ID``,
  ``SLURM_NTASKS`` > 1): JAX reads the rest from SLURM's variables;
* a Cloud TPU VM (JAX's own detection when it loads libtpu): JAX asks the
  TPU metadata server for the workers (one worker: a one-process job);
* otherwise nothing: a one-process run.

A process that cannot join within ``timeout_s`` (the coordinator never came
up, is unreachable, or not all processes started) prints why and exits with
status ``exit_code``: the wait happens inside JAX's C++ client, which cannot
be interrupted from Python, so a watchdog thread ends the process. A process
that loses the coordinator later is ended by JAX itself after
``heartbeat_timeout_s`` ("Terminating process because the JAX distributed
service detected fatal errors").
"""
from __future__ import annotations

import dataclasses
import os
import sys
import threading
from typing import Mapping

from jaxent.errors import EXIT_NO_COORDINATOR, DistributedError

ENV_COORDINATOR = "JAXENT_COORDINATOR"
ENV_NUM_PROCESSES = "JAXENT_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXENT_PROCESS_ID"
ENV_INIT_TIMEOUT = "JAXENT_INIT_TIMEOUT"

DEFAULT_TIMEOUT_S = 300


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
  method: str | None           # "explicit" | "slurm" | "tpu" | None (one process, nothing joined)
  process_index: int
  process_count: int
  coordinator: str | None = None


def _int(value, name: str, lo: int) -> int:
  try:
    v = int(value)
  except (TypeError, ValueError):
    raise DistributedError(f"{name} must be an integer, got {value!r}") from None
  if v < lo:
    raise DistributedError(f"{name} must be >= {lo}, got {v}")
  return v


def _on_cloud_tpu_vm() -> bool:
  # Set by `import jax` when libtpu and TPU chips are present (JAX's own check).
  try:
    from jax._src import cloud_tpu_init
  except ImportError:
    return False
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def detect_cluster(env: Mapping[str, str] | None = None, *, explicit: bool = False) -> str | None:
  """``"explicit"``, ``"slurm"``, ``"tpu"`` or None, in that order of precedence."""
  env = os.environ if env is None else env
  if explicit or env.get(ENV_COORDINATOR):
    return "explicit"
  if env.get("SLURM_JOB_ID") and _int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")),
                                      "SLURM_NTASKS", 1) > 1:
    return "slurm"
  if _on_cloud_tpu_vm():
    return "tpu"
  return None


def _explicit_settings(coordinator, num_processes, process_id, env) -> tuple[str, int, int]:
  coordinator = coordinator or env.get(ENV_COORDINATOR)
  num_processes = num_processes if num_processes is not None else env.get(ENV_NUM_PROCESSES)
  process_id = process_id if process_id is not None else env.get(ENV_PROCESS_ID)
  missing = [n for n, v in (("--coordinator / " + ENV_COORDINATOR, coordinator),
                            ("--num-processes / " + ENV_NUM_PROCESSES, num_processes),
                            ("--process-id / " + ENV_PROCESS_ID, process_id)) if v in (None, "")]
  if missing:
    raise DistributedError(f"multi-process run: also give {', '.join(missing)}")
  host, sep, port = str(coordinator).rpartition(":")
  if not sep or not host or not port.isdigit():
    raise DistributedError(f"--coordinator must be HOST:PORT (process 0's address), got {coordinator!r}")
  n = _int(num_processes, "--num-processes", 1)
  i = _int(process_id, "--process-id", 0)
  if i >= n:
    raise DistributedError(f"--process-id {i} is not below --num-processes {n}")
  return str(coordinator), n, i


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, timeout_s: float | None = None,
                           heartbeat_timeout_s: int = 100, env: Mapping[str, str] | None = None,
                           exit_code: int = EXIT_NO_COORDINATOR) -> DistributedInfo:
  """Joins this process to its job (see the module docstring); a no-op for one process.

  Args:
    coordinator, num_processes, process_id: explicit settings (default: the
      ``JAXENT_*`` variables); giving any of them asks for all three.
    timeout_s: how long to wait for every process to join (default
      ``JAXENT_INIT_TIMEOUT`` or 300 s).
    heartbeat_timeout_s: after joining, how long a process waits on a silent
      coordinator before JAX ends it.
    env: the environment to read (default ``os.environ``).
    exit_code: the status of a process that could not join in time.

  Returns:
    ``DistributedInfo`` with the process index and count.

  Raises:
    DistributedError: incomplete or inconsistent explicit settings.
  """
  env = os.environ if env is None else env
  explicit = any(v is not None for v in (coordinator, num_processes, process_id))
  method = detect_cluster(env, explicit=explicit)
  if method is None:
    return DistributedInfo(None, 0, 1)
  if timeout_s is None:
    timeout_s = _int(env.get(ENV_INIT_TIMEOUT, DEFAULT_TIMEOUT_S), ENV_INIT_TIMEOUT, 1)
  if timeout_s <= 0:
    raise DistributedError(f"the initialisation timeout must be > 0 s, got {timeout_s}")
  kw = {}
  where = "the job's coordinator"
  if method == "explicit":
    addr, n, i = _explicit_settings(coordinator, num_processes, process_id, env)
    if n == 1:
      return DistributedInfo(None, 0, 1)
    kw = dict(coordinator_address=addr, num_processes=n, process_id=i)
    who = f"process {i} of {n}"
    where = f"the coordinator {addr} (process 0)"
  elif method == "slurm":
    who = f"SLURM task {env.get('SLURM_PROCID', '?')} of {env.get('SLURM_NTASKS', '?')}"
    kw = dict(cluster_detection_method="slurm")
  else:
    who = "this TPU worker"

  import jax  # after the arguments are known good

  def give_up():
    print(f"jaxent: error: {who} could not join the job through {where} within {timeout_s:g} s "
          f"(detected: {method}); check that process 0 is running and reachable at that address "
          f"and that every process was started (timeout: --init-timeout / {ENV_INIT_TIMEOUT})",
          file=sys.stderr, flush=True)
    os._exit(exit_code)

  # JAX's own deadline comes later, so this message (not an abort) is what a user sees.
  watchdog = threading.Timer(timeout_s, give_up)
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(initialization_timeout=int(timeout_s) + 60,
                               heartbeat_timeout_seconds=int(heartbeat_timeout_s), **kw)
  finally:
    watchdog.cancel()
  return DistributedInfo(method, jax.process_index(), jax.process_count(), kw.get("coordinator_address"))
