"""Per-token covariance between log-probability and advantage.

Over the valid tokens of a batch (mask = 1), REFERENCE.md "Per-token
covariance":

    cov_i = (A_i − mean(A)) · (log π_i − mean(log π)),

a centred product, not divided by N. Its mean over the valid tokens is the
batch covariance ``Cov(log π, A)``, the sampled estimate of the term that
drives the entropy change under natural policy gradient,
``ΔH ≈ −η·Cov(log π, A)``. Clip-Cov and KL-Cov act on the tokens with the
largest ``cov_i``, so its upper quantiles are what a trainer wants to watch.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from jaxent import ops

DEFAULT_QUANTILES = (0.5, 0.9, 0.99, 0.999)


def _quantile_key(q: float) -> str:
  return f"cov_p{100.0 * q:g}"


def token_covariance(
    log_prob: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-token centred products ``cov_i`` and their summary statistics.

  Pure and jit-able with static shapes: the number of valid tokens ``N`` is a
  traced scalar, quantiles come from a sort with the padding pushed past the
  end and indices computed from ``N``, never from a host round trip. Values
  at padding positions (which may be NaN or inf) never reach the outputs.

  Args:
    log_prob: float ``[B, T]``, ``log π`` of the sampled tokens.
    advantages: float ``[B, T]``, ``A``.
    mask: ``[B, T]``, 1 (or True) for a real response token, 0 for padding.
    quantiles: static levels in [0, 1] for the ``cov_p*`` statistics (linear
      interpolation between order statistics, as ``numpy.quantile``). The
      sort costs O(N log N); pass ``()`` to skip it.

  Returns:
    ``(cov, stats)``: ``cov`` float32 ``[B, T]``, ``cov_i`` at valid tokens
    and 0 at padding; ``stats`` a dict of float32 scalars:
    ``cov`` (batch covariance: mean of ``cov_i`` over valid tokens),
    ``cov_std`` (population std of ``cov_i``), ``cov_min``, ``cov_max``,
    ``cov_p50``, ``cov_p90``, ``cov_p99``, ``cov_p99.9`` (one per quantile
    level), ``cov_frac_pos`` (fraction of valid tokens with ``cov_i > 0``).
    With no valid token every statistic is 0.
  """
  log_prob = jnp.asarray(log_prob)
  advantages = jnp.asarray(advantages)
  mask = jnp.asarray(mask)
  if advantages.shape != log_prob.shape:
    raise ValueError(
        f"advantages must have the shape of log_prob {log_prob.shape}, "
        f"got {advantages.shape}")
  if mask.shape != log_prob.shape:
    raise ValueError(
        f"mask must have the shape of log_prob {log_prob.shape}, got {mask.shape}")
  levels = tuple(float(q) for q in quantiles)
  for q in levels:
    if not 0.0 <= q <= 1.0:
      raise ValueError(f"quantiles must lie in [0, 1], got {q}")

  valid = mask.astype(bool)
  # The losses' selection ranks the same products (ops.centered_products).
  cov, n = ops.centered_products(log_prob.astype(jnp.float32), advantages.astype(jnp.float32),
                                 valid)
  n_f = jnp.maximum(n, 1).astype(jnp.float32)

  any_valid = n > 0
  batch_cov = jnp.sum(cov) / n_f
  var = jnp.sum(jnp.where(valid, jnp.square(cov - batch_cov), 0.0)) / n_f
  stats = {
      "cov": batch_cov,
      "cov_std": jnp.sqrt(var),
      "cov_min": jnp.where(any_valid, jnp.min(jnp.where(valid, cov, jnp.inf)), 0.0),
      "cov_max": jnp.where(any_valid, jnp.max(jnp.where(valid, cov, -jnp.inf)), 0.0),
  }
  if levels:
    # Padding sorts to the end as +inf; order statistics 0..N-1 are the valid
    # values, so an index computed from the traced N addresses them directly.
    ordered = jnp.sort(jnp.where(valid, cov, jnp.inf).reshape(-1))
    last = jnp.maximum(n - 1, 0)
    for q in levels:
      pos = q * last.astype(jnp.float32)
      lo = jnp.minimum(jnp.floor(pos).astype(jnp.int32), last)
      hi = jnp.minimum(lo + 1, last)
      frac = pos - lo.astype(jnp.float32)
      v_lo, v_hi = ordered[lo], ordered[hi]
      value = v_lo + frac * (v_hi - v_lo)
      stats[_quantile_key(q)] = jnp.where(any_valid, value, 0.0)
  stats["cov_frac_pos"] = jnp.sum(valid & (cov > 0), dtype=jnp.float32) / n_f
  return cov, stats
