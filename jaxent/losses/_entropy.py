"""Entropy-driven token masks and coefficients.

* ``top_entropy_mask`` — the high-entropy minority ("80/20", Wang et al.,
  2025; TRL ``top_entropy_quantile``): train only on the valid tokens whose
  entropy is at least the ``1 − ρ`` quantile (linear interpolation) of the
  valid entropies. jaxent takes the quantile over the whole mini-batch on the
  whole mesh, exactly (``ops.quantile_mask``); TRL takes it per micro-batch.
* ``adaptive_entropy`` — Skywork-OR1's adaptive entropy coefficient as an
  optax-style ``(init, update)`` pair over explicit state.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxent import ops
from jaxent.ops import as_valid, check_float, check_ndim, check_scalar, check_shapes


def top_entropy_mask(entropy: jax.Array, mask: jax.Array, *, quantile) -> jax.Array:
  """Valid tokens whose entropy is at least the ``1 − quantile`` quantile.

  ``q = quantile(H over valid tokens, 1 − ρ)`` with linear interpolation
  (NumPy's default, reproduced exactly, float64 index included);
  ``keep = M ∧ (H ≥ q)``. ``ρ = 1`` keeps every valid token; nothing is kept
  when no token is valid. Multiply the per-token policy loss by the mask (for
  instance as ``weights=``); the dropped tokens stay in every denominator.

  Under a sharded ``jit`` the quantile is over the whole batch on the whole
  mesh: a bisection on the float32 bit pattern whose steps are scalar
  all-reduces, so the mask is identical on any mesh and the token array is
  never gathered.

  Args:
    entropy: float ``[B, T]`` per-token entropy (compared as float32); masked
      positions may hold anything.
    mask: ``[B, T]``, nonzero for a valid token.
    quantile: ρ in ``(0, 1]``, the fraction of valid tokens to keep (paper:
      0.2), a Python number.

  Returns:
    bool ``[B, T]``.
  """
  check_ndim("entropy", entropy, 2, "a [batch, time] array")
  check_float("entropy", entropy)
  check_shapes("entropy", entropy, mask=mask)
  rho = ops.concrete_scalar(quantile)
  if rho is None:
    raise ValueError("quantile must be a Python number in (0, 1] (it fixes the exact index "
                     f"arithmetic at trace time), got {type(quantile).__name__}")
  check_scalar("quantile", rho, low=0, high=1, low_open=True)
  return ops.quantile_mask(entropy, as_valid(mask), 1.0 - rho)


class AdaptiveEntropyState(NamedTuple):
  """State of ``adaptive_entropy``: float32 scalars, checkpointed with the train state.

  Attributes:
    coef: the coefficient ``c``.
    last_entropy: ``H_prev``, the token-weighted entropy of the last optimizer
      step (``+inf`` before the first).
    applied: the bonus coefficient of the coming step, ``c`` if
      ``H_prev ≤ target`` else 0 (0 before the first step).
  """
  coef: jax.Array
  last_entropy: jax.Array
  applied: jax.Array


class AdaptiveEntropy(NamedTuple):
  """An optax-style pair: ``init(params=None) -> state``,
  ``update(entropy, state) -> (applied, new_state)``."""
  init: Callable[..., AdaptiveEntropyState]
  update: Callable[[jax.Array, AdaptiveEntropyState], tuple[jax.Array, AdaptiveEntropyState]]


def adaptive_entropy(coef, *, target=0.2, delta=0.005, min_coef=0.0,
                     max_coef=1.0) -> AdaptiveEntropy:
  """Skywork-OR1's adaptive entropy coefficient (TRL ``use_adaptive_entropy``).

  Each step adds the bonus ``−a·Σ H·M / max(1, Σ M)`` to every micro-batch
  loss, with ``a = state.applied`` (``c`` if ``H_prev ≤ target`` else 0).
  Once per optimizer step, ``update(H_w, state)`` with ``H_w`` the
  token-weighted mean entropy of the whole step sets
  ``c ← min(c + δ, c_max)`` if ``H_w ≤ target`` else ``max(c − δ, c_min)``,
  ``H_prev ← H_w``. So the coefficient set at step k acts from step k+1, and
  the first step applies none. Pure float32 arithmetic on explicit state: a
  run resumed from a checkpointed state continues bitwise.

  Args:
    coef: the starting coefficient ``c`` ≥ 0 (TRL ``entropy_coef``).
    target: the entropy target (TRL ``entropy_target``, 0.2).
    delta: the step δ ≥ 0 (TRL ``entropy_coef_delta``, 0.005).
    min_coef, max_coef: the bounds, ``0 ≤ min_coef ≤ max_coef``.

  Returns:
    ``AdaptiveEntropy(init, update)``: ``init(params=None)`` gives the
    initial state (``params`` is ignored, as optax's signature has it);
    ``update(entropy, state)`` returns ``(applied, new_state)``, ``applied``
    being the coefficient the next step uses (``new_state.applied``).
  """
  for name, v in (("coef", coef), ("target", target), ("delta", delta), ("min_coef", min_coef),
                  ("max_coef", max_coef)):
    check_scalar(name, v, low=0)
  lo, hi = ops.concrete_scalar(min_coef), ops.concrete_scalar(max_coef)
  if lo is not None and hi is not None and lo > hi:
    raise ValueError(f"min_coef must not exceed max_coef, got min_coef={lo:g}, max_coef={hi:g}")
  f32 = jnp.float32

  def init(params=None) -> AdaptiveEntropyState:
    del params
    return AdaptiveEntropyState(coef=jnp.asarray(coef, f32), last_entropy=jnp.asarray(jnp.inf, f32),
                                applied=jnp.zeros((), f32))

  def update(entropy, state: AdaptiveEntropyState):
    check_scalar("entropy", entropy)
    h = jnp.asarray(entropy, f32)
    low = h <= jnp.asarray(target, f32)
    c = jnp.where(low, jnp.minimum(state.coef + jnp.asarray(delta, f32), jnp.asarray(max_coef, f32)),
                  jnp.maximum(state.coef - jnp.asarray(delta, f32), jnp.asarray(min_coef, f32)))
    applied = jnp.where(low, c, f32(0))
    return applied, AdaptiveEntropyState(coef=c, last_entropy=h, applied=applied)

  return AdaptiveEntropy(init, update)
