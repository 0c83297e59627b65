"""Optional regularizers: a KL penalty to a reference policy, an entropy bonus.

The paper's recipe uses neither (no KL loss, no entropy bonus); they are here
for the baselines that do.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxent import ops
from jaxent.losses import _covariance as cv
from jaxent.ops import as_valid, check_float, check_ndim, check_shapes, upcast
from jaxent.ops import check_agg

KL_KINDS = ("k1", "k2", "k3")


def kl_penalty(log_prob: jax.Array, ref_log_prob: jax.Array, mask: jax.Array, *,
               kind: str = "k3", agg: str = "token-mean", num_tokens=None, num_seqs=None,
               max_len=None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-token estimate of ``KL(π ‖ π_ref)`` from sampled tokens, aggregated.

  With ``δ = log π − log π_ref`` (Schulman's estimators, as in verl):

  * ``"k1"``: ``δ`` (verl ``kl``; unbiased, high variance, can be negative).
  * ``"k2"``: ``δ²/2`` (verl ``mse``).
  * ``"k3"``: ``exp(−δ') + δ' − 1`` with ``δ' = clip(δ, −20, 20)``, result
    clipped to [−10, 10] (verl ``low_var_kl``; non-negative, low variance).
    Written as verl does, with ``x = log π_ref − log π``: ``e^x − x − 1``.

  Args:
    log_prob: ``[B, T]`` log π (differentiated).
    ref_log_prob: ``[B, T]`` log π_ref (constant).
    mask: ``[B, T]``.
    kind: ``"k1"``, ``"k2"`` or ``"k3"``.
    agg, num_tokens, num_seqs, max_len: see ``ops.aggregate``.

  Returns:
    ``(loss, {"kl": loss})``; multiply by the KL coefficient yourself.
  """
  if kind not in KL_KINDS:
    raise ValueError(f"kind must be one of {list(KL_KINDS)}, got {kind!r}")
  cv.check_tokens(log_prob, mask, ref_log_prob=ref_log_prob)
  check_agg(agg)
  valid = as_valid(mask)
  lp = jnp.where(valid, upcast(log_prob), 0)
  ref = lax.stop_gradient(jnp.where(valid, upcast(ref_log_prob).astype(lp.dtype), 0))
  if kind == "k1":
    per_token = lp - ref
  elif kind == "k2":
    per_token = 0.5 * jnp.square(lp - ref)
  else:
    x = jnp.clip(ref - lp, -cv.LOG_RATIO_CLAMP, cv.LOG_RATIO_CLAMP)
    per_token = jnp.clip(jnp.exp(x) - x - 1, -10.0, 10.0)
  loss = ops.aggregate(per_token, valid, agg, num_tokens=num_tokens, num_seqs=num_seqs,
                       max_len=max_len)
  return loss, {"kl": loss}


def entropy_bonus(entropy: jax.Array, mask: jax.Array, *, agg: str = "token-mean",
                  num_tokens=None, num_seqs=None,
                  max_len=None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The entropy bonus as a loss: ``−agg(H)``.

  Adding ``coef · loss`` to the policy loss maximises entropy with weight
  ``coef`` (verl: ``pg_loss − entropy_coeff · entropy``).

  Args:
    entropy: ``[B, T]`` per-token entropy (e.g. from
      ``ops.logprobs_and_entropy``; differentiated).
    mask: ``[B, T]``.
    agg, num_tokens, num_seqs, max_len: see ``ops.aggregate``.

  Returns:
    ``(−agg(H), {"entropy": agg(H)})``.
  """
  check_ndim("entropy", entropy, 2, "a [batch, time] array")
  check_float("entropy", entropy)
  check_shapes("entropy", entropy, mask=mask)
  check_agg(agg)
  h = ops.aggregate(entropy, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs,
                    max_len=max_len)
  return -h, {"entropy": h}
