"""The entropy–performance law ``R = −a·exp(H) + b`` (Cui et al. 2025, §2).

Across training, downstream performance ``R`` and policy entropy ``H`` follow
``R = −a·exp(H) + b``; at ``H = 0`` the law predicts the ceiling
``R = −a + b``. The law is linear in ``x = exp(H)``, ``R = −a·x + b``, so the
fit is a straight-line regression of ``R`` on ``x``.

This runs on the host, on logged scalars (NumPy, float64), never under jit.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

METHODS = ("ols", "huber", "theil-sen")

# Huber's tuning constant: 95% efficiency under Gaussian noise.
_HUBER_C = 1.345
# MAD → standard deviation for Gaussian residuals.
_MAD_TO_STD = 1.4826
# Theil–Sen looks at all pairs up to this many; beyond, at a fixed random
# subset of this size (seeded, so the fit is reproducible).
_THEIL_SEN_MAX_PAIRS = 2_000_000


class LawFit(NamedTuple):
  """Result of :func:`fit_entropy_law`.

  The first four fields are the law: ``R = −a·exp(H) + b``, the coefficient
  of determination ``r2`` on the fitted points (``1 − SS_res/SS_tot``; NaN if
  the fitted rewards are all equal), and ``ceiling = −a + b`` (``R`` at
  ``H = 0``).
  """
  a: float
  b: float
  r2: float
  ceiling: float
  method: str
  n_fit: int  # points used for the fit
  rmse: float  # residual RMSE on the fitted points
  n_pred: int  # held-out points (0 without fit_first)
  pred_rmse: float  # RMSE of the prediction on held-out points (NaN if none)
  pred_mae: float  # mean absolute error on held-out points (NaN if none)

  def predict(self, entropy) -> np.ndarray:
    """``R̂ = −a·exp(H) + b`` for an array of entropies."""
    return -self.a * np.exp(np.asarray(entropy, np.float64)) + self.b


def _as_series(name: str, values) -> np.ndarray:
  try:
    arr = np.asarray(values, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be a 1-D sequence of numbers: {e}") from None
  if arr.ndim != 1:
    raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
  bad = ~np.isfinite(arr)
  if bad.any():
    idx = np.flatnonzero(bad)
    raise ValueError(
        f"{name} has {idx.size} non-finite value(s) (NaN/inf), first at index "
        f"{idx[0]}; drop them before fitting")
  return arr


def _ols(x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None):
  """Weighted least squares ``y ≈ s·x + c`` on centred data (stable)."""
  w = np.ones_like(x) if w is None else w
  sw = w.sum()
  mx, my = (w * x).sum() / sw, (w * y).sum() / sw
  dx, dy = x - mx, y - my
  sxx = (w * dx * dx).sum()
  slope = (w * dx * dy).sum() / sxx
  return slope, my - slope * mx


def _huber(x: np.ndarray, y: np.ndarray, *, max_iter: int = 100, tol: float = 1e-10):
  """Huber M-estimate by iteratively reweighted least squares.

  The residual scale is re-estimated each iteration from the median absolute
  deviation, so the threshold ``c·σ̂`` adapts to the noise level.
  """
  slope, icpt = _ols(x, y)
  for _ in range(max_iter):
    r = y - (slope * x + icpt)
    scale = _MAD_TO_STD * np.median(np.abs(r - np.median(r)))
    if scale <= 0:
      # More than half the points lie on the line: it already is the fit.
      break
    u = np.abs(r) / (_HUBER_C * scale)
    w = np.where(u <= 1.0, 1.0, 1.0 / np.maximum(u, 1.0))
    new_slope, new_icpt = _ols(x, y, w)
    done = (abs(new_slope - slope) <= tol * (1 + abs(slope))
            and abs(new_icpt - icpt) <= tol * (1 + abs(icpt)))
    slope, icpt = new_slope, new_icpt
    if done:
      break
  return slope, icpt


def _theil_sen(x: np.ndarray, y: np.ndarray):
  """Median of pairwise slopes; intercept the median of ``y − slope·x``."""
  n = x.size
  if n * (n - 1) // 2 <= _THEIL_SEN_MAX_PAIRS:
    i, j = np.triu_indices(n, k=1)
  else:
    rng = np.random.default_rng(0)
    i = rng.integers(0, n, _THEIL_SEN_MAX_PAIRS)
    j = rng.integers(0, n, _THEIL_SEN_MAX_PAIRS)
  dx = x[j] - x[i]
  keep = dx != 0
  slope = float(np.median((y[j] - y[i])[keep] / dx[keep]))
  return slope, float(np.median(y - slope * x))


def fit_entropy_law(entropy, reward, *, fit_first: int | None = None,
                    method: str = "ols", labels: tuple[str, str] = ("entropy", "reward")) -> LawFit:
  """Fit ``R = −a·exp(H) + b`` to a run's (entropy, reward) series.

  Args:
    entropy: 1-D policy entropies ``H`` (nats), in training order.
    reward: 1-D performance ``R`` at the same steps (accuracy, reward, ...).
    fit_first: if given, fit on the first ``K`` points only and report the
      prediction error on the rest (the paper predicts late-training
      performance from early steps). Needs ``3 <= K < len(entropy)``.
    method: ``"ols"`` (default): least squares, the maximum-likelihood fit
      under Gaussian noise and what the paper fits. ``"huber"``: Huber
      M-estimate (IRLS, MAD scale, c = 1.345), for occasional outlying
      rewards (a bad eval). ``"theil-sen"``: median of pairwise slopes,
      robust also to outlying entropies (spikes), up to ~29% outliers.
    labels: the names of the two series in error messages (e.g. the
      metrics keys they were read from).

  Returns:
    :class:`LawFit` ``(a, b, r2, ceiling, ...)``.

  Raises:
    ValueError: mismatched lengths, fewer than 3 points, NaN/inf, a bad
      ``fit_first``, entropies too large for ``exp``, entropy constant over
      the fitted points (the law is then not identifiable), or reward
      constant over them (then ``a = 0`` and ``r2`` is undefined: the run
      shows no entropy-performance trade-off to fit).
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  h = _as_series("entropy", entropy)
  r = _as_series("reward", reward)
  if h.size != r.size:
    raise ValueError(
        f"entropy and reward must have the same length, got {h.size} and {r.size}")
  if h.size < 3:
    raise ValueError(f"fitting the law needs at least 3 points, got {h.size}")
  n = h.size
  if fit_first is None:
    k = n
  else:
    if isinstance(fit_first, bool) or not isinstance(fit_first, (int, np.integer)):
      raise ValueError(f"fit_first must be an int, got {fit_first!r}")
    k = int(fit_first)
    if not 3 <= k < n:
      raise ValueError(
          f"fit_first must satisfy 3 <= fit_first < number of points ({n}) so "
          f"that some points are left to predict, got {k}")
  with np.errstate(over="ignore"):
    x = np.exp(h)
  if not np.isfinite(x).all():
    raise ValueError(
        f"entropy too large for exp(H) (max {h.max():g}); is it in nats?")

  xf, rf = x[:k], r[:k]
  spread = xf.max() - xf.min()
  if spread <= 1e-12 * max(1.0, np.abs(xf).max()):
    raise ValueError(
        f"{labels[0]} is constant over the {k} fitted points "
        f"(H = {h[0]:g}); the law R = -a*exp(H) + b is not identifiable")
  if rf.max() - rf.min() <= 1e-12 * max(1.0, np.abs(rf).max()):
    raise ValueError(
        f"{labels[1]} is constant over the {k} fitted points (R = {rf[0]:g}): no "
        f"entropy-performance trade-off to fit (a would be 0 and r2 undefined)")

  if method == "ols":
    slope, icpt = _ols(xf, rf)
  elif method == "huber":
    slope, icpt = _huber(xf, rf)
  else:
    slope, icpt = _theil_sen(xf, rf)
  a, b = -float(slope), float(icpt)

  resid = rf - (slope * xf + icpt)
  ss_res = float(np.sum(resid**2))
  ss_tot = float(np.sum((rf - rf.mean())**2))
  r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
  rmse = float(np.sqrt(ss_res / k))

  if k < n:
    err = r[k:] - (slope * x[k:] + icpt)
    pred_rmse = float(np.sqrt(np.mean(err**2)))
    pred_mae = float(np.mean(np.abs(err)))
  else:
    pred_rmse = pred_mae = float("nan")
  return LawFit(a=a, b=b, r2=r2, ceiling=b - a, method=method, n_fit=k,
                rmse=rmse, n_pred=n - k, pred_rmse=pred_rmse, pred_mae=pred_mae)
