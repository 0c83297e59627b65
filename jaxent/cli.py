"""The ``jaxent`` command line: thin entry points over library functions.

Each subcommand is a pair ``_add_<name>(subparsers)`` / ``_run_<name>(args)
-> exit code``, registered in ``_COMMANDS``. Heavy imports (jax, matplotlib)
happen inside the ``_run_*`` functions so that ``jaxent --help`` is instant.
Exit codes: 0 success, 2 bad usage or bad input (with a message on stderr).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

EXIT_OK = 0
EXIT_BAD_INPUT = 2


def _error(msg: str) -> int:
  print(f"jaxent: error: {msg}", file=sys.stderr)
  return EXIT_BAD_INPUT


# ---------------------------------------------------------------- fit-law ---

def _add_fit_law(sub) -> None:
  p = sub.add_parser(
      "fit-law",
      help="fit R = -a*exp(H) + b to a run's metrics.jsonl",
      description=(
          "Fit the entropy-performance law R = -a*exp(H) + b (Cui et al. "
          "2025) to RUN_DIR/metrics.jsonl and write RUN_DIR/law.json and "
          "RUN_DIR/law.png. Lines that are not JSON, or lack either key, are "
          "skipped and counted."))
  p.add_argument("run_dir", metavar="RUN_DIR", help="run directory holding metrics.jsonl")
  p.add_argument("--fit-first", type=int, default=None, metavar="K",
                 help="fit on the first K points (by step) and report the "
                      "prediction error on the rest")
  p.add_argument("--x-key", default="entropy",
                 help="entropy key in metrics.jsonl (default: entropy; a dotted "
                      "path reaches nested objects)")
  p.add_argument("--y-key", default=None,
                 help="performance key (default: 'accuracy' if the file has "
                      "it, else 'reward')")
  p.add_argument("--method", default="ols", choices=("ols", "huber", "theil-sen"),
                 help="regression: least squares (default) or a robust fit")


def _run_fit_law(args: argparse.Namespace) -> int:
  from jaxent.diagnostics import _report
  from jaxent.diagnostics._law import fit_entropy_law

  try:
    series = _report.read_metrics(args.run_dir, x_key=args.x_key, y_key=args.y_key)
    fit = fit_entropy_law(series.x, series.y, fit_first=args.fit_first,
                          method=args.method)
  except (OSError, ValueError) as e:
    return _error(str(e))
  _report.write_law_json(os.path.join(args.run_dir, "law.json"),
                         _report.law_record(fit, series, args.fit_first))
  _report.plot_law(os.path.join(args.run_dir, "law.png"), fit, series)
  print(_report.summary_line(fit, series, args.run_dir))
  return EXIT_OK


# ------------------------------------------------------------------ main ---

_COMMANDS: dict[str, tuple[Callable, Callable[[argparse.Namespace], int]]] = {
    "fit-law": (_add_fit_law, _run_fit_law),
}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="jaxent",
      description="RL for language models with entropy management (Clip-Cov, KL-Cov).")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for add, _ in _COMMANDS.values():
    add(sub)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Run ``jaxent`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
  parser = build_parser()
  try:
    args = parser.parse_args(argv)
  except SystemExit as e:  # argparse reports usage errors (2) and --help (0)
    return int(e.code or 0)
  if args.command is None:
    parser.print_help(sys.stderr)
    return EXIT_BAD_INPUT
  return _COMMANDS[args.command][1](args)


if __name__ == "__main__":
  sys.exit(main())
