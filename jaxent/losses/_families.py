"""Policy-loss families of the field: GSPO, CISPO and GMPO.

Formulas, aggregation and quirks follow ../shared/REFERENCE.md ("Policy-loss
families of the field"), i.e. verl's ``loss_mode=gspo``, ``cispo`` and
``geo_mean``. With ``lp = log π``, ``old = log π_old``, ``A`` the advantages,
``M`` the mask, ``n_b`` the valid tokens of row ``b`` and ``sg`` stop-gradient:

* GSPO (Zheng et al., 2025): a sequence-level ratio
  ``s_b = exp(Σ_t M·(lp − old) / max(1, n_b))`` that each token carries as
  ``log s_bt = min(lp − sg(lp) + sg(log s_b), 10)`` (value ``s_b``, gradient
  ``s_b`` per token), then PPO's clipped objective and ``agg``.
* CISPO (MiniMax-M1, 2025): REINFORCE with a clipped, detached ratio,
  ``L = −sg(clip(r, 1−ε_low, 1+ε_high))·A·lp``.
* GMPO (Zhao et al., 2025): the geometric mean of the token ratios, clipped
  per token in log space, ``L_b = −Ā_b·exp(Σ_t M·d'_t / n_b)``, averaged
  over all rows.

Every loss takes optional detached importance weights ``weights`` (e.g. from
``rollout_correction``); masked positions are removed with ``jnp.where``
before any arithmetic, so NaN/inf there reach neither value nor gradient.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxent import ops
from jaxent.losses import _covariance as cv
from jaxent.losses._policy import _agg, _prepare, _token_frac, _weigh
from jaxent.ops import check_agg, check_scalar, safe_div, upcast

# GSPO's cap on the per-token log sequence ratio (verl): e^10 ≈ 2.2e4.
GSPO_LOG_RATIO_CAP = 10.0
# GMPO's floor inside the log of the importance weights (verl).
GMPO_WEIGHT_EPS = 1e-10


def _row_mean(x, valid):
  """``Σ_t M·x / n_b`` per row (0 for an empty row); ``x`` already 0 where masked."""
  return safe_div(jnp.sum(x, axis=-1), ops.count_valid(valid, axis=-1))


def gspo(log_prob: jax.Array, old_log_prob: jax.Array, advantages: jax.Array, mask: jax.Array, *,
         clip_low=3e-4, clip_high=4e-4, agg: str = "seq-mean-token-mean", weights=None,
         num_tokens=None, num_seqs=None,
         max_len=None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """GSPO: PPO-clip on the sequence-level (length-normalised) ratio.

  ``log s_b = Σ_t M·(lp − old) / max(1, n_b)`` (no ±20 clamp);
  ``log s_bt = min(lp − sg(lp) + sg(log s_b), 10)``, so every token of row
  ``b`` has the value ``s_b`` and ``∂s_bt/∂lp_t = s_bt`` (0 where the cap
  binds); ``L = max(−A·s_bt, −A·clip(s_bt, 1−ε_low, 1+ε_high))``, times
  ``sg(w)``; then ``agg``.

  Args:
    log_prob, old_log_prob, advantages, mask: ``[B, T]`` as in ``ppo_clip``.
    clip_low, clip_high: ε_low, ε_high (the paper's 3e-4 / 4e-4).
    agg: aggregation mode (the paper's is ``seq-mean-token-mean``).
    weights: optional detached ``[B, T]`` importance weights.
    num_tokens, num_seqs, max_len: global normalizers, see ``ops.aggregate``.
      The sequence ratio is per row, so micro-batches split along rows sum
      to the mini-batch value.

  Returns:
    ``(loss, metrics)``; metrics: ``clipfrac`` (fraction with ``L2 > L1``),
    ``approx_kl`` (``mean_M(old − lp)``, unclamped), ``pg_loss`` (= loss).
  """
  cv.check_tokens(log_prob, mask, old_log_prob=old_log_prob, advantages=advantages,
                  weights=weights)
  check_agg(agg)
  cv.check_clip(clip_low, clip_high)
  valid, lp, old, a = _prepare(log_prob, old_log_prob, advantages, mask)
  diff = lp - old                                   # 0 at masked positions
  log_s = lax.stop_gradient(_row_mean(diff, valid))[:, None]
  log_s_bt = lp - lax.stop_gradient(lp) + log_s
  # clamp(max=10) as torch differentiates it: gradient 1 up to and at the cap.
  log_s_bt = jnp.where(log_s_bt <= GSPO_LOG_RATIO_CAP, log_s_bt, GSPO_LOG_RATIO_CAP)
  s = jnp.exp(log_s_bt)
  l1 = -a * s
  l2 = -a * jnp.clip(s, 1 - clip_low, 1 + clip_high)
  per_token = _weigh(jnp.maximum(l1, l2), weights, valid)
  loss = _agg(per_token, valid, agg, num_tokens, num_seqs, max_len)
  return loss, {
      "clipfrac": _token_frac((l2 > l1).astype(jnp.float32), valid, num_tokens),
      "approx_kl": _token_frac(-diff, valid, num_tokens),
      "pg_loss": loss,
  }


def cispo(log_prob: jax.Array, old_log_prob: jax.Array, advantages: jax.Array, mask: jax.Array, *,
          clip_low=0.2, clip_high=0.2, agg: str = "token-mean", weights=None, num_tokens=None,
          num_seqs=None, max_len=None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """CISPO: REINFORCE with a clipped importance weight that gets no gradient.

  ``d = clip(lp − old, −20, 20)``, ``r = e^d``,
  ``L = −sg(clip(r, 1−ε_low, 1+ε_high))·A·lp``, times ``sg(w)``; then ``agg``.
  Every token keeps a gradient (``−clip(r)·A``), clipped or not.

  Args:
    log_prob, old_log_prob, advantages, mask: ``[B, T]`` as in ``ppo_clip``.
    clip_low, clip_high: ε_low, ε_high of the weight's clip.
    agg: aggregation mode.
    weights: optional detached ``[B, T]`` importance weights.
    num_tokens, num_seqs, max_len: global normalizers, see ``ops.aggregate``.

  Returns:
    ``(loss, metrics)``; metrics: ``clipfrac`` (``mean_M(r ≠ clip(r))``),
    ``approx_kl`` (``mean_M(−d)``), ``pg_loss`` (= loss).
  """
  cv.check_tokens(log_prob, mask, old_log_prob=old_log_prob, advantages=advantages,
                  weights=weights)
  check_agg(agg)
  cv.check_clip(clip_low, clip_high)
  valid, lp, old, a = _prepare(log_prob, old_log_prob, advantages, mask)
  d = cv.clamped_log_ratio(lp, old)
  r = jnp.exp(d)
  clipped_r = jnp.clip(r, 1 - clip_low, 1 + clip_high)
  per_token = _weigh(-lax.stop_gradient(clipped_r) * a * lp, weights, valid)
  loss = _agg(per_token, valid, agg, num_tokens, num_seqs, max_len)
  return loss, {
      "clipfrac": _token_frac((r != clipped_r).astype(jnp.float32), valid, num_tokens),
      "approx_kl": _token_frac(-d, valid, num_tokens),
      "pg_loss": loss,
  }


def gmpo(log_prob: jax.Array, old_log_prob: jax.Array, advantages: jax.Array, mask: jax.Array, *,
         clip_low=0.4, clip_high=0.4, weights=None, num_tokens=None,
         num_rows=None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """GMPO: the geometric mean of token ratios, clipped per token in log space.

  ``d = lp − old`` (no clamp), ``σ = sign(A)``,
  ``d' = σ·min(σ·d, σ·clip(d, −ε_low, ε_high))``,
  ``ratio_b = exp(Σ_t M·d' / n_b)``, ``Ā_b = Σ_t M·A / n_b``,
  ``L_b = −Ā_b·ratio_b``, with weights times
  ``exp(Σ_t M·log(w + 1e-10) / n_b)`` (their geometric mean); the loss is the
  mean of ``L_b`` over all ``B`` rows (an empty row adds 0 and counts). There
  is no ``agg``: GMPO is defined on sequences. The gradient follows torch's
  ``min``/``clamp``: ``∂d'/∂d = 1`` where ``σ·d ≤ σ·clip(d)``, else 0.

  Args:
    log_prob, old_log_prob, advantages, mask: ``[B, T]`` as in ``ppo_clip``.
    clip_low, clip_high: ε_low, ε_high of the log-ratio clip (paper: 0.4).
    weights: optional detached ``[B, T]`` importance weights.
    num_tokens: optional global token count for the metrics.
    num_rows: optional global row count (the divisor of the mean; default
      ``B``): pass the mini-batch's ``B`` to sum micro-batch losses.

  Returns:
    ``(loss, metrics)``; metrics: ``clipfrac`` (fraction of tokens whose
    ``d`` is clipped and ``A > 0``), ``clipfrac_lower`` (the same with
    ``A < 0``), ``approx_kl`` (``mean_M(−d)``), ``pg_loss`` (= loss).
  """
  cv.check_tokens(log_prob, mask, old_log_prob=old_log_prob, advantages=advantages,
                  weights=weights)
  cv.check_clip(clip_low, clip_high)
  check_scalar("num_rows", 1 if num_rows is None else num_rows, low=0, low_open=True)
  valid, lp, old, a = _prepare(log_prob, old_log_prob, advantages, mask)
  d = lp - old                                       # 0 at masked positions
  c = lax.stop_gradient(jnp.clip(d, -clip_low, clip_high))
  sgn = jnp.sign(a)
  d_min = jnp.where(sgn == 0, 0, jnp.where(sgn * d <= sgn * c, d, c))
  row_loss = -_row_mean(a, valid) * jnp.exp(_row_mean(d_min, valid))
  if weights is not None:
    w = jnp.where(valid, upcast(weights).astype(lp.dtype), 1)
    log_w = jnp.where(valid, jnp.log(w + GMPO_WEIGHT_EPS), 0)
    row_loss = row_loss * lax.stop_gradient(jnp.exp(_row_mean(log_w, valid)))
  rows = log_prob.shape[0] if num_rows is None else num_rows
  loss = jnp.sum(row_loss) / jnp.asarray(rows, row_loss.dtype)
  clipped = d != c
  return loss, {
      "clipfrac": _token_frac((clipped & (a > 0)).astype(jnp.float32), valid, num_tokens),
      "clipfrac_lower": _token_frac((clipped & (a < 0)).astype(jnp.float32), valid, num_tokens),
      "approx_kl": _token_frac(-d, valid, num_tokens),
      "pg_loss": loss,
  }
