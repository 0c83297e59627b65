"""Exact masked quantile masks by bisection on the float32 bit pattern.

``quantile_mask(x, valid, level)`` keeps the valid entries with
``x ≥ q``, ``q`` = NumPy's default (``"linear"``) quantile of the valid
values at ``level``. The two order statistics that ``q`` interpolates are
found without sorting and without moving the token array: float32 values map
to uint32 keys in the same order, and a bisection over the 2^32 keys needs
one count ``#{valid : key ≤ mid}`` per step, 32 steps. Under a sharded
``jit`` each count is a local sum and an all-reduce of one scalar, so the
result on any mesh is the single-device one, and the traffic is 32 scalars,
never the token array.

NumPy computes the index ``h = (n − 1)·level`` in float64 and interpolates
``q = a + (b − a)·(h − ⌊h⌋)`` between the order statistics ``a ≤ b`` at
``⌊h⌋`` and ``⌊h⌋ + 1``. Since every value is one of the float32 entries,
``x ≥ q`` is ``x ≥ a`` when ``q`` equals ``a`` and ``x ≥ b`` otherwise. The
index is reproduced exactly (``_float64_index``: the float64 rounding of
``(n − 1)·level`` done in integer arithmetic, ``level`` being a Python float),
so the mask equals ``x >= np.quantile(x[valid].astype(np.float64), level)``;
whether ``a + (b − a)·t`` rounds back onto ``a`` for a tiny nonzero ``t``
(below 2^-20, which only float64 rounding artefacts produce for the usual
levels) is decided in float32 against half a float64 ulp of ``a``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxent.ops._checks import as_valid, check_shapes
from jaxent.ops._masked import count_valid

_U32 = jnp.uint32
_SIGN = 0x80000000
_MAX_KEY = 0xFFFFFFFF        # invalid entries: above every float32 key
# A fraction t ≥ 2^-20 of the index always moves q off a (below: _tiny_moves).
_T_BIG_BITS = 20


def sort_keys(x: jax.Array) -> jax.Array:
  """uint32 keys in the order of the float32 values (``-0.0`` = ``+0.0``, NaN above +inf)."""
  x = x.astype(jnp.float32)
  x = jnp.where(x == 0, jnp.float32(0), x)
  x = jnp.where(jnp.isnan(x), jnp.float32(jnp.nan), x)   # one positive NaN
  b = lax.bitcast_convert_type(x, _U32)
  return jnp.where(b >> 31 == 1, ~b, b | _U32(_SIGN))


def from_keys(k: jax.Array) -> jax.Array:
  """Inverse of ``sort_keys``."""
  b = jnp.where(k >> 31 == 1, k & _U32(0x7FFFFFFF), ~k)
  return lax.bitcast_convert_type(b, jnp.float32)


def _bits(limbs, start: int, width: int) -> jax.Array:
  """Bits ``[start, start + width)`` (static; may lie below 0) of ``Σ limbs[j]·2^(16j)``."""
  out = _U32(0)
  for j, limb in enumerate(limbs):
    lo, hi = max(start, 16 * j), min(start + width, 16 * j + 16)
    if lo >= hi:
      continue
    part = (limb >> (lo - 16 * j)) & _U32((1 << (hi - lo)) - 1)
    out = out | (part << (lo - start))
  return out


def _any_bits_below(limbs, stop: int) -> jax.Array:
  out = jnp.zeros((), bool)
  for j, limb in enumerate(limbs):
    n = min(stop - 16 * j, 16)
    if n <= 0:
      break
    out = out | ((limb & _U32((1 << n) - 1)) != 0)
  return out


def _less64(ah, al, bh, bl):
  return (ah < bh) | ((ah == bh) & (al < bl))


def _float64_index(m: jax.Array, level: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """NumPy's ``h = fl64(m·level)``: ``(⌊h⌋, h is an integer, h − ⌊h⌋ as float32)``.

  ``level = M / 2^s`` exactly (a Python float), ``m < 2^31`` traced. The
  product ``P = m·M`` (< 2^84) is formed exactly in 16-bit limbs held in
  uint32; ``⌊P / 2^s⌋`` and 64 bits of the fraction ``F`` (plus a sticky bit)
  are read off at static bit positions. Rounding ``P / 2^s`` to float64 only
  matters where it reaches an integer: for ``h ∈ [2^e, 2^(e+1))`` it rounds
  down to ``⌊h⌋`` iff ``F ≤ 2^(e−53)`` and up to ``⌊h⌋ + 1`` iff
  ``1 − F ≤ 2^(e−53)`` (ties go to the even integer).
  """
  num, den = float(level).as_integer_ratio()
  s = den.bit_length() - 1
  m = jnp.asarray(m, jnp.int32).astype(_U32)
  m_limbs = (m & _U32(0xFFFF), m >> 16)
  big_limbs = [(num >> (16 * i)) & 0xFFFF for i in range(4)]
  acc = [_U32(0)] * 8
  for i, mi in enumerate(m_limbs):
    for j, bj in enumerate(big_limbs):
      if bj:
        t = mi * _U32(bj)                               # < 2^32
        acc[i + j] = acc[i + j] + (t & _U32(0xFFFF))
        acc[i + j + 1] = acc[i + j + 1] + (t >> 16)
  for j in range(7):
    acc[j + 1] = acc[j + 1] + (acc[j] >> 16)
    acc[j] = acc[j] & _U32(0xFFFF)
  whole = _bits(acc, s, 31).astype(jnp.int32)
  fh, fl = _bits(acc, s - 32, 32), _bits(acc, s - 64, 32)
  sticky = _any_bits_below(acc, s - 64)
  # e = ⌊log2 h⌋ for h ≥ 1, and -1 below (only the round-up test matters there).
  e = jnp.where(whole >= 1, 31 - lax.clz(whole), -1)
  ex = (e + 11).astype(_U32)                              # 2^(e−53) in units of 2^-64
  th = jnp.where(ex >= 32, _U32(1) << (ex - 32), _U32(0))
  tl = jnp.where(ex >= 32, _U32(0), _U32(1) << jnp.minimum(ex, 31))
  down_pos = _less64(fh, fl, th, tl) | ((fh == th) & (fl == tl) & ~sticky)
  zero = (fh == 0) & (fl == 0) & ~sticky
  down = jnp.where(whole >= 1, down_pos, zero)
  # 2^64 − 2^(e−53)·2^64, as (hi, lo).
  uh = jnp.where(ex >= 32, ~th + _U32(1), _U32(0xFFFFFFFF))
  ul = jnp.where(ex >= 32, _U32(0), ~tl + _U32(1))
  up = ~_less64(fh, fl, uh, ul)
  is_int = down | up
  frac = fh.astype(jnp.float32) * 2.0**-32 + fl.astype(jnp.float32) * 2.0**-64
  return whole + up.astype(jnp.int32), is_int, jnp.where(is_int, 0, frac)


def _tiny_moves(a: jax.Array, b: jax.Array, t: jax.Array) -> jax.Array:
  """Whether float64 ``a + (b − a)·t`` exceeds ``a`` (``b > a``, ``0 < t < 2^-20``).

  It does iff ``(b − a)·t`` exceeds half a float64 ulp of ``a`` (a tie
  rounds to ``a``: a float32 has an even float64 significand); decided in
  float32.
  """
  delta = (b - a) * t
  mant, ex = jnp.frexp(jnp.abs(a))
  e = ex - 1
  # Below a negative power of two the spacing toward zero halves.
  e = jnp.where((a < 0) & (mant == 0.5), e - 1, e)
  half_ulp = jnp.ldexp(jnp.float32(1), e - 53)
  return jnp.where(a == 0, delta > 0, delta > half_ulp)


def quantile_mask(x: jax.Array, valid: jax.Array, level: float) -> jax.Array:
  """Valid entries with ``x ≥ np.quantile(x[valid], level)`` (linear interpolation).

  Exact (see the module docstring) and mesh-independent: under a sharded
  ``jit`` the 32 bisection counts and one minimum are global reductions of
  scalars, and the output keeps the input's sharding. Nothing is kept when no
  entry is valid.

  Args:
    x: float ``[...]`` values (compared as float32); invalid entries are
      ignored, whatever they hold. A NaN at a valid entry ranks above +inf.
    valid: bool, the shape of ``x``.
    level: the quantile level in ``[0, 1]``, a Python float (it shapes the
      exact index arithmetic).

  Returns:
    bool, the shape of ``x``.
  """
  check_shapes("x", x, valid=valid)
  level = float(level)
  if not 0.0 <= level <= 1.0:
    raise ValueError(f"level must lie in [0, 1], got {level:g}")
  valid = as_valid(valid)
  if level == 0.0:
    return valid
  keys = jnp.where(valid, sort_keys(x), _U32(_MAX_KEY))
  n = count_valid(valid)
  rank, is_int, t = _float64_index(jnp.maximum(n - 1, 0), level)

  # Smallest key v with #{key ≤ v} ≥ rank + 1: the rank-th order statistic.
  def step(_, carry):
    lo, hi, c_hi = carry
    mid = lo + (hi - lo) // 2
    c = count_valid(keys <= mid)
    ge = c >= rank + 1
    return jnp.where(ge, lo, mid + 1), jnp.where(ge, mid, hi), jnp.where(ge, c, c_hi)

  key_a, _, c_a = lax.fori_loop(0, 32, step, (_U32(0), _U32(_MAX_KEY - 1), n))
  # The next order statistic: the same key when it repeats, else the next key.
  next_key = jnp.min(jnp.where(keys > key_a, keys, _U32(_MAX_KEY)))
  key_b = jnp.where(c_a >= rank + 2, key_a, next_key)
  a, b = from_keys(key_a), from_keys(key_b)
  moves = (key_b > key_a) & ~is_int & ((t >= 2.0**-_T_BIG_BITS) | _tiny_moves(a, b, t))
  threshold = jnp.where(moves, key_b, key_a)
  return valid & (keys >= threshold)
