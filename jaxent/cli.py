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
EXIT_TRAINING_STOPPED = 3  # the run stopped itself (e.g. non-finite updates); checkpoint saved
EXIT_NO_COORDINATOR = 4    # a multi-process run could not join its coordinator in time


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



# ------------------------------------------------------------------ train ---

def _setup_errors():
  """The exception types that mean 'bad input': exit code 2, one line, nothing lost."""
  from jaxent.config import ConfigError
  from jaxent.data import DataError
  from jaxent.train._build import SetupError
  return (ConfigError, DataError, SetupError)


def _add_train(sub) -> None:
  p = sub.add_parser("train", help="run RL training from a YAML config",
                     description="Train a policy with GRPO / Clip-Cov / KL-Cov from CONFIG.yaml.")
  p.add_argument("config", metavar="CONFIG.yaml")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config value, e.g. --set loss.name=kl_cov (repeatable)")
  p.add_argument("--run-dir", default=None, help="run directory (default: runs/<name>)")
  p.add_argument("--resume", action="store_true",
                 help="continue from the run directory's last complete checkpoint")
  p.add_argument("--dry-run", action="store_true",
                 help="validate the config, build the model (no weights) and mesh abstractly, "
                      "compile (or lower) the train step for the target mesh, print the parameter "
                      "count and memory per device; writes nothing")
  p.add_argument("--topology", default=None, metavar="N|NAME",
                 help="--dry-run target: a device count (e.g. 64) or a TPU topology name for "
                      "ahead-of-time compilation (e.g. v5p:4x4x4, needs libtpu)")
  p.add_argument("--platform", default=None, choices=("tpu", "cuda", "rocm", "cpu"),
                 help="--dry-run: platform to lower for when the mesh is not here (default tpu)")
  g = p.add_argument_group(
      "multi-process", "Several hosts run the same command. TPU pod slices and SLURM jobs are "
      "detected; otherwise give all three of these (or JAXENT_COORDINATOR, "
      "JAXENT_NUM_PROCESSES, JAXENT_PROCESS_ID).")
  g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                 help="address of process 0, where the coordinator listens")
  g.add_argument("--num-processes", type=int, default=None, metavar="N")
  g.add_argument("--process-id", type=int, default=None, metavar="I", help="0 .. N-1")
  g.add_argument("--init-timeout", type=float, default=None, metavar="SECONDS",
                 help="give up (exit 4) if the processes have not all joined by then "
                      "(default JAXENT_INIT_TIMEOUT or 300)")


def _run_train(args: argparse.Namespace) -> int:
  from jaxent import config as config_lib
  bad = _setup_errors()
  try:
    cfg = config_lib.load(args.config, args.overrides)
  except bad as e:
    return _error(str(e))
  if args.dry_run:
    from jaxent.train import _dryrun
    try:
      _dryrun.dry_run(cfg, topology=args.topology, platform=args.platform)
    except bad as e:
      return _error(str(e))
    return EXIT_OK
  from jaxent.train import _distributed
  try:
    # Before JAX touches a device: joins the hosts of a multi-process job.
    _distributed.initialize_distributed(args.coordinator, args.num_processes, args.process_id,
                                        timeout_s=args.init_timeout, exit_code=EXIT_NO_COORDINATOR)
  except _distributed.DistributedError as e:
    return _error(str(e))
  import jax
  from jaxent.train import _build, _loop
  run_dir = args.run_dir or os.path.join("runs", cfg.name)
  # The generated task's files are written by process 0 into the run
  # directory; the others generate the same files privately (no two processes
  # write one file).
  data_dir = run_dir
  if jax.process_index() > 0 and cfg.data.task == "arithmetic":
    import atexit
    import shutil
    import tempfile
    data_dir = tempfile.mkdtemp(prefix=f"jaxent-p{jax.process_index()}-")
    atexit.register(shutil.rmtree, data_dir, True)
  try:
    comps = _build.build_components(cfg, data_dir, process_index=jax.process_index(),
                                    process_count=jax.process_count())
    res = _loop.train(cfg, run_dir, comps, resume=args.resume)
  except bad as e:
    return _error(str(e))
  except _loop.TrainingError as e:
    print(f"jaxent: {e}", file=sys.stderr)
    return EXIT_TRAINING_STOPPED
  except OSError as e:  # disk full, run directory not writable or escaping: the last checkpoint is kept
    where = "" if getattr(e, "filename", None) or run_dir in str(e) else f" (run directory {run_dir})"
    return _error(f"{e}{where}")
  last = res.history[-1] if res.history else {}
  print(f"jaxent train: {run_dir}: {len(res.history)} steps, reward {last.get('reward_mean')}, "
        f"entropy {last.get('entropy')}")
  return EXIT_OK


# ------------------------------------------------------------------- eval ---

def _add_eval(sub) -> None:
  p = sub.add_parser("eval", help="mean@k / pass@k of a checkpoint or HF directory on a JSONL benchmark")
  p.add_argument("--model", required=True, help="HF directory or jaxent run directory")
  p.add_argument("--data", required=True, action="append", help="benchmark JSONL (repeatable)")
  p.add_argument("--k", type=int, default=1, help="samples per prompt (mean@k, pass@k)")
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (k is then 1)")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--max-new-tokens", type=int, default=1024)
  p.add_argument("--reward", default="math", help="reward function (jaxent.rewards)")
  p.add_argument("--prompt-key", default="prompt")
  p.add_argument("--answer-key", default="answer")
  p.add_argument("--chat-template", action="store_true")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="write the results as JSON here")


def _run_eval(args: argparse.Namespace) -> int:
  import json
  from jaxent.train import _eval
  bad = _setup_errors()
  try:
    model, tok, cfg = _eval.load_model_or_run(args.model)
    skip = not (cfg is not None and cfg.data.task == "arithmetic")
    results = [_eval.evaluate_benchmark(
        model, tok, path, k=args.k, temperature=args.temperature, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens, reward=args.reward, prompt_key=args.prompt_key,
        answer_key=args.answer_key, chat_template=args.chat_template, batch_size=args.batch_size,
        seed=args.seed, skip_special_tokens=skip) for path in args.data]
  except bad + (ValueError,) as e:
    return _error(str(e))
  for r in results:
    print(json.dumps(r))
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)
  return EXIT_OK


# ----------------------------------------------------------------- export ---

def _add_export(sub) -> None:
  p = sub.add_parser("export", help="write a run's policy in Hugging Face format")
  p.add_argument("run_dir", metavar="RUN_DIR")
  p.add_argument("out_dir", metavar="OUT_DIR")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")


def _run_export(args: argparse.Namespace) -> int:
  from jaxent import models
  from jaxent.train import _eval
  try:
    cfg, model, tok, step = _eval.load_run(args.run_dir, args.step)
  except _setup_errors() as e:
    return _error(str(e))
  hf_tok = tok if hasattr(tok, "save_pretrained") else None
  models.save_pretrained(model, args.out_dir, tokenizer=hf_tok)
  print(f"jaxent export: step {step} of {args.run_dir} -> {args.out_dir}"
        + ("" if hf_tok else " (no Hugging Face tokenizer to write: the run used the built-in one)"))
  return EXIT_OK


# ------------------------------------------------------------------- demo ---

def _add_demo(sub) -> None:
  p = sub.add_parser("demo", help="the embedded default: entropy collapse and its cure on CPU")
  p.add_argument("--quick", action="store_true", help="a smoke version (under 2 minutes)")
  p.add_argument("--out", default="runs/demo", help="output directory")


def _run_demo(args: argparse.Namespace) -> int:
  from jaxent.train._demo import run_demo
  run_demo(args.out, quick=args.quick)
  return EXIT_OK

# ------------------------------------------------------------------ main ---

_COMMANDS: dict[str, tuple[Callable, Callable[[argparse.Namespace], int]]] = {
    "demo": (_add_demo, _run_demo),
    "train": (_add_train, _run_train),
    "eval": (_add_eval, _run_eval),
    "export": (_add_export, _run_export),
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
