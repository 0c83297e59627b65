"""Host-side views of arrays on a multi-process mesh (``jax.distributed``).

Each process holds the shards of its own devices; these helpers give the
host what it needs in full (sampled tokens, prompts, rewards, counters),
gathered in process order. With one process they return their input.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np


def host_array(x) -> np.ndarray:
  """A device array on this host in full (gathered from the other processes if needed)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def put(x, s: jax.sharding.Sharding, *, may_alias: bool | None = None):
  """``jax.device_put(x, s)`` that also works when ``s`` spans other processes' devices.

  Another process's devices cannot receive this process's buffer: a local
  ``jax.Array`` goes through the host, every process passing the same value
  and placing its own shards (a typed PRNG key through its key data). An
  array already on the mesh is copied device to device.
  """
  if isinstance(x, jax.Array) and not s.is_fully_addressable and x.is_fully_addressable:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = jax.device_put(np.asarray(jax.random.key_data(x)), s, may_alias=may_alias)
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    x = np.asarray(x)
  return jax.device_put(x, s, may_alias=may_alias)


def _allgather(x: np.ndarray) -> np.ndarray:
  """``[process_count, *x.shape]``: every process's ``x``, in process order."""
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=False))


def gather_prompts(prompts: list[list[int]]) -> list[list[int]]:
  """This process's prompts -> the global prompt list (processes in order)."""
  if jax.process_count() == 1:
    return prompts
  lens = _allgather(np.asarray([len(p) for p in prompts], np.int32))
  width = int(lens.max())
  mine = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    mine[i, :len(p)] = p
  toks = _allgather(mine)
  return [toks[r, i, :lens[r, i]].tolist() for r in range(toks.shape[0]) for i in range(toks.shape[1])]


def gather_rows(x: np.ndarray) -> np.ndarray:
  """Per-process row blocks -> the global rows (processes in order)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  g = _allgather(x)
  return g.reshape((-1,) + g.shape[2:])


def sum_counters(counters: Mapping[str, Any]) -> dict:
  """Numeric counters summed over processes (each counted its own rows)."""
  if jax.process_count() == 1:
    return dict(counters)
  keys = sorted(k for k, v in counters.items() if isinstance(v, (int, float, np.number)))
  tot = _allgather(np.asarray([float(counters[k]) for k in keys], np.float64)).sum(axis=0)
  return {k: (int(v) if isinstance(counters[k], (int, np.integer)) else float(v))
          for k, v in zip(keys, tot)}
