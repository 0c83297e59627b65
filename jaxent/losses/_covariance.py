"""Per-token covariance and the Clip-Cov / KL-Cov token selections.

Cui et al. (2025), Eq. for the per-token centred product over the valid
tokens of the batch being selected from::

    Cov_i = (A_i − mean(A)) · (log π_i − mean(log π))

(not divided by N). Large positive ``Cov_i`` marks tokens whose update lowers
entropy most (a likely token reinforced, or an unlikely one penalised).

The number chosen is ``k = max(1, floor(ratio · N))``, a traced scalar; the
selection is ``ops.top_k_mask`` of static size ``k_max``, so it runs unchanged
under ``jit`` and, through ``top_k_mask``, over a device mesh (two-stage
top-k). The means are plain ``jnp`` sums over the arrays passed in, so under a
sharded ``jit`` they are global means over the whole (mini-)batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxent import ops
from jaxent.ops import (as_valid, check_float, check_ndim, check_scalar, check_shapes,
                        concrete_scalar, upcast)

# Reference (verl) clamp on the log-ratio before exp: e^20 ≈ 5e8 keeps the
# ratio and its gradient finite in float32.
LOG_RATIO_CLAMP = 20.0


def check_tokens(log_prob, mask, **others) -> None:
  """Shape/dtype checks shared by the losses: every array is ``[B, T]``."""
  check_ndim("log_prob", log_prob, 2, "a [batch, time] array")
  check_float("log_prob", log_prob)
  check_shapes("log_prob", log_prob, mask=mask, **others)
  for name, x in others.items():
    if x is not None and name != "selection":
      check_float(name, x)


def check_ratio(ratio) -> None:
  check_scalar("ratio", ratio, low=0, high=1, low_open=True)


def resolve_k_max(ratio, k_max, size: int) -> int:
  """The static top-k size: ``k_max`` or the bound implied by a concrete ratio."""
  if k_max is not None:
    if not isinstance(k_max, int) or isinstance(k_max, bool) or k_max < 1:
      raise ValueError(f"k_max must be a positive Python int (static), got {k_max!r}")
    return min(k_max, size)
  r = concrete_scalar(ratio)
  if r is None:
    raise ValueError(
        "ratio is traced (or a jax.Array), so the top-k size cannot be derived from it; pass "
        "k_max=ops.static_count_bound(max_ratio, batch*time) as a static int bounding "
        "max(1, floor(ratio * n_valid))")
  return ops.static_count_bound(r, size)


def clamped_log_ratio(log_prob: jax.Array, old_log_prob: jax.Array) -> jax.Array:
  """``d = clip(log π − log π_old, −20, 20)``."""
  return jnp.clip(log_prob - old_log_prob, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def token_covariance(log_prob: jax.Array, advantages: jax.Array, mask: jax.Array) -> jax.Array:
  """Per-token centred product ``(A_i − mean A)(log π_i − mean log π)``.

  Means run over the valid tokens of the arrays passed in. ``log π`` is a
  constant here (``stop_gradient``): the covariance only selects tokens.

  Args:
    log_prob: ``[B, T]`` current-policy log-probs of the sampled tokens.
    advantages: ``[B, T]``.
    mask: ``[B, T]``, nonzero for a valid token.

  Returns:
    float ``[B, T]``, 0 at masked positions.
  """
  check_tokens(log_prob, mask, advantages=advantages)
  return _covariance_and_count(log_prob, advantages, as_valid(mask))[0]


def _covariance_and_count(log_prob, advantages, valid):
  """``token_covariance`` and the number of valid tokens (int32 scalar).

  ``log π`` and ``A`` are constants here (the covariance only selects). The
  count is the same ``ops.count_valid(valid)`` the losses' aggregation uses,
  so under one ``jit`` it is computed once.
  """
  return ops.centered_products(lax.stop_gradient(log_prob), lax.stop_gradient(advantages), valid)


def ppo_clipped(log_prob, old_log_prob, advantages, clip_low, clip_high):
  """Per-token ``d``, ``L1 = −A·r`` and ``L2 = −A·clip(r, 1−ε_low, 1+ε_high)``."""
  d = clamped_log_ratio(log_prob, old_log_prob)
  r = jnp.exp(d)
  l1 = -advantages * r
  l2 = -advantages * jnp.clip(r, 1 - clip_low, 1 + clip_high)
  return d, l1, l2


def check_clip(clip_low, clip_high) -> None:
  # ε_low = 1 clips the ratio below at 0, which the paper's Clip-Cov runs use.
  check_scalar("clip_low", clip_low, low=0, high=1)
  check_scalar("clip_high", clip_high, low=0)


def select_kl_cov(log_prob: jax.Array, advantages: jax.Array, mask: jax.Array, *, ratio,
                  k_max: int | None = None) -> jax.Array:
  """KL-Cov selection: the ``max(1, floor(ratio·N))`` valid tokens of largest Cov.

  Deterministic; ties go to the lower row-major position.

  Args:
    log_prob: ``[B, T]`` current-policy log-probs (treated as constants).
    advantages: ``[B, T]``.
    mask: ``[B, T]``.
    ratio: fraction in (0, 1]; a Python float or a traced scalar.
    k_max: static bound on the count (the top-k size). Default:
      ``ops.static_count_bound(ratio, B·T)``, which needs a Python ``ratio``;
      with a traced ``ratio`` it is required. A count above ``k_max`` is
      truncated to ``k_max``.

  Returns:
    bool ``[B, T]``.
  """
  return select_kl_cov_and_cov(log_prob, advantages, mask, ratio=ratio, k_max=k_max)[0]


def select_kl_cov_and_cov(log_prob, advantages, mask, *, ratio, k_max=None):
  """``select_kl_cov`` and the covariance it ranked (for the loss's metrics)."""
  check_tokens(log_prob, mask, advantages=advantages)
  check_ratio(ratio)
  k_max = resolve_k_max(ratio, k_max, log_prob.size)
  valid = as_valid(mask)
  cov, n_valid = _covariance_and_count(log_prob, advantages, valid)
  count = ops.selection_count(ratio, n_valid, max_n=valid.size)
  return ops.top_k_mask(cov, valid, count, k_max=k_max), cov


def clip_cov_candidates(log_prob, old_log_prob, advantages, mask, *, cov_lb, cov_ub, clip_low,
                        clip_high) -> tuple[jax.Array, jax.Array]:
  """Clip-Cov candidates and the per-token covariance.

  Candidates are valid tokens not already clipped by PPO (``L2 > L1``) with
  ``cov_lb < Cov < cov_ub``.
  """
  return _candidates_cov_count(log_prob, old_log_prob, advantages, as_valid(mask), cov_lb=cov_lb,
                               cov_ub=cov_ub, clip_low=clip_low, clip_high=clip_high)[:2]


def _candidates_cov_count(log_prob, old_log_prob, advantages, valid, *, cov_lb, cov_ub, clip_low,
                          clip_high):
  """``clip_cov_candidates`` and the number of valid tokens (int32)."""
  a = jnp.where(valid, upcast(advantages), 0)
  lp = jnp.where(valid, upcast(log_prob), 0)
  old = jnp.where(valid, upcast(old_log_prob), 0)
  _, l1, l2 = ppo_clipped(lax.stop_gradient(lp), old, a, clip_low, clip_high)
  cov, n_valid = _covariance_and_count(log_prob, advantages, valid)
  cand = valid & ~(l2 > l1) & (cov > cov_lb) & (cov < cov_ub)
  return cand, cov, n_valid


def check_cov_band(cov_lb, cov_ub) -> None:
  check_scalar("cov_lb", cov_lb)
  check_scalar("cov_ub", cov_ub)
  lb, ub = concrete_scalar(cov_lb), concrete_scalar(cov_ub)
  if lb is not None and ub is not None and not lb < ub:
    raise ValueError(f"cov_lb must be below cov_ub (the band (cov_lb, cov_ub) is empty), got "
                     f"cov_lb={lb:g}, cov_ub={ub:g}")


def select_clip_cov(log_prob: jax.Array, old_log_prob: jax.Array, advantages: jax.Array,
                    mask: jax.Array, *, key: jax.Array, ratio, cov_lb, cov_ub, clip_low, clip_high,
                    k_max: int | None = None) -> jax.Array:
  """Clip-Cov selection: a uniform random subset of the candidates.

  Candidates: valid, not PPO-clipped (``L2 > L1`` with the clamped ratio),
  ``cov_lb < Cov < cov_ub``. Chosen: ``min(max(1, floor(ratio·N)), #candidates)``
  of them (``N`` = number of valid tokens), uniformly without replacement.
  Each token gets a pseudo-random 30-bit value, a hash of ``key`` and its
  row-major index (``token_uniforms``), and the candidates with the largest
  values win: every subset of the right size is equally likely, the same key
  gives the same choice, on one device or any mesh.

  Args:
    log_prob, old_log_prob, advantages, mask: ``[B, T]``.
    key: a JAX PRNG key.
    ratio: fraction in (0, 1]; Python float or traced scalar.
    cov_lb, cov_ub: the covariance band (open interval).
    clip_low, clip_high: PPO clip range ``ε_low``, ``ε_high``.
    k_max: static bound on the count; see ``select_kl_cov``.

  Returns:
    bool ``[B, T]``.
  """
  return select_clip_cov_and_cov(log_prob, old_log_prob, advantages, mask, key=key, ratio=ratio,
                                 cov_lb=cov_lb, cov_ub=cov_ub, clip_low=clip_low,
                                 clip_high=clip_high, k_max=k_max)[0]


def select_clip_cov_and_cov(log_prob, old_log_prob, advantages, mask, *, key, ratio, cov_lb,
                            cov_ub, clip_low, clip_high, k_max=None):
  """``select_clip_cov`` and the covariance of its band (for the loss's metrics)."""
  check_tokens(log_prob, mask, old_log_prob=old_log_prob, advantages=advantages)
  check_ratio(ratio)
  check_cov_band(cov_lb, cov_ub)
  check_clip(clip_low, clip_high)
  if key is None:
    raise ValueError("key must be a JAX PRNG key (Clip-Cov chooses tokens at random)")
  k_max = resolve_k_max(ratio, k_max, log_prob.size)
  valid = as_valid(mask)
  cand, cov, n_valid = _candidates_cov_count(log_prob, old_log_prob, advantages, valid,
                                             cov_lb=cov_lb, cov_ub=cov_ub, clip_low=clip_low,
                                             clip_high=clip_high)
  count = ops.selection_count(ratio, n_valid, max_n=valid.size)
  u = token_uniforms(key, log_prob.shape)
  return ops.top_k_mask(u, cand, count, k_max=k_max), cov


def _fmix32(x: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def token_uniforms(key: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """One pseudo-random float32 per token of a ``[B, T]`` batch, for ranking.

  ``h_i = fmix32(fmix32(i·φ + s_0) ⊕ s_1)`` with ``i`` the global row-major
  index, ``φ = 0x9E3779B9`` and two 32-bit seeds ``s_0, s_1`` drawn from
  ``key`` (threefry, two words). Per token that is a dozen integer ops, about
  a tenth of threefry-drawing a uniform per token (the cost that dominated
  Clip-Cov), and a pure function of ``(key, i)``: the same on one device or
  any mesh, however the batch is sharded. For fixed seeds ``h`` is a
  bijection of ``i`` (every step is), so distinct tokens get distinct 32-bit
  hashes. The top 30 bits are mapped, order-preserving, to the finite floats
  ``[1, 2^128)`` (bit patterns ``0x3F800000 + (h >> 2)``), which ``top_k``
  ranks like the integers; two tokens tie with probability 2^-30 (then the
  lower index wins), 2^7 times less often than two float32 ``U(0, 1)`` draws
  (23 random bits).

  Returns:
    float32 ``shape``: only the order of the values is meaningful.
  """
  seeds = jax.random.bits(key, (2,), jnp.uint32)
  rows = lax.broadcasted_iota(jnp.uint32, shape, 0)
  cols = lax.broadcasted_iota(jnp.uint32, shape, 1)
  i = rows * jnp.uint32(shape[1]) + cols                     # wraps mod 2^32 past 4G tokens
  h = _fmix32(_fmix32(i * jnp.uint32(0x9E3779B9) + seeds[0]) ^ seeds[1])
  return lax.bitcast_convert_type((h >> 2) + jnp.uint32(0x3F800000), jnp.float32)
