"""Host I/O for the entropy–performance law: read a run, write law.json/png.

The ``jaxent fit-law`` program's I/O around ``diagnostics.fit_entropy_law``
(the functional core reads no files): it pulls in matplotlib, so
``jaxent.apps`` imports it only when called.
"""
from __future__ import annotations

import json
import math
import os
from typing import NamedTuple

import numpy as np

from jaxent.diagnostics import LawFit
from jaxent.files import open_regular

# Tried in order when no y key is given: held-out accuracy is what the paper
# fits; a training run may only log the mean reward.
DEFAULT_Y_KEYS = ("accuracy", "reward")
DEFAULT_X_KEY = "entropy"


class Series(NamedTuple):
  """(entropy, reward) points read from a run's metrics.jsonl."""
  x: np.ndarray  # float64 [n]
  y: np.ndarray  # float64 [n]
  steps: np.ndarray | None  # [n], or None where lines carry no "step"
  x_key: str
  y_key: str
  n_lines: int  # non-blank lines in the file
  n_malformed: int  # lines that are not a JSON object (skipped)
  n_missing: int  # objects lacking a numeric x or y (skipped)
  n_nonfinite: int  # objects whose x or y is NaN/inf (skipped)


def _lookup(record: dict, key: str):
  """``record[key]``, else a dotted path into nested objects ("eval.acc")."""
  if key in record:
    return record[key]
  node = record
  for part in key.split("."):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def _number(value) -> float | None:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  return float(value)


def read_metrics(run_dir: str, *, x_key: str = DEFAULT_X_KEY,
                 y_key: str | None = None) -> Series:
  """Read ``RUN_DIR/metrics.jsonl`` into an (x, y) series.

  Lines that are not JSON objects, lack a numeric ``x_key`` or ``y_key``, or
  carry NaN/inf are skipped and counted. Points are ordered by ``step`` when
  every kept line has one (a resumed run may append out of order), else by
  line order.

  Raises:
    FileNotFoundError: no directory or no metrics.jsonl in it.
    ValueError: no line has both keys.
  """
  if not os.path.isdir(run_dir):
    raise FileNotFoundError(f"run directory not found: {run_dir}")
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.lexists(path):
    raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")

  records, n_lines, n_malformed = [], 0, 0
  with open_regular(path, "r", what="metrics file", encoding="utf-8", errors="replace") as f:
    for line in f:
      if not line.strip():
        continue
      n_lines += 1
      try:
        obj = json.loads(line)
      except ValueError:
        n_malformed += 1
        continue
      if not isinstance(obj, dict):
        n_malformed += 1
        continue
      records.append(obj)

  if y_key is None:
    found = [k for k in DEFAULT_Y_KEYS
             if any(_number(_lookup(r, k)) is not None for r in records)]
    if not found:
      raise ValueError(
          f"{path}: no line has any of the keys {list(DEFAULT_Y_KEYS)}; "
          "choose the performance metric with --y-key")
    y_key = found[0]

  xs, ys, steps, n_missing, n_nonfinite = [], [], [], 0, 0
  for r in records:
    x, y = _number(_lookup(r, x_key)), _number(_lookup(r, y_key))
    if x is None or y is None:
      n_missing += 1
      continue
    if not (math.isfinite(x) and math.isfinite(y)):
      n_nonfinite += 1
      continue
    xs.append(x)
    ys.append(y)
    steps.append(_number(r.get("step")))
  if not xs:
    raise ValueError(
        f"{path}: none of its {n_lines} lines has numeric, finite "
        f"{x_key!r} and {y_key!r} ({n_malformed} malformed, {n_missing} "
        f"lacking a key, {n_nonfinite} non-finite)")

  x, y = np.asarray(xs), np.asarray(ys)
  step_arr = None
  if all(s is not None for s in steps):
    step_arr = np.asarray(steps)
    order = np.argsort(step_arr, kind="stable")
    x, y, step_arr = x[order], y[order], step_arr[order]
  return Series(x=x, y=y, steps=step_arr, x_key=x_key, y_key=y_key,
                n_lines=n_lines, n_malformed=n_malformed, n_missing=n_missing,
                n_nonfinite=n_nonfinite)


def _finite_or_none(v: float):
  return v if math.isfinite(v) else None


def law_record(fit: LawFit, series: Series, fit_first: int | None) -> dict:
  """The content of law.json (NaN becomes null: JSON has no NaN)."""
  return {
      "law": "R = -a*exp(H) + b",
      "a": fit.a,
      "b": fit.b,
      "r2": _finite_or_none(fit.r2),
      "ceiling": fit.ceiling,
      "method": fit.method,
      "x_key": series.x_key,
      "y_key": series.y_key,
      "n_points": int(series.x.size),
      "fit_first": fit_first,
      "n_fit": fit.n_fit,
      "rmse": fit.rmse,
      "n_pred": fit.n_pred,
      "pred_rmse": _finite_or_none(fit.pred_rmse),
      "pred_mae": _finite_or_none(fit.pred_mae),
      "first_step": None if series.steps is None else float(series.steps[0]),
      "last_step": None if series.steps is None else float(series.steps[-1]),
      "skipped": {
          "malformed": series.n_malformed,
          "missing_key": series.n_missing,
          "non_finite": series.n_nonfinite,
      },
  }


def write_law_json(path: str, record: dict) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2)
    f.write("\n")


def plot_law(path: str, fit: LawFit, series: Series) -> None:
  """Reward against entropy, the fitted curve, and the predicted ceiling."""
  # The object-oriented Agg API: no pyplot, no global backend switch, so it
  # is safe inside a notebook or any process that already chose a backend.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(6.4, 4.4), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  k = fit.n_fit
  ax.scatter(series.x[:k], series.y[:k], s=14, color="tab:blue",
             label=f"fitted ({k})" if fit.n_pred else f"points ({k})")
  if fit.n_pred:
    ax.scatter(series.x[k:], series.y[k:], s=14, facecolors="none",
               edgecolors="tab:orange",
               label=f"held out ({fit.n_pred}), RMSE {fit.pred_rmse:.3g}")
  h = np.linspace(0.0, 1.05 * float(series.x.max()), 200)
  ax.plot(h, fit.predict(h), color="black", lw=1.5,
          label=f"R = {formula(fit.a, fit.b, digits=3)}  (r² {fit.r2:.3f})")
  ax.axhline(fit.ceiling, color="tab:red", ls="--", lw=1)
  ax.plot([0.0], [fit.ceiling], marker="*", ms=12, color="tab:red",
          label=f"ceiling at H = 0: {fit.ceiling:.3g}")
  ax.set_xlabel(f"entropy H ({series.x_key})")
  ax.set_ylabel(f"performance R ({series.y_key})")
  ax.set_title(f"entropy–performance law ({fit.method})")
  ax.legend(fontsize=8, loc="best")
  fig.tight_layout()
  fig.savefig(path, format="png")


def formula(a: float, b: float, x: str = "H", digits: int = 4) -> str:
  """``-a*exp(x) + b`` with the signs folded into the numbers (``a < 0`` gives ``+|a|``)."""
  return (f"{'-' if a >= 0 else '+'}{abs(a):.{digits}g}*exp({x}) "
          f"{'+' if b >= 0 else '-'} {abs(b):.{digits}g}")


def summary_line(fit: LawFit, series: Series, out_dir: str) -> str:
  skipped = series.n_malformed + series.n_missing + series.n_nonfinite
  pred = (f", held-out RMSE {fit.pred_rmse:.4g} on {fit.n_pred}"
          if fit.n_pred else "")
  return (f"{series.y_key} = {formula(fit.a, fit.b, series.x_key)}: "
          f"r2 {fit.r2:.4f}, ceiling {fit.ceiling:.4g}, n {fit.n_fit}{pred}, "
          f"skipped {skipped} -> {os.path.join(out_dir, 'law.json')}, law.png")


def fit_law(run_dir: str, *, fit_first: int | None = None, x_key: str = DEFAULT_X_KEY,
            y_key: str | None = None, method: str = "ols") -> str:
  """``jaxent fit-law``: fits the law to ``run_dir/metrics.jsonl``, writes law.json and law.png.

  Returns the summary line. Raises ``OSError``/``ValueError`` naming what is
  wrong with the run's metrics.
  """
  from jaxent.diagnostics import fit_entropy_law
  series = read_metrics(run_dir, x_key=x_key, y_key=y_key)
  fit = fit_entropy_law(series.x, series.y, fit_first=fit_first, method=method,
                        labels=(f"{series.x_key!r} in {os.path.join(run_dir, 'metrics.jsonl')}",
                                f"{series.y_key!r} in {os.path.join(run_dir, 'metrics.jsonl')}"))
  write_law_json(os.path.join(run_dir, "law.json"), law_record(fit, series, fit_first))
  plot_law(os.path.join(run_dir, "law.png"), fit, series)
  return summary_line(fit, series, run_dir)


def early_fit_prediction(steps, entropy, accuracy, *, total_steps: int, fraction: float = 0.25,
                         method: str = "ols", final=None) -> dict:
  """The law fitted on the evaluations of the first ``fraction`` of a run, against its end.

  The points are ordered by step; those with ``step <= fraction * total_steps``
  are fitted (``diagnostics.fit_entropy_law``), and the fit predicts the
  accuracy at the last point's entropy, ``-a*exp(H_last) + b``, which is
  compared with the accuracy the run reached there. Points of several runs
  (seeds) may be pooled; ``final = (entropies, accuracies)`` then names the
  end points (e.g. each seed's last evaluation), and the mean of their
  predictions is compared with the mean accuracy reached.

  Returns:
    ``n_fit``, ``a``, ``b``, ``r2``, ``ceiling`` (``b - a``, the fit at
    ``H = 0``), ``last_step``, ``last_entropy`` (the mean over ``final``),
    ``predicted_final``, ``realised_final``, ``error`` (predicted - realised).

  Raises:
    ValueError: mismatched or too short series, fewer than 3 points in the
      early window or none after it, or a degenerate fit (named).
  """
  from jaxent import diagnostics
  st = np.asarray(steps, np.float64)
  h = np.asarray(entropy, np.float64)
  r = np.asarray(accuracy, np.float64)
  if not st.shape == h.shape == r.shape or st.ndim != 1:
    raise ValueError(f"steps, entropy and accuracy must be 1-D of one length, got shapes "
                     f"{st.shape}, {h.shape}, {r.shape}")
  if not 0 < fraction < 1:
    raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
  order = np.argsort(st, kind="stable")
  st, h, r = st[order], h[order], r[order]
  k = int(np.sum(st <= fraction * total_steps))
  if k < 3 or k >= st.size:
    raise ValueError(
        f"the early fit needs at least 3 evaluations at steps <= {fraction:g} x {total_steps} and "
        f"at least one after; got {k} of {st.size} (evaluate more often)")
  fit = diagnostics.fit_entropy_law(h, r, fit_first=k, method=method,
                                    labels=("entropy", "accuracy"))
  h_end, r_end = (h[-1:], r[-1:]) if final is None else (np.asarray(x, np.float64) for x in final)
  predicted, realised = float(np.mean(fit.predict(h_end))), float(np.mean(r_end))
  return {"n_fit": k, "a": float(fit.a), "b": float(fit.b), "r2": _finite_or_none(fit.r2),
          "ceiling": float(fit.ceiling), "last_step": int(st[-1]),
          "last_entropy": float(np.mean(h_end)), "predicted_final": predicted,
          "realised_final": realised, "error": predicted - realised}
