"""Metrics to ``metrics.jsonl`` and TensorBoard (tensorboardX), process 0 only."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np


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
    self.path = os.path.join(run_dir, "metrics.jsonl")
    self._tb = None
    if enabled and tensorboard:
      from tensorboardX import SummaryWriter  # host I/O: imported only where used
      self._tb = SummaryWriter(os.path.join(run_dir, "tb"))

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
  """Drops rows with ``step > step`` (a resumed run rewrites what came after its checkpoint)."""
  if not os.path.exists(path):
    return
  keep = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        if json.loads(line).get("step", 0) <= step:
          keep.append(line)
      except json.JSONDecodeError:
        continue
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(keep)
  os.replace(tmp, path)
