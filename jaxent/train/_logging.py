"""Metrics to ``metrics.jsonl`` and TensorBoard (tensorboardX), process 0 only.

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
from typing import Any, Mapping

import numpy as np

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


class MetricsLogger:
  """Appends one JSON object per step to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

  def __init__(self, run_dir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = run_path(run_dir, "metrics.jsonl")
    self._tb = None
    if enabled and tensorboard:
      from tensorboardX import SummaryWriter  # host I/O: imported only where used
      self._tb = SummaryWriter(run_path(run_dir, "tb"))

  def log(self, step: int, metrics: Mapping[str, Any]) -> dict:
    row = {"step": int(step)}
    for k, v in metrics.items():
      row[k] = _scalar(v)
    if not self.enabled:
      return row
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and v is not None:
          self._tb.add_scalar(k, v, step)
    return row

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


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
