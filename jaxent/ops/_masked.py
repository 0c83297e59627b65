"""Masked reductions and the loss aggregation modes.

Masks select with ``jnp.where``, never multiply: ``0 * nan`` is ``nan`` and
``0 * inf`` is ``nan``, so a product would let a NaN or inf sitting in a padding
position leak into the value, and its cotangent into the gradient. ``where``
sends a zero cotangent to the unselected branch.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxent.ops._checks import as_valid, check_ndim, check_scalar, check_shapes, upcast

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  """``num / den`` where ``den > 0``, else 0 (and a zero gradient)."""
  den = jnp.asarray(den, num.dtype)
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


# Row sums of a 0/1 float32 array are exact integers below 2**24.
_F32_EXACT = 1 << 24


def count_valid(valid: jax.Array, axis=None, *, keepdims: bool = False) -> jax.Array:
  """``Σ M`` over ``axis`` as int32: the number of valid entries.

  Same value as ``jnp.sum(valid, axis)``, computed faster on CPU: the mask is
  summed along its last axis in float32 (exact: a row is shorter than 2^24)
  and the per-row counts are added as int32. XLA:CPU reduces float32 with
  vectorised kernels but an int32 sum of a bool array as a converted copy
  and a reduce-window tree, which cost a third of PPO-clip's value-and-grad
  (bench/losses.py).
  """
  valid = as_valid(valid)
  if valid.ndim == 0 or valid.shape[-1] >= _F32_EXACT:
    return jnp.sum(valid, axis=axis, keepdims=keepdims, dtype=jnp.int32)
  axes = tuple(range(valid.ndim)) if axis is None else tuple(
      a % valid.ndim for a in ((axis,) if isinstance(axis, int) else axis))
  last = valid.ndim - 1
  if last not in axes:
    return jnp.sum(valid, axis=axis, keepdims=keepdims, dtype=jnp.int32)
  # astype first: jnp.sum(bool, dtype=f32) converts through int32, a second
  # [B, T] copy that XLA would not share with other users of the f32 mask.
  rows = jnp.sum(valid.astype(jnp.float32), axis=-1, keepdims=True).astype(jnp.int32)
  out = jnp.sum(rows, axis=axes, keepdims=True) if len(axes) > 1 else rows
  return out if keepdims else jnp.squeeze(out, axis=axes)


def masked_sum(x: jax.Array, mask: jax.Array, axis=None, *, keepdims: bool = False) -> jax.Array:
  """``Σ x·M`` over ``axis`` (computed as a select, so masked NaN/inf are ignored)."""
  check_shapes("x", x, mask=mask)
  x = upcast(x)
  return jnp.sum(jnp.where(as_valid(mask), x, 0), axis=axis, keepdims=keepdims)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None, *, keepdims: bool = False) -> jax.Array:
  """``Σ x·M / Σ M`` over ``axis``; 0 where no element is valid."""
  valid = as_valid(mask)
  total = masked_sum(x, valid, axis=axis, keepdims=keepdims)
  return safe_div(total, count_valid(valid, axis=axis, keepdims=keepdims))


def centered_products(log_prob: jax.Array, advantages: jax.Array,
                      mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token ``Cov_i = (A_i − mean A)(log π_i − mean log π)`` and ``N``.

  Means run over the ``N`` valid tokens of the arrays passed in (under a
  sharded ``jit``, the whole global batch); ``Cov_i`` is not divided by
  ``N``, and is 0 at masked positions, whose values (even NaN or inf) never
  reach it. The one implementation behind ``losses.token_covariance`` (the
  Clip-Cov / KL-Cov selections) and ``diagnostics.token_covariance``.

  Args:
    log_prob: float ``[B, T]``.
    advantages: float ``[B, T]``.
    mask: ``[B, T]``, nonzero for a valid token.

  Returns:
    ``(cov, n_valid)``: ``cov`` in ``log_prob``'s (upcast) dtype, ``n_valid``
    int32.
  """
  valid = as_valid(mask)
  lp = upcast(log_prob)
  a = upcast(advantages).astype(lp.dtype)
  n_valid = count_valid(valid)
  n = jnp.maximum(n_valid, 1).astype(lp.dtype)
  sum_a, sum_lp = _masked_sums((a, lp), valid)
  cov = jnp.where(valid, (a - sum_a / n) * (lp - sum_lp / n), 0)
  return cov, n_valid


def _masked_sums(xs: tuple[jax.Array, ...], valid: jax.Array) -> tuple[jax.Array, ...]:
  """``Σ x·M`` for each ``x``, without writing a masked copy of ``x``.

  Same values as ``masked_sum``. XLA:CPU's reduction kernels absorb a
  product with the float mask but not a select, so ``Σ where(M, x, 0)``
  writes the selected array out and reads it back; ``Σ x·m`` with ``m`` the
  mask in float32 reads ``x`` and ``m`` once (``m`` is the array the valid
  count already sums). The barrier keeps XLA from rewriting the product
  back into a select. A masked NaN or inf makes the product sum non-finite;
  only then are the sums redone as selects, so masked values still never
  reach the result. Other platforms sum the selects directly.
  """
  def selects(*xs):
    return tuple(masked_sum(x, valid) for x in xs)

  def products(*xs):
    m = jax.lax.optimization_barrier(valid.astype(xs[0].dtype))
    fast = tuple(jnp.sum(x * m) for x in xs)
    finite = functools.reduce(jnp.logical_and, [jnp.isfinite(s) for s in fast])
    return jax.lax.cond(finite, lambda xs: fast, lambda xs: selects(*xs), xs)

  # Only XLA:CPU needs the detour. GPU and TPU compilers fuse the select into
  # the reduction, and XLA:GPU would run the cond by copying its predicate to
  # the host and waiting.
  return jax.lax.platform_dependent(*xs, cpu=products, default=selects)


def check_agg(agg: str) -> None:
  if agg not in AGG_MODES:
    raise ValueError(f"agg must be one of {list(AGG_MODES)}, got {agg!r}")


def aggregate(per_token: jax.Array, mask: jax.Array, agg: str = "token-mean", *,
              num_tokens=None, num_seqs=None, max_len=None) -> jax.Array:
  """Reduces a per-token ``[B, T]`` array to a scalar.

  With ``M`` the mask, ``N = Σ M`` and ``S`` the number of non-empty rows:

  * ``"token-mean"``: ``Σ L·M / N``.
  * ``"seq-mean-token-sum"``: ``Σ_b (Σ_t L·M) / S``.
  * ``"seq-mean-token-mean"``: ``Σ_b (Σ_t L·M / Σ_t M) / S`` (empty rows add 0).
  * ``"seq-mean-token-sum-norm"``: ``Σ L·M / T`` (Dr.GRPO), ``T`` the padded
    length or ``max_len``.

  Every mode is 0, with zero gradient, on an all-masked batch.

  Micro-batch gradient accumulation: pass the mini-batch's global ``N``
  (``num_tokens``) and ``S`` (``num_seqs``), and a fixed ``max_len``; then the
  sum over micro-batches (split along rows) of ``aggregate`` equals the
  mini-batch value exactly, since every mode is a sum over rows divided by a
  batch-wide constant. Each may be a traced scalar; when ``None`` it is
  computed from ``mask``.

  Args:
    per_token: float ``[B, T]``; values at masked positions are ignored.
    mask: ``[B, T]``, nonzero for a valid token.
    agg: one of ``AGG_MODES``.
    num_tokens: optional normalizer ``N`` for ``"token-mean"``.
    num_seqs: optional normalizer ``S`` for the ``"seq-mean-*"`` modes.
    max_len: optional ``T`` for ``"seq-mean-token-sum-norm"``.

  Returns:
    a float32 (or float64) scalar.
  """
  check_agg(agg)
  check_ndim("per_token", per_token, 2, "a [batch, time] array")
  check_shapes("per_token", per_token, mask=mask)
  check_scalar("num_tokens", 0 if num_tokens is None else num_tokens, low=0)
  check_scalar("num_seqs", 0 if num_seqs is None else num_seqs, low=0)
  check_scalar("max_len", 1 if max_len is None else max_len, low=0, low_open=True)
  valid = as_valid(mask)
  x = jnp.where(valid, upcast(per_token), 0)
  if agg == "token-mean":
    n = count_valid(valid) if num_tokens is None else num_tokens
    return safe_div(jnp.sum(x), n)
  if agg == "seq-mean-token-sum-norm":
    t = per_token.shape[-1] if max_len is None else max_len
    return jnp.sum(x) / jnp.asarray(t, x.dtype)
  row_len = count_valid(valid, axis=-1)
  row_sum = jnp.sum(x, axis=-1)
  s = jnp.sum(row_len > 0) if num_seqs is None else num_seqs
  if agg == "seq-mean-token-sum":
    return safe_div(jnp.sum(row_sum), s)
  return safe_div(jnp.sum(safe_div(row_sum, row_len)), s)
