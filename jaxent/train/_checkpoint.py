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
* Each committed checkpoint gets a manifest (``<step>/jaxent_manifest.json``:
  every file's size and CRC-32), written by process 0 after the commit.
  :meth:`Checkpointer.verify` checks it; :meth:`Checkpointer.restore_intact`
  restores the newest checkpoint that passes the manifest, restores without
  error, holds a usable host state and finite parameters, and moves the ones
  it skips aside (``checkpoints_damaged/``), never deleting them.
"""
from __future__ import annotations

import errno as errno_lib
import glob
import json
import os
import re
import shutil
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxent.errors import RunDirError

_TMP_SUFFIX = ".orbax-checkpoint-tmp"
# absl status codes tensorstore puts at the start of an I/O error's message
_IO_STATUS = re.compile(r"^(RESOURCE_EXHAUSTED|PERMISSION_DENIED|UNAVAILABLE|DATA_LOSS|ABORTED|"
                        r"FAILED_PRECONDITION|NOT_FOUND|ALREADY_EXISTS|UNKNOWN|INTERNAL):")
_OS_CODE = re.compile(r"os_error_code='?(\d+)")
MANIFEST = "jaxent_manifest.json"
DAMAGED_DIR = "checkpoints_damaged"  # beside checkpoints/: where skipped checkpoints are moved
_CHUNK = 1 << 22


def _crc32(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while True:
      block = f.read(_CHUNK)
      if not block:
        return crc
      crc = zlib.crc32(block, crc)


def _files(step_dir: str) -> list[str]:
  """Every regular file under ``step_dir`` except the manifest, as sorted relative paths."""
  out = []
  for root, _, names in os.walk(step_dir):
    for n in names:
      rel = os.path.relpath(os.path.join(root, n), step_dir)
      if rel != MANIFEST:
        out.append(rel)
  return sorted(out)


def write_manifest(step_dir: str) -> None:
  """Records each file's size and CRC-32 in ``step_dir/MANIFEST`` (written beside, then renamed)."""
  files = {}
  for rel in _files(step_dir):
    p = os.path.join(step_dir, rel)
    files[rel] = {"size": os.path.getsize(p), "crc32": _crc32(p)}
  tmp = os.path.join(step_dir, MANIFEST + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump({"files": files}, f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, MANIFEST))


def check_manifest(step_dir: str) -> str | None:
  """Why ``step_dir`` does not match its manifest (a missing, truncated or altered file), or None.

  A checkpoint without a manifest (killed between the commit and the
  manifest, or written before manifests existed) passes here; the restore
  and the finiteness check still judge it.
  """
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      files = json.load(f)["files"]
    items = [(str(rel), int(m["size"]), int(m["crc32"])) for rel, m in files.items()]
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    return f"its manifest {MANIFEST} is unreadable ({e})"
  for rel, size, crc in items:
    p = os.path.join(step_dir, rel)
    if not os.path.isfile(p):
      return f"{rel} is missing"
    got = os.path.getsize(p)
    if got != size:
      return f"{rel} has {got} bytes, the manifest says {size}"
    if _crc32(p) != crc:
      return f"{rel} does not match its checksum"
  return None


def nonfinite_leaves(tree: Any) -> int:
  """How many floating-point arrays of ``tree`` hold NaN or inf (one host sync)."""
  flags = [jnp.logical_not(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
           if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return int(sum(bool(f) for f in jax.device_get(flags)))


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


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

  def __init__(self, directory: str, *, keep: int = 3, is_main: bool | None = None):
    self.directory = os.path.abspath(directory)
    self.is_main = jax.process_index() == 0 if is_main is None else is_main
    self.last_save_s: float | None = None  # seconds the last save took (commit and manifest)
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

  def all_steps(self) -> list[int]:
    """Every complete checkpoint, oldest first."""
    return sorted(self._mgr.all_steps())

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
    t0 = time.monotonic()
    try:
      self._mgr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          host=ocp.args.JsonSave(host_state)))
      self._mgr.wait_until_finished()
      if self.is_main:
        write_manifest(os.path.join(self.directory, str(step)))
      self.last_save_s = time.monotonic() - t0
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise several types for I/O
      code = _write_failure(e)
      if code is None:
        raise
      # Free what the partial write took (a full disk stays full otherwise);
      # orbax would remove it at the next save of this step anyway. The first
      # failing item surfaces while orbax may still be finishing the others,
      # so its background work is waited for before the removal.
      try:
        self._mgr.wait_until_finished()
      except Exception:  # noqa: BLE001 - the same failure again; it is being reported
        pass
      self._remove_partial(step)
      try:
        self._mgr.reload()
        last = self._mgr.latest_step()
      except Exception:  # noqa: BLE001 - best effort: the message matters more
        last = None
      kept = f"checkpoint ({last}) is kept" if last is not None else "checkpoint: none yet"
      raise RunDirError(f"cannot write checkpoint {step} to {self.directory}: {e}; "
                        f"the last complete {kept}", code) from e

  def _remove_partial(self, step: int) -> None:
    for tmp in glob.glob(os.path.join(glob.escape(self.directory), f"{step}{_TMP_SUFFIX}*")):
      shutil.rmtree(tmp, ignore_errors=True)

  def verify(self, step: int) -> str | None:
    """Why checkpoint ``step`` fails its manifest, or None (see :func:`check_manifest`)."""
    return check_manifest(os.path.join(self.directory, str(step)))

  def restore_intact(self, abstract_state: Any, *, host_keys: tuple[str, ...] = ()):
    """(step, state, host state, skipped) of the newest intact checkpoint.

    Newest first, a checkpoint is skipped when a file fails its manifest, the
    restore raises (truncated or missing files, garbled metadata or host
    state), the host state lacks one of ``host_keys``, or a parameter holds
    NaN or inf. Skipped checkpoints are moved to ``checkpoints_damaged/``
    beside the checkpoint directory (process 0; nothing is deleted) so that
    the steps they held can be saved again. ``skipped`` lists ``(step,
    reason)``.

    Raises:
      RunDirError: no complete checkpoint, or none intact (each one named).
    """
    steps = self.all_steps()
    if not steps:
      raise RunDirError(f"--resume: no complete checkpoint under {self.directory}", errno_lib.ENOENT)
    skipped = []
    for step in reversed(steps):
      why = self.verify(step)
      if why is None:
        try:
          state, host = self.restore(step, abstract_state)
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds for bad bytes
          why = f"cannot be read ({_first_line(e)})"
      if why is None:
        missing = [k for k in host_keys if not isinstance(host, dict) or k not in host]
        bad = nonfinite_leaves(state.params if hasattr(state, "params") else state)
        if missing:
          why = f"its host state lacks {', '.join(missing)}"
        elif bad:
          why = f"{bad} parameter array(s) hold NaN or inf"
      if why is None:
        if skipped:
          self._move_aside([s for s, _ in skipped])
        return step, state, host, skipped
      skipped.append((step, why))
    listing = "; ".join(f"checkpoint {s}: {w}" for s, w in skipped)
    raise RunDirError(f"--resume: no intact checkpoint under {self.directory} ({listing})",
                      errno_lib.EIO)

  def _move_aside(self, steps: list[int]) -> None:
    if self.is_main:
      dest = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR)
      os.makedirs(dest, exist_ok=True)
      stamp = time.strftime("%Y%m%d-%H%M%S")
      for step in steps:
        os.replace(os.path.join(self.directory, str(step)), os.path.join(dest, f"{step}-{stamp}"))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("jaxent_checkpoints_moved_aside")
    self._mgr.reload()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores into the structure (and shardings) of ``abstract_state``."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    out = self._mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        host=ocp.args.JsonRestore()))
    return out["state"], out["host"]

  def close(self) -> None:
    self._mgr.close()
