"""Rollout correction: importance weights and rejection masks for sampler drift.

The sampler's log-probs (``rollout_log_prob``, from the engine that generated
the tokens) differ from the trainer's recomputed ``old_log_prob`` (other
kernels, precision, batching). Following verl's
``algorithm.rollout_correction`` (../shared/REFERENCE.md), with
``log_ratio = old − rollout`` and ``M`` the mask:

* token level: ``w_raw = exp(clamp(log_ratio, −20, 20))·M``;
* sequence level: ``w_raw_b = exp(clamp(Σ_t M·log_ratio, −20, 20))`` on every
  token of row ``b`` (a product of the token ratios);
* a single bound ``u`` is TIS, ``w = min(w_raw, u)``; a pair ``(lo, hi)`` is
  IcePop, ``w = w_raw`` inside ``[lo, hi]``, else 0;
* ``batch_normalize`` divides by the masked mean (token) or the mean of the
  row weights over non-empty rows (sequence), when that mean is above 1e-8;
* rejection (``rollout_rs``): token or row statistics of
  ``k1 = −x``, ``k2 = x²/2``, ``k3 = eˣ − 1 − x`` (``x`` the clamped
  log-ratio) keep or drop tokens or whole rows; several options are ANDed.

The weights multiply the per-token loss of any policy loss (``weights=``);
the returned mask replaces the loss mask. Both are detached.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxent import ops
from jaxent.losses import _covariance as cv
from jaxent.ops import as_valid, safe_div, upcast

LEVELS = ("token", "sequence")
REJECTION_STATS = ("token", "seq_sum", "seq_mean", "seq_max")
REJECTION_KINDS = ("k1", "k2", "k3")
REJECTION_OPTIONS = tuple(f"{s}_{k}" for s in REJECTION_STATS for k in REJECTION_KINDS)
# Batch normalisation only divides by a mean above this (verl).
_NORM_EPS = 1e-8

_THRESHOLD_HELP = ("a number u > 0 (TIS: w = min(w, u)), a pair (lo, hi) with 0 <= lo < hi "
                   "(IcePop), a string 'u' or 'lo_hi', or None (no weights)")


def _parse_bound_string(text: str, what: str, help_text: str) -> tuple[float, ...]:
  parts = text.strip().split("_")
  try:
    vals = tuple(float(p) for p in parts)
  except ValueError:
    vals = ()
  if len(vals) not in (1, 2) or not all(math.isfinite(v) for v in vals):
    raise ValueError(f"{what} must be {help_text}; could not parse {text!r}")
  return vals


def parse_threshold(threshold) -> tuple[float, ...] | None:
  """``None``, ``(u,)`` (TIS) or ``(lo, hi)`` (IcePop) from the accepted forms."""
  if threshold is None:
    return None
  if isinstance(threshold, str):
    vals = _parse_bound_string(threshold, "threshold", _THRESHOLD_HELP)
  elif isinstance(threshold, (tuple, list)):
    if len(threshold) != 2:
      raise ValueError(f"threshold must be {_THRESHOLD_HELP}; got a sequence of "
                       f"{len(threshold)} values")
    vals = tuple(_number("threshold", v) for v in threshold)
  else:
    vals = (_number("threshold", threshold),)
  if len(vals) == 1 and not vals[0] > 0:
    raise ValueError(f"threshold must be {_THRESHOLD_HELP}; got u = {vals[0]:g}")
  if len(vals) == 2 and not 0 <= vals[0] < vals[1]:
    raise ValueError(f"threshold must be {_THRESHOLD_HELP}; got lo = {vals[0]:g}, "
                     f"hi = {vals[1]:g}")
  return vals


def _number(name, v) -> float:
  x = ops.concrete_scalar(v)
  if x is None or not math.isfinite(x):
    raise ValueError(f"{name} must be {_THRESHOLD_HELP} (Python numbers: the choice between TIS "
                     f"and IcePop shapes the program); got {v!r}")
  return x


def parse_rejection(rejection) -> tuple[tuple[str, str, tuple[float, ...]], ...]:
  """``((stat, kind, bounds), ...)`` from ``"seq_mean_k1:0.999_1.001,token_k2:2"``."""
  if rejection is None:
    return ()
  help_text = (f"None or comma-separated 'option:threshold' items, option one of "
               f"{list(REJECTION_OPTIONS)}, threshold 'u' or 'lo_up' (e.g. "
               f"'seq_mean_k1:0.999_1.001')")
  if not isinstance(rejection, str) or not rejection.strip():
    raise ValueError(f"rejection must be {help_text}; got {rejection!r}")
  out = []
  for item in rejection.split(","):
    name, sep, thr = item.strip().partition(":")
    if name not in REJECTION_OPTIONS:
      raise ValueError(f"rejection option {name!r} is unknown; rejection must be {help_text}")
    if not sep:
      raise ValueError(f"rejection option {name!r} has no threshold; rejection must be "
                       f"{help_text}")
    bounds = _parse_bound_string(thr, f"the threshold of rejection option {name!r}",
                                 "'u' or 'lo_up' with positive numbers")
    if not all(b > 0 for b in bounds) or (len(bounds) == 2 and bounds[0] > bounds[1]):
      raise ValueError(f"the threshold of rejection option {name!r} must be 'u' or 'lo_up' "
                       f"with 0 < lo <= up; got {thr!r}")
    stat, _, kind = name.rpartition("_")
    out.append((stat, kind, bounds))
  return tuple(out)


def _token_stat(x, kind):
  if kind == "k1":
    return -x
  if kind == "k2":
    return 0.5 * x * x
  return jnp.expm1(x) - x


def _keep(stat, kind, bounds):
  """k1: ``log lo ≤ stat ≤ log up`` (``u`` alone: ``[1/u, u]``); k2, k3: ``stat ≤ up``."""
  up = bounds[-1]
  if kind == "k1":
    lo = bounds[0] if len(bounds) == 2 else 1.0 / bounds[0]
    return (stat >= math.log(lo)) & (stat <= math.log(up))
  return stat <= up


def rollout_correction(old_log_prob: jax.Array, rollout_log_prob: jax.Array, mask: jax.Array, *,
                       level: str = "token", threshold=2.0, rejection: str | None = None,
                       batch_normalize: bool = False) -> tuple[jax.Array, jax.Array]:
  """Importance weights and the loss mask that correct for the sampler's drift.

  Args:
    old_log_prob: ``[B, T]`` the trainer's log π_old of the sampled tokens.
    rollout_log_prob: ``[B, T]`` the sampler's log-probs of the same tokens.
    mask: ``[B, T]``, nonzero for a valid response token.
    level: ``"token"`` (per-token ratios) or ``"sequence"`` (one ratio per
      row, the product of its token ratios).
    threshold: ``u`` (TIS, ``min(w, u)``; verl's default 2.0), ``(lo, hi)``
      (IcePop, 0 outside ``[lo, hi]``; preset 0.5, 5.0), the same as a
      string ``"u"`` / ``"lo_hi"``, or ``None``: no weighting (weights are
      ``M``).
    rejection: ``None`` or comma-separated ``"option:threshold"`` items,
      ANDed. Options ``{token, seq_sum, seq_mean, seq_max}_{k1, k2, k3}``:
      the token statistic itself, or its row sum, row mean (÷ ``n_b``) or
      row maximum (0 for an empty row), the row options keeping or dropping
      the whole row. k1 keeps ``log lo ≤ stat ≤ log up`` (``u`` alone:
      ``[1/u, u]``), k2 and k3 keep ``stat ≤ up``. Presets: Geo-RS
      ``"seq_mean_k1:0.999_1.001"``, Seq-MIS ``"seq_sum_k1:0.5_2.0"``,
      K3-RS ``"seq_mean_k3:0.01"``.
    batch_normalize: divide the weights by their mean over the batch (token
      level: masked token mean; sequence level: mean over non-empty rows)
      when it is above 1e-8. Under a sharded ``jit`` the means are global.

  Returns:
    ``(weights, mask)``: float ``[B, T]`` weights, 0 at masked positions,
    computed on the original mask; bool ``[B, T]`` loss mask ``M ∧ keep``.
    Both carry no gradient.

  Raises:
    ValueError: unknown ``level`` or rejection option, a threshold that does
      not parse or is out of range, shapes that differ.
  """
  cv.check_tokens(old_log_prob, mask, rollout_log_prob=rollout_log_prob)
  if level not in LEVELS:
    raise ValueError(f"level must be one of {list(LEVELS)}, got {level!r}")
  bounds = parse_threshold(threshold)
  options = parse_rejection(rejection)
  if not isinstance(batch_normalize, bool):
    raise ValueError(f"batch_normalize must be True or False, got {batch_normalize!r}")
  valid = as_valid(mask)
  old = upcast(old_log_prob)
  rollout = upcast(rollout_log_prob).astype(old.dtype)
  log_ratio = lax.stop_gradient(jnp.where(valid, old - rollout, 0))
  x = cv.clamped_log_ratio(log_ratio, 0.0)
  n_row = ops.count_valid(valid, axis=-1)
  nonempty = n_row > 0

  if bounds is None:
    weights = valid.astype(old.dtype)
  else:
    if level == "token":
      w = jnp.exp(x)
    else:
      w = jnp.exp(jnp.clip(jnp.sum(log_ratio, axis=-1), -cv.LOG_RATIO_CLAMP,
                           cv.LOG_RATIO_CLAMP))[:, None]
    if len(bounds) == 1:
      w = jnp.minimum(w, bounds[0])
    else:
      w = jnp.where((w >= bounds[0]) & (w <= bounds[1]), w, 0)
    if batch_normalize:
      if level == "token":
        mean = safe_div(jnp.sum(jnp.where(valid, w, 0)), ops.count_valid(valid))
      else:
        mean = safe_div(jnp.sum(jnp.where(nonempty, w[:, 0], 0)), jnp.sum(nonempty))
      w = jnp.where(mean > _NORM_EPS, w / jnp.where(mean > _NORM_EPS, mean, 1), w)
    weights = jnp.where(valid, w, 0)

  keep = valid
  for stat, kind, thr in options:
    s = jnp.where(valid, _token_stat(x, kind), 0)
    if stat == "token":
      keep = keep & _keep(s, kind, thr)
      continue
    if stat == "seq_sum":
      row = jnp.sum(s, axis=-1)
    elif stat == "seq_mean":
      row = safe_div(jnp.sum(s, axis=-1), n_row)
    else:
      row = jnp.where(nonempty, jnp.max(jnp.where(valid, s, -jnp.inf), axis=-1), 0)
    keep = keep & _keep(row, kind, thr)[:, None]
  return lax.stop_gradient(weights), keep
