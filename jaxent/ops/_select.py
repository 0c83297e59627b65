"""Fixed-shape top-k selection with a traced count.

The covariance losses choose a data-dependent number of tokens,
``max(1, floor(ratio * N))`` with ``N`` the number of valid tokens. Shapes must
stay static, so the count is a traced scalar compared against ranks produced
by a ``lax.top_k`` of static size ``k_max``; the count never becomes a shape.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# ratio * N is formed in float32. The reference forms it in float64 with a
# Python float ratio; a decimal ratio such as 2e-4 is not exact in float32
# (2e-4 -> 1.99999995e-4), so 2e-4 * 15000 would floor to 2 instead of 3.
# Products within this relative distance below an integer snap up to it,
# which reproduces the double-precision count for such ratios.
_SNAP_REL = 2.0**-19


def selection_count(ratio, n_valid) -> jax.Array:
  """``max(1, floor(ratio * n_valid))`` as a traced int32 scalar.

  Args:
    ratio: selection ratio in (0, 1]; a Python float or a traced scalar.
    n_valid: number of valid tokens (traced int scalar).
  """
  n = jnp.asarray(n_valid, jnp.int32)
  # Split n so that each part is exact in float32 even beyond 2**24 tokens.
  hi = (n >> 12).astype(jnp.float32) * 4096.0
  lo = (n & 4095).astype(jnp.float32)
  r = jnp.asarray(ratio, jnp.float32)
  x = r * hi + r * lo
  k = jnp.floor(x)
  k = jnp.where(k + 1.0 - x <= x * _SNAP_REL, k + 1.0, k)
  return jnp.maximum(k.astype(jnp.int32), 1)


def static_count_bound(ratio: float, size: int) -> int:
  """Static upper bound on ``selection_count(ratio, n)`` for ``n <= size``."""
  x = float(ratio) * int(size)
  k = int(x)
  if k + 1 - x <= x * _SNAP_REL:
    k += 1
  return max(1, min(k, int(size)))


def top_k_mask(scores: jax.Array, valid: jax.Array, count, *, k_max: int) -> jax.Array:
  """Boolean mask of the ``count`` highest ``scores`` among ``valid`` entries.

  Ties are broken by position: the lower flat (row-major) index wins, as in
  ``lax.top_k``. At most ``min(count, k_max, valid.sum())`` entries are set.

  Args:
    scores: float ``[B, T]``; values at invalid positions are ignored (they
      may be NaN or inf).
    valid: bool ``[B, T]``.
    count: traced int scalar, the number to select.
    k_max: static bound on ``count``; the size of the top-k.

  Returns:
    bool ``[B, T]``.
  """
  shape = scores.shape
  flat = jnp.where(valid, scores, -jnp.inf).reshape(-1).astype(jnp.float32)
  v = valid.reshape(-1)
  k_max = int(min(max(k_max, 1), flat.shape[0]))
  _, idx = lax.top_k(flat, k_max)
  keep = (jnp.arange(k_max) < count) & v[idx]
  sel = jnp.zeros(flat.shape, bool).at[idx].set(keep, mode="drop")
  return sel.reshape(shape)
