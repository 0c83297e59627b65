"""Checkpoints through orbax's CheckpointManager, and the run directory's paths.

One checkpoint holds the train state (params, optimizer state, step, PRNG
key) and, as JSON, the data iterator's state and the loop's host state, so a
resumed run continues exactly where the last complete checkpoint was taken.

Failure model (docs/RELIABILITY.md):

* Orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and renames it to
  ``<step>`` only when every item is written, so a process killed during a
  write leaves the previous checkpoint as the latest complete one;
  ``latest_step`` never lists the temporary directory, and the next save of
  that step removes it.
* A write that fails (disk full, a path that cannot be created) raises
  :class:`RunDirError` naming the directory and the last complete step, which
  stays loadable. Tensorstore reports I/O failures as ``ValueError`` with an
  absl status (``RESOURCE_EXHAUSTED: ... [os_error_code='28']``); those count
  as write failures too.
* Nothing of the run is written outside its run directory: :func:`run_path`
  resolves every path the trainer writes (symlinks followed) and refuses one
  that lands elsewhere.
"""
from __future__ import annotations

import errno as errno_lib
import glob
import os
import re
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxent.errors import RunDirError

_TMP_SUFFIX = ".orbax-checkpoint-tmp"
# absl status codes tensorstore puts at the start of an I/O error's message
_IO_STATUS = re.compile(r"^(RESOURCE_EXHAUSTED|PERMISSION_DENIED|UNAVAILABLE|DATA_LOSS|ABORTED|"
                        r"FAILED_PRECONDITION|NOT_FOUND|ALREADY_EXISTS|UNKNOWN|INTERNAL):")
_OS_CODE = re.compile(r"os_error_code='?(\d+)")


def run_path(run_dir: str, *parts: str) -> str:
  """``run_dir/parts...`` resolved, refused if it escapes ``run_dir``.

  Both paths are resolved (symlinks followed, ``..`` collapsed) before they
  are compared, so a ``checkpoints`` symlink to another directory, or a part
  such as ``../x``, raises :class:`RunDirError`. ``run_dir`` itself may be a
  symlink. Returns the resolved path, which later writes use: a symlink
  swapped in afterwards does not redirect them.
  """
  root = os.path.realpath(run_dir)
  joined = os.path.join(run_dir, *parts)
  real = os.path.realpath(joined)
  if os.path.commonpath([root, real]) != root:
    raise RunDirError(f"{joined} resolves to {real}, outside the run directory {root}; "
                      f"refusing to write there (remove the symlink or choose another --run-dir)",
                      errno_lib.EXDEV)
  return real


def _write_failure(e: BaseException) -> int | None:
  """errno-like code when ``e`` is an I/O failure of a checkpoint write, else None."""
  if isinstance(e, OSError):
    return e.errno if e.errno is not None else errno_lib.EIO
  if isinstance(e, ValueError):  # tensorstore's I/O errors
    msg = str(e)
    m = _OS_CODE.search(msg)
    if m:
      return int(m.group(1))
    if _IO_STATUS.match(msg):
      return errno_lib.EIO
  return None


class Checkpointer:
  """Saves and restores (train state, host state) pairs under ``directory``, one per step."""

  def __init__(self, directory: str, *, keep: int = 3):
    self.directory = os.path.abspath(directory)
    if os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise RunDirError(f"checkpoint directory {self.directory} exists and is not a directory",
                        errno_lib.ENOTDIR)
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    try:
      self._mgr = ocp.CheckpointManager(self.directory, options=opts)
    except OSError as e:
      raise RunDirError(f"cannot create checkpoint directory {self.directory}: "
                        f"{e.strerror or e}", e.errno) from e

  def latest_step(self) -> int | None:
    """The newest complete checkpoint (temporary directories of unfinished writes are skipped)."""
    return self._mgr.latest_step()

  def save(self, step: int, state: Any, host_state: dict) -> None:
    """Writes ``step`` and waits until it is complete (renamed into place).

    Raises:
      RunDirError: the write failed; the message names the directory and the
        last complete step, which is kept. The partial write is removed.
    """
    for name in (str(step), f"{step}{_TMP_SUFFIX}"):
      p = os.path.join(self.directory, name)
      if os.path.islink(p):  # orbax would remove or write through it
        raise RunDirError(f"{p} is a symlink; refusing to write a checkpoint through it",
                          errno_lib.EXDEV)
    try:
      self._mgr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          host=ocp.args.JsonSave(host_state)))
      self._mgr.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise several types for I/O
      code = _write_failure(e)
      if code is None:
        raise
      # Free what the partial write took (a full disk stays full otherwise);
      # orbax would remove it at the next save of this step anyway.
      for tmp in glob.glob(os.path.join(glob.escape(self.directory), f"{step}{_TMP_SUFFIX}*")):
        shutil.rmtree(tmp, ignore_errors=True)
      try:
        self._mgr.reload()
        last = self._mgr.latest_step()
      except Exception:  # noqa: BLE001 - best effort: the message matters more
        last = None
      kept = f"checkpoint ({last}) is kept" if last is not None else "checkpoint: none yet"
      raise RunDirError(f"cannot write checkpoint {step} to {self.directory}: {e}; "
                        f"the last complete {kept}", code) from e

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores into the structure (and shardings) of ``abstract_state``."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    out = self._mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        host=ocp.args.JsonRestore()))
    return out["state"], out["host"]

  def close(self) -> None:
    self._mgr.close()
