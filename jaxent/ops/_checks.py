"""Trace-time argument checks shared by ops, losses and advantages.

Every check runs in Python while a function is being traced, so bad input
fails once, at trace time, with a ``ValueError`` naming the argument. Values
that are traced (or live on a device) are only checked for shape: reading
them would be a host round trip.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def concrete_scalar(x: Any) -> float | None:
  """The value of a Python or NumPy scalar, else ``None``.

  ``jax.Array`` values return ``None`` even outside ``jit``: converting one
  would be a device-to-host transfer (and fails under
  ``jax.transfer_guard("disallow")``).
  """
  if isinstance(x, (bool, int, float, np.integer, np.floating, np.bool_)):
    return float(x)
  if isinstance(x, np.ndarray) and x.ndim == 0:
    return float(x)
  return None


def check_scalar(name: str, x: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
  """Checks that ``x`` is a scalar and, when concrete, lies in the range."""
  if np.ndim(x) != 0:
    raise ValueError(f"{name} must be a scalar, got shape {np.shape(x)}")
  v = concrete_scalar(x)
  if v is None:
    return
  if not np.isfinite(v):
    raise ValueError(f"{name} must be finite, got {v}")
  bad_low = low is not None and (v <= low if low_open else v < low)
  bad_high = high is not None and (v >= high if high_open else v > high)
  if bad_low or bad_high:
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    interval = f"{left}{lo}, {hi}{right}"
    raise ValueError(f"{name} must lie in {interval}, got {v:g}")


def check_shapes(ref_name: str, ref: Any, **others: Any) -> tuple[int, ...]:
  """Checks that every array in ``others`` has the shape of ``ref``."""
  shape = tuple(np.shape(ref))
  for name, x in others.items():
    if x is None:
      continue
    if tuple(np.shape(x)) != shape:
      raise ValueError(f"{name} has shape {tuple(np.shape(x))}, but {ref_name} has shape {shape}; "
                       "they must match")
  return shape


def check_ndim(name: str, x: Any, ndim: int, what: str) -> None:
  if np.ndim(x) != ndim:
    raise ValueError(f"{name} must be {what} (rank {ndim}), got shape {tuple(np.shape(x))}")


def check_float(name: str, x: Any) -> None:
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise ValueError(f"{name} must be a floating-point array, got dtype {jnp.result_type(x)}")


def as_valid(mask: jax.Array) -> jax.Array:
  """Boolean validity from a 0/1 mask of any dtype (nonzero = valid)."""
  mask = jnp.asarray(mask)
  return mask if mask.dtype == jnp.bool_ else mask != 0


def upcast(x: jax.Array) -> jax.Array:
  """``x`` in at least float32 (bfloat16/float16 -> float32, float64 stays).

  Losses sum over up to millions of tokens; bfloat16's 8-bit mantissa would
  lose most of the sum. Keeping float64 lets gradient checks run in x64 mode.
  """
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))
