"""Layer 0: the one check every reader of a user-given path goes through.

A FIFO given where a file is expected blocks its reader forever (``open``
waits for a writer, a read for data); a character device such as
``/dev/zero`` never ends; a directory fails late with a confusing error.
Every place jaxent reads a path (configs, data and benchmark files, model
directories, tokenizer files, metrics) therefore goes through
:func:`open_regular` or, where a library opens the file itself,
:func:`require_regular` / :func:`require_regular_entries`: anything but a
regular file (symlinks are followed) is refused with ``InputFileError``
naming the path and what it is, before any read that could block.
"""
from __future__ import annotations

import errno
import os
import stat
from typing import IO, Iterable

from jaxent.errors import InputFileError

_KINDS = ((stat.S_ISDIR, "a directory", errno.EISDIR), (stat.S_ISFIFO, "a FIFO (named pipe)", None),
          (stat.S_ISCHR, "a character device", None), (stat.S_ISBLK, "a block device", None),
          (stat.S_ISSOCK, "a socket", None))


def _refuse(path: str, mode: int, what: str) -> None:
  if stat.S_ISREG(mode):
    return
  kind, code = next(((k, c) for test, k, c in _KINDS if test(mode)), ("not a file", None))
  raise InputFileError(f"{what} {path} is {kind}, not a regular file", code or errno.EINVAL)


def require_regular(path, what: str = "file") -> str:
  """``path`` as a str, after checking that it names a regular file (symlinks followed).

  For files that a library opens itself (safetensors, tokenizers, pyarrow).

  Raises:
    FileNotFoundError: nothing is there (the ``os.stat`` error, path named).
    InputFileError: a directory, FIFO, device or socket (named).
  """
  path = os.fspath(path)
  _refuse(path, os.stat(path).st_mode, what)
  return path


def open_regular(path, mode: str = "rb", *, what: str = "file", encoding: str | None = None,
                 errors: str | None = None) -> IO:
  """Opens a regular file for reading; refuses anything else without blocking.

  The file is opened non-blocking (opening a FIFO that has no writer would
  wait for one), checked with ``fstat`` on that descriptor (so what is read
  is what was checked), then switched back to blocking reads.

  Raises:
    FileNotFoundError / OSError: the open failed (path named).
    InputFileError: not a regular file (named).
  """
  if any(c in mode for c in "wax+"):
    raise ValueError(f"open_regular reads only, got mode {mode!r}")
  path = os.fspath(path)
  try:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
  except FileNotFoundError:
    raise
  except OSError:  # a socket cannot be opened (ENXIO): say what it is
    try:
      mode = os.stat(path).st_mode
    except OSError:
      mode = stat.S_IFREG
    _refuse(path, mode, what)
    raise
  try:
    _refuse(path, os.fstat(fd).st_mode, what)
    os.set_blocking(fd, True)
    return os.fdopen(fd, mode, encoding=encoding, errors=errors)
  except BaseException:
    os.close(fd)
    raise


def require_regular_entries(directory, *, names: Iterable[str] = (), suffixes: Iterable[str] = (),
                            what: str = "file") -> None:
  """Refuses any entry of ``directory`` (not its subdirectories) named one of ``names`` or
  ending in one of ``suffixes`` that is not a regular file (symlinks followed).

  For directories that a library reads by name (a Hugging Face model
  directory through ``transformers``); entries that are missing are not an
  error here.
  """
  names, suffixes = frozenset(names), tuple(suffixes)
  with os.scandir(os.fspath(directory)) as it:
    for entry in it:
      if entry.name in names or entry.name.endswith(suffixes):
        try:
          mode = os.stat(entry.path).st_mode
        except FileNotFoundError:  # a dangling symlink: the reader reports it missing
          continue
        _refuse(entry.path, mode, what)
