"""Checkpoints through orbax's CheckpointManager.

One checkpoint holds the train state (params, optimizer state, step, PRNG
key) and, as JSON, the data iterator's state and the loop's host state, so a
resumed run continues exactly where the last complete checkpoint was taken.
Orbax writes to a temporary directory and renames it when complete, so a
kill during a write leaves the previous checkpoint loadable.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  def __init__(self, directory: str, *, keep: int = 3):
    self.directory = os.path.abspath(directory)
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self._mgr = ocp.CheckpointManager(self.directory, options=opts)

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def save(self, step: int, state: Any, host_state: dict) -> None:
    self._mgr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        host=ocp.args.JsonSave(host_state)))
    self._mgr.wait_until_finished()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores into the structure (and shardings) of ``abstract_state``."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    out = self._mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        host=ocp.args.JsonRestore()))
    return out["state"], out["host"]

  def close(self) -> None:
    self._mgr.close()
