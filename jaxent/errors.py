"""Layer 0: the one error taxonomy, and the exit code of each kind.

Every error a user can fix derives from :class:`JaxentError`, whose
``exit_code`` the CLI returns after printing the message on one line
(``exit_code_of``). Each kind also keeps the builtin base its callers catch
(``ConfigError`` is a ``ValueError``, ``RunDirError`` an ``OSError``), so
library code that handles builtin errors keeps working.

  exit 2  bad input or an I/O failure: ConfigError, DataError, SetupError,
          RunDirError, InputFileError, DistributedError (and any OSError the
          CLI meets)
  exit 3  the run stopped itself after saving a checkpoint: TrainingError
  exit 4  a multi-process job could not join its coordinator in time
          (``EXIT_NO_COORDINATOR``, the status of a process that gives up)
  exit 75 the run was preempted (SIGTERM or SIGINT) and stopped; the message
          names the checkpoint saved, and ``--resume`` continues it
          (``EXIT_PREEMPTED``: sysexits' EX_TEMPFAIL, "try again later", which
          a job scheduler can treat as "requeue")
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_TRAINING_STOPPED = 3
EXIT_NO_COORDINATOR = 4
EXIT_PREEMPTED = 75


class JaxentError(Exception):
  """Base of the errors a user can act on; the message names the input at fault."""
  exit_code = EXIT_BAD_INPUT


class ConfigError(JaxentError, ValueError):
  """An invalid config value; the message starts with the dotted key."""


class DataError(JaxentError):
  """A data file is missing, unreadable or unusable (the message names it)."""


class SetupError(JaxentError, RuntimeError):
  """The run cannot start; the message says which input is at fault."""


class DistributedError(JaxentError, ValueError):
  """Inconsistent or incomplete multi-process settings (the message names them)."""


class RunDirError(JaxentError, OSError):
  """A file of the run cannot be written where it belongs; the message names the path.

  An ``OSError``, so callers that handle I/O failures handle it; ``errno`` is
  set when the underlying failure had one (``errno.ENOSPC`` for a full disk).
  """

  def __init__(self, message: str, code: int | None = None):
    super().__init__(message)
    self.errno = code


class InputFileError(JaxentError, OSError):
  """A path jaxent reads names something that is not a regular file (a FIFO, a
  device, a socket, a directory); the message names the path and what it is.

  An ``OSError`` (``errno`` set), so callers that handle I/O failures handle it.
  """

  def __init__(self, message: str, code: int | None = None):
    super().__init__(message)
    self.errno = code


class TrainingError(JaxentError, RuntimeError):
  """The run cannot go on (the message says why); the last good checkpoint is kept."""
  exit_code = EXIT_TRAINING_STOPPED


class Preempted(JaxentError):
  """The run stopped on SIGTERM or SIGINT; the message names the checkpoint it saved (if any)."""
  exit_code = EXIT_PREEMPTED


def exit_code_of(error: BaseException) -> int | None:
  """The CLI exit code for ``error``, or None when it is not a user-facing error.

  A ``JaxentError`` carries its own code; any other ``OSError`` (a full disk,
  a path that cannot be written) is bad input or I/O: exit 2.
  """
  if isinstance(error, JaxentError):
    return error.exit_code
  if isinstance(error, OSError):
    return EXIT_BAD_INPUT
  return None
