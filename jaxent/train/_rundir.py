"""One owner per run directory, and what a launch may do to the run already there.

``claim`` runs before anything of a launch is written:

* **Lock.** Process 0 holds an exclusive advisory lock (``fcntl.flock``) on
  ``<run_dir>/run.lock`` for the whole launch; the file names the owner's
  host, pid and start time. A second launch on the same directory fails with
  :class:`RunDirError` naming that owner. The kernel drops the lock when its
  process dies, so a lock file that still names an owner but is not locked
  was left by a process that is gone: it is reported (one line) and taken
  over. ``fcntl`` rather than the ``filelock`` package: the owner's identity
  in the file is the point, and ``filelock`` (only a transitive dependency
  here) keeps no content.
* **Fresh runs.** A directory that holds anything besides the lock and the
  generated ``data/`` holds a run: a launch without ``resume`` refuses it,
  naming ``--resume`` and ``--overwrite``; ``overwrite`` moves the old
  contents to a sibling ``<run_dir>.old-<time>`` (nothing is deleted).
* **Resume.** The new config is compared with the stored ``config.yaml``
  before anything is written: fields that fix the checkpoint's shapes, the
  batch layout or the data order (``INCOMPATIBLE``), and the training file's
  content, must not change; ``loss.name`` may change only with
  ``change_loss``; anything else may, and each launch appends its command
  line, config diff and data fingerprint to ``history.jsonl``.
"""
from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
from typing import Any, Sequence

import yaml

from jaxent.config import Config
from jaxent.errors import RunDirError
from jaxent.train._checkpoint import run_path

LOCK = "run.lock"
HISTORY = "history.jsonl"
# Entries a run directory may hold without holding a run: the lock, and the generated
# task's files (rewritten identically from the config by every launch).
_NOT_A_RUN = (LOCK, "data")
# Names the trainer writes: each is resolved (and refused if it escapes) before anything is written.
_RUN_FILES = ("config.yaml", "checkpoints", "metrics.jsonl", "tb", "data", HISTORY)

# Config fields a resumed run must keep: they fix the checkpoint's shapes and dtypes, the
# model it started from (the reference policy), the batch layout, or the data order the
# saved iterator position refers to. A prefix ends with ".".
INCOMPATIBLE = (
    "model.path", "model.arch.", "model.param_dtype", "model.init_seed",
    "data.task", "data.train_path", "data.prompt_key", "data.answer_key", "data.chat_template",
    "data.max_prompt_len", "data.shuffle_seed", "data.num_operands", "data.num_digits",
    "rollout.prompts_per_step", "rollout.samples_per_prompt", "train.mini_batches",
    "train.ppo_epochs", "train.seed",
)
LOSS_NAME = "loss.name"
_FULL_HASH_BYTES = 256 << 20  # files up to this size are hashed whole; larger ones sampled
_SAMPLES, _SAMPLE_BYTES = 16, 1 << 20


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out if out or not prefix else {prefix[:-1]: {}}
  return {prefix[:-1]: d}


def config_diff(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
  """``(dotted key, old value, new value)`` for each field that differs (absent: None)."""
  a, b = _flatten(old), _flatten(new)
  return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _incompatible(key: str) -> bool:
  return any(key == p or (p.endswith(".") and key.startswith(p)) for p in INCOMPATIBLE)


def data_fingerprint(cfg: Config) -> dict | None:
  """Size and SHA-256 of the training file (``data.task=jsonl``); None for the generated task.

  Files over 256 MiB are fingerprinted by their size and 16 evenly spaced
  1 MiB blocks, so a launch does not reread a large dataset whole.
  """
  path = cfg.data.train_path
  if cfg.data.task != "jsonl" or path is None or not os.path.isfile(path):
    return None
  size = os.path.getsize(path)
  h = hashlib.sha256()
  with open(path, "rb") as f:
    if size <= _FULL_HASH_BYTES:
      for block in iter(lambda: f.read(1 << 22), b""):
        h.update(block)
      how = "sha256"
    else:
      for i in range(_SAMPLES):
        f.seek((size - _SAMPLE_BYTES) * i // (_SAMPLES - 1))
        h.update(f.read(_SAMPLE_BYTES))
      how = f"sha256 of {_SAMPLES} x 1 MiB blocks"
  return {"path": os.path.abspath(path), "size": size, "hash": h.hexdigest(), "how": how}


# ---------------------------------------------------------------------------------- lock ---

_HELD: dict[str, "RunLock"] = {}  # run directory (real path) -> this process's lock on it


@dataclasses.dataclass
class RunLock:
  path: str                 # the lock file
  fd: int
  stale: str | None = None  # the owner of a lock left by a dead process, when one was taken over

  def release(self) -> None:
    if self.fd < 0:
      return
    try:
      os.ftruncate(self.fd, 0)  # a released lock names nobody: an owner left in it means a crash
      fcntl.flock(self.fd, fcntl.LOCK_UN)
    finally:
      os.close(self.fd)
      self.fd = -1
      _HELD.pop(os.path.dirname(self.path), None)


def _owner_text(raw: bytes) -> str | None:
  try:
    o = json.loads(raw.decode("utf-8"))
    return f"pid {o['pid']} on host {o['host']} (since {o['started']})"
  except (ValueError, KeyError, TypeError, UnicodeDecodeError):
    return raw.decode("utf-8", "replace").strip()[:200] or None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def lock(run_dir: str) -> RunLock:
  """Takes ``run_dir``'s lock for this process (creating the directory).

  Raises:
    RunDirError: another process holds it (the message names its host and
      pid), or the directory cannot be created.
  """
  try:
    os.makedirs(run_dir, exist_ok=True)
  except OSError as e:
    raise RunDirError(f"cannot create the run directory {run_dir}: {e}", e.errno) from e
  path = run_path(run_dir, LOCK)
  root = os.path.dirname(path)
  if root in _HELD:
    raise RunDirError(f"run directory {run_dir} is already in use by this process", errno.EBUSY)
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
  except OSError as e:
    raise RunDirError(f"cannot open the lock file {path}: {e}", e.errno) from e
  try:
    raw = os.pread(fd, 4096, 0)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise RunDirError(
          f"run directory {run_dir} is in use by {_owner_text(raw) or 'another process'} "
          f"(lock file {path}); wait for that run to end or stop it, or choose another --run-dir",
          errno.EBUSY) from None
    except OSError as e:  # a filesystem without flock: judge the owner this host can see
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        raise
      try:
        o = json.loads(raw.decode("utf-8"))
        if o["host"] == socket.gethostname() and o["pid"] != os.getpid() and _pid_alive(o["pid"]):
          raise RunDirError(f"run directory {run_dir} is in use by {_owner_text(raw)} "
                            f"(lock file {path}; this filesystem has no flock)", errno.EBUSY)
      except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        pass
    stale = _owner_text(raw) if raw.strip() else None
    me = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": _now()})
    os.ftruncate(fd, 0)
    os.pwrite(fd, (me + "\n").encode(), 0)
    os.fsync(fd)
  except BaseException:
    os.close(fd)
    raise
  held = RunLock(path=path, fd=fd, stale=stale)
  _HELD[root] = held
  return held


# --------------------------------------------------------------------------------- claim ---

@dataclasses.dataclass
class Claim:
  """A launch's hold on its run directory: the lock, and what ``record`` will write."""
  run_dir: str
  resume: bool
  lock: RunLock | None                           # process 0 only
  diff: list[tuple[str, Any, Any]]               # config changes from the stored run (resume)
  fingerprint: dict | None                       # the training file's, this launch
  command: list[str]
  notes: list[str] = dataclasses.field(default_factory=list)  # one line each, for stderr

  def record(self, cfg: Config, *, start_step: int) -> None:
    """Writes ``config.yaml`` and appends this launch to ``history.jsonl`` (process 0)."""
    if self.lock is None:
      return
    with open(run_path(self.run_dir, "config.yaml"), "w", encoding="utf-8") as f:
      f.write(cfg.to_yaml())
    entry = {"time": _now(), "host": socket.gethostname(), "pid": os.getpid(),
             "command": self.command, "resume": self.resume, "start_step": start_step,
             "config_diff": [{"key": k, "old": a, "new": b} for k, a, b in self.diff],
             "data": self.fingerprint}
    with open(run_path(self.run_dir, HISTORY), "a", encoding="utf-8") as f:
      f.write(json.dumps(entry) + "\n")

  def release(self) -> None:
    if self.lock is not None:
      self.lock.release()
      self.lock = None


def _holds_run(run_dir: str) -> list[str]:
  return sorted(n for n in os.listdir(run_dir) if n not in _NOT_A_RUN)


def _move_aside(run_dir: str, names: list[str]) -> str:
  base = os.path.abspath(run_dir).rstrip(os.sep)
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  dest, i = f"{base}.old-{stamp}", 1
  while os.path.lexists(dest):
    dest, i = f"{base}.old-{stamp}-{i}", i + 1
  try:
    os.makedirs(dest)
    for n in os.listdir(run_dir):
      if n != LOCK:
        os.rename(os.path.join(run_dir, n), os.path.join(dest, n))
  except OSError as e:
    raise RunDirError(f"--overwrite: cannot move the old contents of {run_dir} to {dest}: {e}",
                      e.errno) from e
  return dest


def _stored_config(run_dir: str) -> dict | None:
  path = os.path.join(run_dir, "config.yaml")
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      data = yaml.safe_load(f)
  except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
    raise RunDirError(f"--resume: cannot read the run's stored config {path}: {e}",
                      errno.EINVAL) from e
  if not isinstance(data, dict):
    raise RunDirError(f"--resume: the run's stored config {path} is not a mapping", errno.EINVAL)
  return data


def _last_fingerprint(run_dir: str) -> dict | None:
  path = os.path.join(run_dir, HISTORY)
  last = None
  if os.path.isfile(path):
    with open(path, encoding="utf-8", errors="replace") as f:
      for line in f:
        try:
          row = json.loads(line)
        except ValueError:
          continue
        if isinstance(row, dict) and row.get("data"):
          last = row["data"]
  return last


def _show(v: Any) -> str:
  return json.dumps(v) if not isinstance(v, str) else v


def check_resume(run_dir: str, cfg: Config, *, change_loss: bool = False,
                 fingerprint: dict | None = None) -> list[tuple[str, Any, Any]]:
  """The config diff of resuming the run in ``run_dir`` with ``cfg``; reads only.

  Raises:
    RunDirError: an incompatible field changed (all of them listed), the
      training file's content changed, ``loss.name`` changed without
      ``change_loss``, or the stored config is unreadable.
  """
  stored = _stored_config(run_dir)
  if stored is None:
    return []
  diff = config_diff(stored, cfg.to_dict())
  bad = [f"{k} {_show(a)} -> {_show(b)}" for k, a, b in diff if _incompatible(k)]
  old_fp = _last_fingerprint(run_dir)
  if (fingerprint is not None and old_fp is not None and old_fp.get("path") == fingerprint["path"]
      and (old_fp.get("size"), old_fp.get("hash")) != (fingerprint["size"], fingerprint["hash"])):
    bad.append(f"the content of data.train_path {fingerprint['path']} "
               f"({old_fp.get('size')} -> {fingerprint['size']} bytes, {fingerprint['how']} differs)")
  if bad:
    raise RunDirError(
        f"--resume: the config is incompatible with the run in {run_dir}: {'; '.join(bad)} "
        f"(these fix the checkpoint's shapes, the batch layout or the data order; nothing was "
        f"written: keep them, or start a new run with another --run-dir or --overwrite)",
        errno.EINVAL)
  loss = [(a, b) for k, a, b in diff if k == LOSS_NAME]
  if loss and not change_loss:
    raise RunDirError(f"--resume: loss.name changes from {loss[0][0]} to {loss[0][1]}; pass "
                      f"--change-loss to continue this run with the new loss (nothing was written)",
                      errno.EINVAL)
  return diff


def claim(run_dir: str, cfg: Config, *, resume: bool, overwrite: bool = False,
          change_loss: bool = False, command: Sequence[str] | None = None,
          is_main: bool = True) -> Claim:
  """Checks and locks ``run_dir`` for a launch of ``cfg``; writes nothing but the lock.

  Process 0 (``is_main``) takes the lock, judges a fresh run against what
  the directory holds, and with ``overwrite`` moves an old run aside; every
  process checks a resume (read-only). With several processes they then
  agree (one gather): when one refuses, every other one raises too, so none
  waits for a peer that has stopped. The notes (a stale lock taken over,
  contents moved) are one line each for the caller to print.

  Raises:
    RunDirError: the directory is locked, holds a run (without ``resume`` or
      ``overwrite``), has a file of the run that escapes it or a
      ``checkpoints`` that is not a directory, or ``check_resume`` refuses.
  """
  try:
    out = _claim(run_dir, cfg, resume=resume, overwrite=overwrite, change_loss=change_loss,
                 command=command, is_main=is_main)
  except RunDirError:
    _agree(refused=True)
    raise
  try:
    _agree(refused=False)
  except BaseException:
    out.release()
    raise
  return out


def _agree(*, refused: bool) -> None:
  import jax
  if jax.process_count() == 1:
    return
  from jaxent import sharding
  if sharding.sum_counters({"refused": int(refused)})["refused"] and not refused:
    raise RunDirError("another process of this job refused the run directory (its message says "
                      "why)", errno.ECANCELED)


def _claim(run_dir: str, cfg: Config, *, resume: bool, overwrite: bool = False,
          change_loss: bool = False, command: Sequence[str] | None = None,
          is_main: bool = True) -> Claim:
  if resume and overwrite:
    raise RunDirError("--resume and --overwrite exclude each other: continue the run, or move it "
                      "aside and start over", errno.EINVAL)
  held = lock(run_dir) if is_main else None
  try:
    notes = []
    if held is not None and held.stale:
      notes.append(f"run directory {run_dir}: took over a stale lock of {held.stale}, a process "
                   f"that is gone")
    if os.path.isdir(run_dir):
      for name in _RUN_FILES:
        run_path(run_dir, name)
      ck = os.path.join(run_dir, "checkpoints")
      if os.path.lexists(ck) and not os.path.isdir(ck):
        raise RunDirError(f"checkpoint directory {os.path.realpath(ck)} exists and is not a "
                          f"directory", errno.ENOTDIR)
    fingerprint = data_fingerprint(cfg)
    diff: list = []
    # Only process 0 judges a fresh run: the others may look after it has begun writing.
    present = _holds_run(run_dir) if is_main and os.path.isdir(run_dir) else []
    if resume:
      diff = check_resume(run_dir, cfg, change_loss=change_loss, fingerprint=fingerprint)
    elif present:
      if not overwrite:
        what = ", ".join(present[:6]) + (", ..." if len(present) > 6 else "")
        raise RunDirError(
            f"run directory {run_dir} already holds a run ({what}); continue it with --resume, "
            f"or start over with --overwrite (moves the old contents to "
            f"{os.path.abspath(run_dir)}.old-<time>)", errno.EEXIST)
      if is_main:
        notes.append(f"--overwrite: moved the previous contents of {run_dir} to "
                     f"{_move_aside(run_dir, present)}")
    return Claim(run_dir=run_dir, resume=resume, lock=held, diff=diff, fingerprint=fingerprint,
                 command=list(sys.argv if command is None else command), notes=notes)
  except BaseException:
    if held is not None:
      held.release()
    raise


def held(run_dir: str) -> bool:
  """Whether this process holds ``run_dir``'s lock."""
  return os.path.dirname(run_path(run_dir, LOCK)) in _HELD
