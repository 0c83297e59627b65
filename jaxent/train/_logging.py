"""Metrics to ``metrics.jsonl``, TensorBoard (tensorboardX) and W&B, process 0 only.

``train.loggers`` picks the sinks: ``jsonl`` (the run's record, what
``--resume`` and ``fit-law`` read), ``tensorboard`` (``tb/``) and ``wandb``
(Weights & Biases, an optional dependency: ``pip install 'jaxent[wandb]'``).
W&B runs offline, into the run directory's ``wandb/``, unless credentials
(``WANDB_API_KEY``) or ``WANDB_MODE`` ask for online; an online start that
fails (no network) falls back to offline with one warning, and a failure
while logging disables W&B with one warning: W&B never stops a run.

Each row is appended whole and the file closed after every step, so a killed
run leaves at most a partial last line; a resumed run rewrites the file up to
its checkpoint's step (:func:`truncate_after`), dropping that line and the
rows after the checkpoint. Paths are resolved inside the run directory
(``_checkpoint.run_path``): a ``metrics.jsonl`` or ``tb`` symlink to
elsewhere is refused.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from jaxent.errors import SetupError
from jaxent.files import open_regular
from jaxent.train._checkpoint import run_path


def _scalar(v: Any) -> float | int | None:
  try:
    a = np.asarray(v)  # host side: metrics were fetched with jax.device_get
  except Exception:  # noqa: BLE001
    return None
  if a.size != 1:
    return None
  x = a.item()
  if isinstance(x, (bool, np.bool_)):
    return int(x)
  if isinstance(x, int):
    return x
  x = float(x)
  return x if math.isfinite(x) else None  # JSON has no NaN/inf: logged as null


def _warn(msg: str) -> None:
  print(f"jaxent: warning: {msg}", file=sys.stderr)


class WandbLogger:
  """One W&B run: the project, the run name and the config, then a scalar row per step.

  Offline (written under ``run_dir/wandb``) unless ``WANDB_MODE`` is set or
  ``WANDB_API_KEY`` is; an online start that fails falls back to offline.
  """

  def __init__(self, run_dir: str, *, project: str, name: str, config: Mapping[str, Any]):
    try:
      import wandb  # optional dependency, imported only where used
    except ImportError:
      raise SetupError("train.loggers: 'wandb' needs the wandb package: "
                       "pip install 'jaxent[wandb]' (or drop wandb from train.loggers)") from None
    self._wandb = wandb
    self._failed = False
    os.makedirs(run_path(run_dir, "wandb"), exist_ok=True)  # a symlink out of the run is refused
    self.mode = os.environ.get("WANDB_MODE") or (
        "online" if os.environ.get("WANDB_API_KEY") else "offline")
    kw = dict(project=project, name=name, config=dict(config), dir=os.path.abspath(run_dir))
    try:
      self._run = wandb.init(mode=self.mode, **kw)
    except Exception as e:  # noqa: BLE001 - no network, bad credentials, service start-up
      if self.mode == "offline":
        raise SetupError(f"train.loggers: wandb could not start in {run_dir}: {e}") from None
      _warn(f"wandb could not start online ({type(e).__name__}: {str(e)[:200]}); logging offline "
            f"into {os.path.join(run_dir, 'wandb')}")
      self.mode = "offline"
      self._run = wandb.init(mode="offline", **kw)

  def log(self, step: int, row: Mapping[str, Any]) -> None:
    if self._run is None or self._failed:
      return
    try:
      self._run.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=step)
    except Exception as e:  # noqa: BLE001 - W&B must not stop a run
      _warn(f"wandb logging failed at step {step} ({type(e).__name__}: {str(e)[:200]}); "
            f"wandb is off for the rest of the run, metrics.jsonl is unaffected")
      self._failed = True

  def close(self) -> None:
    run, self._run = self._run, None
    if run is not None:
      try:
        run.finish()
      except Exception as e:  # noqa: BLE001
        _warn(f"wandb did not finish cleanly ({type(e).__name__}: {str(e)[:200]})")


class MetricsLogger:
  """Appends one JSON object per step to ``metrics.jsonl`` and mirrors scalars to the other sinks.

  ``loggers`` names the sinks (``jsonl``, ``tensorboard``, ``wandb``; default
  ``jsonl`` and, with ``tensorboard=True``, ``tensorboard``); ``wandb`` takes
  ``wandb_project``, ``run_name`` and ``config`` (logged with the run).
  """

  def __init__(self, run_dir: str, *, enabled: bool = True, tensorboard: bool = True,
               loggers: Sequence[str] | None = None, wandb_project: str = "jaxent",
               run_name: str | None = None, config: Mapping[str, Any] | None = None):
    if loggers is None:
      loggers = ("jsonl", "tensorboard") if tensorboard else ("jsonl",)
    self.enabled = enabled
    self.loggers = tuple(loggers)
    self.path = run_path(run_dir, "metrics.jsonl")
    self._jsonl = "jsonl" in self.loggers
    self._tb = None
    self._wandb = None
    if enabled and "tensorboard" in self.loggers:
      from tensorboardX import SummaryWriter  # host I/O: imported only where used
      self._tb = SummaryWriter(run_path(run_dir, "tb"))
    if enabled and "wandb" in self.loggers:
      self._wandb = WandbLogger(run_dir, project=wandb_project,
                                name=run_name or os.path.basename(os.path.abspath(run_dir)),
                                config=config or {})

  @classmethod
  def for_config(cls, cfg, run_dir: str, *, enabled: bool = True) -> MetricsLogger:
    """The sinks of ``cfg.train.loggers``; W&B gets ``cfg.name`` and the whole config."""
    return cls(run_dir, enabled=enabled, loggers=cfg.train.loggers,
               wandb_project=cfg.train.wandb_project, run_name=cfg.name, config=cfg.to_dict())

  def log(self, step: int, metrics: Mapping[str, Any]) -> dict:
    row = {"step": int(step)}
    for k, v in metrics.items():
      row[k] = _scalar(v)
    if not self.enabled:
      return row
    if self._jsonl:
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and v is not None:
          self._tb.add_scalar(k, v, step)
    if self._wandb is not None:
      self._wandb.log(step, row)
    return row

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._wandb is not None:
      self._wandb.close()
      self._wandb = None


def truncate_after(path: str, step: int) -> None:
  """Drops rows with ``step > step`` (a resumed run rewrites what came after its checkpoint).

  Lines that are not a JSON object with an integer ``step`` (a row cut short
  by a kill, bytes that are not UTF-8) are dropped too. The file is replaced
  atomically (written beside it, then renamed).
  """
  if not os.path.lexists(path):
    return
  keep = []
  with open_regular(path, "r", what="metrics file", encoding="utf-8", errors="replace") as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      s = row.get("step") if isinstance(row, dict) else None
      if isinstance(s, int) and s <= step:
        keep.append(line if line.endswith("\n") else line + "\n")
  tmp = run_path(os.path.dirname(os.path.abspath(path)), os.path.basename(path) + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(keep)
  os.replace(tmp, path)
