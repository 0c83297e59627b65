"""Policy losses: PPO-clip (GRPO), Clip-Cov and KL-Cov (Cui et al., 2025).

All take ``[B, T]`` arrays of response tokens and return ``(loss, metrics)``.
With ``d = clip(log π − log π_old, −20, 20)``, ``r = exp(d)``, ``A`` the
advantages and ``M`` the mask:

* PPO-clip: ``L = max(−A·r, −A·clip(r, 1−ε_low, 1+ε_high))``, with the
  optional dual clip ``L = min(L, −A·c)`` where ``A < 0``.
* Clip-Cov: the PPO-clip loss (no dual clip), times 0 on a random subset of
  the high-covariance tokens.
* KL-Cov: ``L = −A·r + β·|log π − log π_old|·[selected]``, no clipping.

Masked positions are removed with ``jnp.where`` before any arithmetic, so
NaN/inf there never reach the loss or the gradient. Each loss takes optional
``weights``: detached per-token importance weights (e.g. from
``rollout_correction``) multiplying the per-token loss; ``None`` leaves the
program as it is without them.

Micro-batch accumulation: select over the whole mini-batch first
(``select_clip_cov`` / ``select_kl_cov``), then call the loss on each
micro-batch with ``selection=`` its rows of that mask and the mini-batch's
``num_tokens`` / ``num_seqs`` (and a fixed ``max_len``); the micro-batch losses,
their gradients and the token-fraction metrics then sum to the mini-batch
values exactly.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxent import ops
from jaxent.losses import _covariance as cv
from jaxent.ops import as_valid, check_scalar, upcast
from jaxent.ops import check_agg, safe_div


def _prepare(log_prob, old_log_prob, advantages, mask):
  """Valid mask and the inputs with masked positions replaced by 0."""
  valid = as_valid(mask)
  lp = upcast(log_prob)
  dtype = lp.dtype
  lp = jnp.where(valid, lp, 0)
  old = jnp.where(valid, upcast(old_log_prob).astype(dtype), 0)
  # Advantages and old log-probs are data: no gradient flows into them.
  old = lax.stop_gradient(old)
  a = lax.stop_gradient(jnp.where(valid, upcast(advantages).astype(dtype), 0))
  return valid, lp, old, a


def _weigh(per_token, weights, valid):
  """``per_token · sg(w)`` (``w`` = 0 at masked positions); ``per_token`` when no weights.

  The weights are importance weights computed from data (e.g.
  ``rollout_correction``): they scale each token's loss and its gradient,
  and get no gradient themselves.
  """
  if weights is None:
    return per_token
  w = jnp.where(valid, upcast(weights).astype(per_token.dtype), 0)
  return per_token * lax.stop_gradient(w)


def _token_frac(x, valid, num_tokens):
  """``Σ x·M / N`` with ``N = num_tokens`` (or the local valid count)."""
  n = ops.count_valid(valid) if num_tokens is None else num_tokens
  return safe_div(jnp.sum(jnp.where(valid, x, 0).astype(jnp.float32)), n)


def _common_metrics(d, l1, l2, valid, num_tokens):
  return {
      "clipfrac": _token_frac((l2 > l1).astype(jnp.float32), valid, num_tokens),
      "approx_kl": _token_frac(-d, valid, num_tokens),
  }


def _agg(per_token, valid, agg, num_tokens, num_seqs, max_len):
  return ops.aggregate(per_token, valid, agg, num_tokens=num_tokens, num_seqs=num_seqs,
                       max_len=max_len)


def _selection_metrics(sel, valid, cov, num_tokens):
  sel = sel & valid
  n_sel = jnp.sum(sel)
  return {
      "selected_frac": _token_frac(sel.astype(jnp.float32), valid, num_tokens),
      "num_selected": n_sel.astype(jnp.float32),
      "selected_cov_mean": safe_div(jnp.sum(jnp.where(sel, cov, 0)).astype(jnp.float32), n_sel),
  }


def _check_selection(selection, shape):
  if selection is None:
    return
  if tuple(jnp.shape(selection)) != tuple(shape):
    raise ValueError(f"selection has shape {tuple(jnp.shape(selection))}, but log_prob has shape "
                     f"{tuple(shape)}; they must match")


def ppo_clip(log_prob: jax.Array, old_log_prob: jax.Array, advantages: jax.Array,
             mask: jax.Array, *, clip_low=0.2, clip_high=0.2, dual_clip=None,
             agg: str = "token-mean", weights=None, num_tokens=None, num_seqs=None,
             max_len=None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """PPO-clip / GRPO policy loss (clip-higher when ``clip_high > clip_low``).

  ``L1 = −A·r``, ``L2 = −A·clip(r, 1−ε_low, 1+ε_high)``, ``L = max(L1, L2)``;
  with ``dual_clip = c``: ``L = min(L, −A·c)`` where ``A < 0``.

  Args:
    log_prob: ``[B, T]`` log π of the sampled tokens (differentiated).
    old_log_prob: ``[B, T]`` log π_old (constant).
    advantages: ``[B, T]`` A (constant).
    mask: ``[B, T]``, nonzero for a valid response token.
    clip_low, clip_high: ε_low in [0, 1], ε_high ≥ 0 (Python or traced).
    dual_clip: ``None`` or the dual-clip constant c > 1 (value may be traced).
    agg: aggregation mode, see ``ops.aggregate``.
    weights: optional ``[B, T]`` importance weights (e.g. from
      ``rollout_correction``), detached, multiplying the per-token loss;
      ``None`` leaves the loss untouched.
    num_tokens, num_seqs, max_len: optional global normalizers for
      micro-batch accumulation, see ``ops.aggregate``; ``num_tokens`` also
      normalizes the token-fraction metrics.

  Returns:
    ``(loss, metrics)``; metrics: ``clipfrac`` (fraction with ``L2 > L1``),
    ``approx_kl`` (mean of ``−d``), ``pg_loss`` (= loss) and, with a dual
    clip, ``clipfrac_lower`` (fraction where the dual clip binds).
  """
  cv.check_tokens(log_prob, mask, old_log_prob=old_log_prob, advantages=advantages,
                  weights=weights)
  check_agg(agg)
  cv.check_clip(clip_low, clip_high)
  if dual_clip is not None:
    check_scalar("dual_clip", dual_clip, low=1, low_open=True)
  valid, lp, old, a = _prepare(log_prob, old_log_prob, advantages, mask)
  d, l1, l2 = cv.ppo_clipped(lp, old, a, clip_low, clip_high)
  per_token = jnp.maximum(l1, l2)
  metrics = _common_metrics(d, l1, l2, valid, num_tokens)
  if dual_clip is not None:
    l3 = -a * dual_clip
    lower = (a < 0) & (per_token > l3)
    metrics["clipfrac_lower"] = _token_frac(lower.astype(jnp.float32), valid, num_tokens)
    per_token = jnp.where(a < 0, jnp.minimum(per_token, l3), per_token)
  per_token = _weigh(per_token, weights, valid)
  loss = _agg(per_token, valid, agg, num_tokens, num_seqs, max_len)
  metrics["pg_loss"] = loss
  return loss, metrics


def clip_cov(log_prob: jax.Array, old_log_prob: jax.Array, advantages: jax.Array,
             mask: jax.Array, *, key: jax.Array | None = None, ratio=2e-4, cov_lb=1.0,
             cov_ub=5.0, clip_low=0.2, clip_high=0.2, agg: str = "token-mean",
             weights=None, selection: jax.Array | None = None, k_max: int | None = None,
             num_tokens=None,
             num_seqs=None, max_len=None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Clip-Cov: PPO-clip with the gradient of a few high-covariance tokens cut.

  ``L_i = max(L1_i, L2_i) · (0 if i selected else 1)``; selected tokens stay
  in the denominator. The selection (``select_clip_cov``) is a uniform random
  subset of ``min(max(1, floor(ratio·N)), #candidates)`` candidates: valid,
  not PPO-clipped, ``cov_lb < Cov < cov_ub``. The paper's runs use
  ``clip_low = clip_high = 1`` so that the band alone does the work.

  Args:
    log_prob, old_log_prob, advantages, mask: ``[B, T]`` as in ``ppo_clip``.
    key: PRNG key for the random choice; unused when ``selection`` is given.
    ratio: fraction of valid tokens to cut, in (0, 1].
    cov_lb, cov_ub: the covariance band (open interval).
    clip_low, clip_high: PPO ε_low, ε_high.
    agg: aggregation mode.
    weights: optional detached ``[B, T]`` importance weights, see ``ppo_clip``.
    selection: optional precomputed bool ``[B, T]`` selection (e.g. this
      micro-batch's rows of ``select_clip_cov`` over the mini-batch); then
      ``key``, ``ratio`` and the band are not used for choosing.
    k_max: static top-k size; see ``select_kl_cov``.
    num_tokens, num_seqs, max_len: global normalizers, see ``ops.aggregate``.

  Returns:
    ``(loss, metrics)``; metrics: ``clipfrac`` and ``approx_kl`` (as in
    ``ppo_clip``), ``selected_frac`` (chosen / N), ``num_selected``,
    ``selected_cov_mean`` (mean Cov of the chosen tokens, Cov from the arrays
    passed in), ``pg_loss`` (= loss).
  """
  cv.check_tokens(log_prob, mask, old_log_prob=old_log_prob, advantages=advantages,
                  weights=weights)
  check_agg(agg)
  _check_selection(selection, log_prob.shape)
  valid, lp, old, a = _prepare(log_prob, old_log_prob, advantages, mask)
  if selection is None:
    selection, cov = cv.select_clip_cov_and_cov(
        log_prob, old_log_prob, advantages, mask, key=key, ratio=ratio, cov_lb=cov_lb,
        cov_ub=cov_ub, clip_low=clip_low, clip_high=clip_high, k_max=k_max)
  else:
    cv.check_clip(clip_low, clip_high)
    cov = cv.token_covariance(lp, a, valid)
  selection = as_valid(selection) & valid
  d, l1, l2 = cv.ppo_clipped(lp, old, a, clip_low, clip_high)
  per_token = _weigh(jnp.where(selection, 0, jnp.maximum(l1, l2)), weights, valid)
  loss = _agg(per_token, valid, agg, num_tokens, num_seqs, max_len)
  metrics = _common_metrics(d, l1, l2, valid, num_tokens)
  metrics.update(_selection_metrics(selection, valid, cov, num_tokens))
  metrics["pg_loss"] = loss
  return loss, metrics


def kl_cov(log_prob: jax.Array, old_log_prob: jax.Array, advantages: jax.Array,
           mask: jax.Array, *, ratio=2e-4, kl_coef=1.0, agg: str = "token-mean",
           weights=None, selection: jax.Array | None = None, k_max: int | None = None,
           num_tokens=None, num_seqs=None, max_len=None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """KL-Cov: an ``|log π − log π_old|`` penalty on the top-covariance tokens.

  ``L_i = −A_i·r_i + β·|log π_i − log π_old,i|·[i selected]`` with no PPO
  clipping; the selection (``select_kl_cov``) is the ``max(1, floor(ratio·N))``
  valid tokens of largest Cov. On-policy (``log π = log π_old``) the penalty
  and its gradient are exactly 0 (``d|x|/dx = 0`` at 0, as in the reference).
  The penalty uses the unclamped difference: it is linear, so it cannot
  overflow, and clamping would zero its gradient exactly where the policy has
  drifted furthest.

  Args:
    log_prob, old_log_prob, advantages, mask: ``[B, T]`` as in ``ppo_clip``.
    ratio: fraction of valid tokens to penalise, in (0, 1].
    kl_coef: β ≥ 0 (paper: 1; verl's config default: 0.1).
    agg: aggregation mode.
    weights: optional detached ``[B, T]`` importance weights multiplying
      each token's whole loss (both parts), see ``ppo_clip``.
    selection: optional precomputed bool ``[B, T]`` selection.
    k_max: static top-k size; see ``select_kl_cov``.
    num_tokens, num_seqs, max_len: global normalizers, see ``ops.aggregate``.

  Returns:
    ``(loss, metrics)``; metrics: ``clipfrac`` (0: KL-Cov clips nothing),
    ``approx_kl`` (mean ``−d``), ``abs_kl`` (mean ``|d|``, the reference's
    KL-Cov log), ``selected_frac``, ``num_selected``, ``selected_cov_mean``,
    ``pg_loss`` (the aggregated ``−A·r`` part) and ``kl_penalty`` (the
    aggregated penalty part; ``loss = pg_loss + kl_penalty``).
  """
  cv.check_tokens(log_prob, mask, old_log_prob=old_log_prob, advantages=advantages,
                  weights=weights)
  check_agg(agg)
  check_scalar("kl_coef", kl_coef, low=0)
  _check_selection(selection, log_prob.shape)
  valid, lp, old, a = _prepare(log_prob, old_log_prob, advantages, mask)
  if selection is None:
    selection, cov = cv.select_kl_cov_and_cov(log_prob, advantages, mask, ratio=ratio,
                                              k_max=k_max)
  else:
    cov = cv.token_covariance(lp, a, valid)
  selection = as_valid(selection) & valid
  d = cv.clamped_log_ratio(lp, old)
  pg = -a * jnp.exp(d)
  # |x| written as x·sign(x): its derivative is sign(x), 0 at x = 0 as in the
  # reference (torch); jnp.abs has derivative 1 at 0, which would push an
  # on-policy token.
  diff = lp - old
  penalty = jnp.where(selection, kl_coef * (diff * jnp.sign(diff)), 0)
  # One aggregation for the loss (every mode is linear in the per-token
  # values); the split into its two parts is a metric, computed from the
  # penalty alone (pg_loss = loss - kl_penalty), so a caller that only
  # differentiates the loss pays for one reduction, not two.
  loss = _agg(_weigh(pg + penalty, weights, valid), valid, agg, num_tokens, num_seqs, max_len)
  pen_loss = _agg(_weigh(penalty, weights, valid), valid, agg, num_tokens, num_seqs, max_len)
  pg_loss = loss - pen_loss
  metrics = {
      "clipfrac": jnp.zeros((), jnp.float32),
      "approx_kl": _token_frac(-d, valid, num_tokens),
      "abs_kl": _token_frac(jnp.abs(d), valid, num_tokens),
      **_selection_metrics(selection, valid, cov, num_tokens),
      "pg_loss": pg_loss,
      "kl_penalty": pen_loss,
  }
  return loss, metrics
