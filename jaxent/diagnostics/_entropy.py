"""First-order entropy change of a softmax policy (Cui et al. 2025, §3).

For a softmax policy ``π = softmax(z)`` with entropy ``H(z)``, a small logit
change ``Δz`` changes the entropy by

    H(z + Δz) − H(z) = −Cov_{a∼π}( log π(a), Δz(a) ) + O(|Δz|²).

Vanilla policy gradient on the logits moves ``Δz(a) = η·π(a)·A(a)``, so
``ΔH ≈ −η·Cov(log π, π·A)``; natural policy gradient moves ``Δz(a) = η·A(a)``,
so ``ΔH ≈ −η·Cov(log π, A)``: an action that is both likely and advantageous
(or unlikely and disadvantageous) drives the entropy down.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def entropy_change_first_order(logits: jax.Array, new_logits: jax.Array) -> jax.Array:
  """``−Cov_{a∼π}(log π(a), Δz(a))`` along the last axis, in float32.

  The first-order prediction of ``H(new_logits) − H(logits)`` with
  ``π = softmax(logits)`` and ``Δz = new_logits − logits``. The covariance is
  taken under ``π`` (not over a sample), so adding a constant to ``Δz`` along
  the last axis, which leaves the policy unchanged, leaves the result at 0.
  Actions with ``π(a) = 0`` (logit ``−inf``, e.g. a masked vocabulary entry)
  contribute nothing, even where ``Δz`` is undefined there (``−inf − −inf``).

  Args:
    logits: ``[..., V]`` logits ``z`` of the policy before the update.
    new_logits: ``[..., V]`` logits after the update, same shape.

  Returns:
    float32 ``[...]``: the predicted entropy change, in nats.
  """
  z = jnp.asarray(logits)
  z_new = jnp.asarray(new_logits)
  if z.shape != z_new.shape:
    raise ValueError(
        f"new_logits must have the shape of logits, got {z_new.shape} vs {z.shape}")
  if z.ndim == 0:
    raise ValueError("logits must have at least one (action) axis, got a scalar")
  # Upcast before log_softmax: bf16 logits lose the small differences that the
  # covariance is made of.
  z = z.astype(jnp.float32)
  z_new = z_new.astype(jnp.float32)
  log_p = jax.nn.log_softmax(z, axis=-1)
  p = jnp.exp(log_p)
  live = p > 0
  # π·log π and π·Δz are 0·inf = NaN where π = 0; such actions carry no mass.
  log_p = jnp.where(live, log_p, 0.0)
  dz = jnp.where(live, z_new - z, 0.0)
  mean_log_p = jnp.sum(p * log_p, axis=-1, keepdims=True)
  mean_dz = jnp.sum(p * dz, axis=-1, keepdims=True)
  cov = jnp.sum(p * (log_p - mean_log_p) * (dz - mean_dz), axis=-1)
  return -cov
