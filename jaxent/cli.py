"""The ``jaxent`` command line: thin entry points over library functions.

Each subcommand is a pair ``_add_<name>(subparsers)`` / ``_run_<name>(args)
-> exit code``, registered in ``_COMMANDS``. Heavy imports (jax, matplotlib)
happen inside the ``_run_*`` functions so that ``jaxent --help`` is instant.
Exit codes (``jaxent.errors``): 0 success, 2 bad usage or bad input (one line
on stderr), 3 the run stopped itself after saving a checkpoint, 4 the hosts of
a multi-process job could not join. The CLI imports only public names.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from jaxent.errors import (EXIT_BAD_INPUT, EXIT_NO_COORDINATOR, EXIT_OK, EXIT_PREEMPTED,
                           EXIT_TRAINING_STOPPED, JaxentError, exit_code_of)


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
  from jaxent import apps
  try:
    line = apps.fit_law(args.run_dir, fit_first=args.fit_first, x_key=args.x_key,
                        y_key=args.y_key, method=args.method)
  except (OSError, ValueError) as e:
    return _error(str(e))
  print(line)
  return EXIT_OK



# ------------------------------------------------------------------ train ---

def _add_process_flags(p: argparse.ArgumentParser, how: str) -> None:
  """The "multi-process" flags ``train`` and ``eval`` share; ``how`` says what the hosts do."""
  g = p.add_argument_group(
      "multi-process", f"{how} TPU pod slices and SLURM jobs are detected; otherwise give all "
      "three of these (or JAXENT_COORDINATOR, JAXENT_NUM_PROCESSES, JAXENT_PROCESS_ID).")
  g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                 help="address of process 0, where the coordinator listens")
  g.add_argument("--num-processes", type=int, default=None, metavar="N")
  g.add_argument("--process-id", type=int, default=None, metavar="I", help="0 .. N-1")
  g.add_argument("--init-timeout", type=float, default=None, metavar="SECONDS",
                 help="give up (exit 4) if the processes have not all joined by then "
                      "(default JAXENT_INIT_TIMEOUT or 300)")


def _join_processes(args: argparse.Namespace) -> int | None:
  """Joins the hosts of a multi-process job (before JAX touches a device); an exit code on failure."""
  from jaxent import apps
  try:
    apps.initialize_distributed(args.coordinator, args.num_processes, args.process_id,
                                timeout_s=args.init_timeout, exit_code=EXIT_NO_COORDINATOR)
  except JaxentError as e:
    return _error(str(e))
  return None


def _add_train(sub) -> None:
  p = sub.add_parser("train", help="run RL training from a YAML config",
                     description="Train a policy with GRPO / Clip-Cov / KL-Cov from CONFIG.yaml.")
  p.add_argument("config", metavar="CONFIG.yaml")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config value, e.g. --set loss.name=kl_cov (repeatable)")
  p.add_argument("--run-dir", default=None, help="run directory (default: runs/<name>)")
  p.add_argument("--resume", action="store_true",
                 help="continue from the run directory's newest intact checkpoint (the config may "
                      "change only in fields that keep the checkpoint usable)")
  p.add_argument("--overwrite", action="store_true",
                 help="start a fresh run in a run directory that holds one: the old contents are "
                      "moved to RUN_DIR.old-<time>, not deleted")
  p.add_argument("--change-loss", action="store_true",
                 help="with --resume: allow loss.name to differ from the stored run's")
  p.add_argument("--dry-run", action="store_true",
                 help="validate the config, build the model (no weights) and mesh abstractly, "
                      "compile (or lower) the train step for the target mesh, print the parameter "
                      "count and memory per device; writes nothing")
  p.add_argument("--topology", default=None, metavar="N|NAME",
                 help="--dry-run target: a device count (e.g. 64) or a TPU topology name for "
                      "ahead-of-time compilation (e.g. v5p:4x4x4, needs libtpu)")
  p.add_argument("--platform", default=None, choices=("tpu", "cuda", "rocm", "cpu"),
                 help="--dry-run: platform to lower for when the mesh is not here (default tpu)")
  _add_process_flags(p, "Several hosts run the same command.")


def _run_train(args: argparse.Namespace) -> int:
  from jaxent import apps
  from jaxent import config as config_lib
  try:
    cfg = config_lib.load(args.config, args.overrides)
  except JaxentError as e:
    return _error(str(e))
  if args.dry_run:
    try:
      apps.dry_run(cfg, topology=args.topology, platform=args.platform)
    except JaxentError as e:
      return _error(str(e))
    return EXIT_OK
  err = _join_processes(args)
  if err is not None:
    return err
  import jax
  from jaxent import train
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
  run = None
  try:
    # The run directory is locked and checked before anything is written into it.
    run = train.claim_run_dir(run_dir, cfg, resume=args.resume, overwrite=args.overwrite,
                              change_loss=args.change_loss, command=args.argv,
                              is_main=jax.process_index() == 0)
    for note in run.notes:
      print(f"jaxent: {note}", file=sys.stderr)
    comps = train.build_components(cfg, data_dir, process_index=jax.process_index(),
                                   process_count=jax.process_count())
    # The CLI needs the loaded parameters only to start: train() drops them
    # once the train state holds its copy (one parameter share per device less).
    res = train.train(cfg, run_dir, comps, resume=args.resume, release_params=True, run=run)
  except (JaxentError, OSError) as e:
    code = exit_code_of(e)
    if code in (EXIT_TRAINING_STOPPED, EXIT_PREEMPTED):  # stopped; the message names the checkpoint
      print(f"jaxent: {e}", file=sys.stderr)
      return code
    # disk full, run directory not writable or escaping: the last checkpoint is kept
    where = ("" if not isinstance(e, OSError) or getattr(e, "filename", None) or run_dir in str(e)
             else f" (run directory {run_dir})")
    return _error(f"{e}{where}")
  except KeyboardInterrupt:  # Ctrl-C while loading, before train() catches signals itself
    print("jaxent: SIGINT before the first step: nothing saved", file=sys.stderr)
    return EXIT_PREEMPTED
  finally:
    if run is not None:
      run.release()
  if not res.history and res.start_step >= cfg.train.steps:
    print(f"jaxent train: {run_dir}: already at step {res.start_step} = train.steps; nothing to "
          f"do (raise train.steps with --set train.steps=N to continue)")
    return EXIT_OK
  last = res.history[-1] if res.history else {}
  print(f"jaxent train: {run_dir}: {len(res.history)} steps, reward {last.get('reward_mean')}, "
        f"entropy {last.get('entropy')}")
  return EXIT_OK


# ------------------------------------------------------------------- eval ---

_EVAL_SETTING_FLAGS = ("k", "temperature", "top_p", "top_k", "max_new_tokens", "max_prompt_len",
                       "reward", "prompt_key", "answer_key", "chat_template")


def _add_eval(sub) -> None:
  p = sub.add_parser(
      "eval", help="mean@k / pass@k of a checkpoint or HF directory on JSONL benchmarks",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description=(
          "Evaluate MODEL on local benchmark files with the paper's decoding presets.\n\n"
          "  jaxent eval MODEL --benchmarks aime24=data/aime24.jsonl math500=data/m.jsonl\n"
          "  jaxent eval MODEL --data data/AIME_2025.jsonl --data data/math-500.jsonl\n"
          "  jaxent eval RUN_DIR --mesh data=4,tensor=2 --data data/aime24.jsonl   # 8 devices\n\n"
          "A benchmark is NAME=PATH (NAME a preset: aime24, aime25, amc, math500, or any label\n"
          "with explicit decoding flags) or a PATH recognised by its file name; otherwise the\n"
          "flags below (over their defaults) decide. Flags given explicitly override a preset's\n"
          "values for every benchmark; the report records the settings used. See docs/EVAL.md."))
  p.add_argument("model_pos", nargs="?", default=None, metavar="MODEL",
                 help="HF directory (config.json) or jaxent run directory (config.yaml)")
  p.add_argument("--model", default=None, help="the same as MODEL")
  p.add_argument("--benchmarks", nargs="+", action="extend", default=[], metavar="[NAME=]PATH",
                 help="benchmark files, optionally named (repeatable)")
  p.add_argument("--data", action="append", default=[], metavar="PATH",
                 help="a benchmark file (repeatable; same as a bare --benchmarks PATH)")
  p.add_argument("--preset", default="paper", choices=("paper", "none"),
                 help="paper (default): recognise the paper's benchmarks by name; none: flags only")
  p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
  g = p.add_argument_group("settings (default: the preset's; without a preset the value shown)")
  g.add_argument("--k", type=int, default=None, help="samples per prompt, mean@k / pass@k (1)")
  g.add_argument("--temperature", type=float, default=None, help="0 = greedy, then k is 1 (0)")
  g.add_argument("--top-p", type=float, default=None, help="(1: off)")
  g.add_argument("--top-k", type=int, default=None, help="(0: off)")
  g.add_argument("--max-new-tokens", type=int, default=None, help="response budget (1024)")
  g.add_argument("--max-prompt-len", type=int, default=None,
                 help="longer prompts are skipped and counted (2048)")
  g.add_argument("--reward", default=None, help="reward function, jaxent.rewards (math)")
  g.add_argument("--prompt-key", default=None, help="prompt field (prompt; presets: aliases)")
  g.add_argument("--answer-key", default=None, help="answer field (answer; presets: aliases)")
  g.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                 help="wrap prompts in the tokenizer's chat template (off)")
  p.add_argument("--batch-size", type=int, default=None, metavar="ROWS",
                 help="rows (prompts x samples) per sampler call over the whole mesh; bounds the "
                      "KV cache (default 64 per data x fsdp shard: 64 on one device)")
  p.add_argument("--mesh", default=None, metavar="data=D,fsdp=F,tensor=T",
                 help="devices to generate on (omitted axes 1; one axis may be -1: the remaining "
                      "devices). Default: a run directory's own mesh when it fits the devices "
                      "here, else one device; a HF directory: one device")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="compute dtype for an HF directory (a run directory keeps its own)")
  p.add_argument("--grade-timeout", type=float, default=5.0, metavar="SECONDS",
                 help="per-response grading bound")
  p.add_argument("--out", default=None, help="write the report (a JSON list, one per benchmark)")
  p.add_argument("--samples-out", default=None, metavar="PATH",
                 help="write every response with its reward as JSONL")
  _add_process_flags(p, "Every host runs the same command over one --mesh; process 0 grades and "
                        "writes the report.")


def _run_eval(args: argparse.Namespace) -> int:
  import json
  from jaxent import eval as eval_lib
  from jaxent import sharding
  if args.list_presets:
    print(eval_lib.format_presets())
    return EXIT_OK
  if args.model_pos and args.model and args.model_pos != args.model:
    return _error(f"eval: two models given: {args.model_pos} and --model {args.model}")
  model_path = args.model_pos or args.model
  if not model_path:
    return _error("eval: no model: give MODEL (an HF directory or a jaxent run directory)")
  specs = list(args.benchmarks) + list(args.data)
  if not specs:
    return _error("eval: no benchmark: give --benchmarks [NAME=]PATH ... or --data PATH")
  if args.batch_size is not None and args.batch_size < 1:
    return _error(f"eval: --batch-size must be >= 1, got {args.batch_size}")
  mesh_shape = None
  if args.mesh is not None:
    try:
      mesh_shape = sharding.parse_mesh(args.mesh)
    except ValueError as e:
      return _error(f"eval: --mesh {args.mesh!r}: {e}")
  overrides = {f: getattr(args, f) for f in _EVAL_SETTING_FLAGS}
  # Everything about the input is checked before the (slow) model load.
  try:
    benches = [eval_lib.resolve_benchmark(s, overrides, presets=args.preset == "paper")
               for s in specs]
    for b in benches:
      eval_lib.resolve_fields(b.path, b.settings.prompt_keys, b.settings.answer_keys)
  except (JaxentError, ValueError) as e:
    return _error(str(e))
  err = _join_processes(args)
  if err is not None:
    return err
  import jax
  from jaxent import train
  main = jax.process_index() == 0
  if main:
    for b in benches:
      for note in b.notes:
        print(f"jaxent eval: {note}", file=sys.stderr)
  results, samples = [], []
  try:
    mesh, note = train.eval_mesh(model_path, mesh_shape, dtype=args.dtype)
    model, tok, cfg = train.load_model_or_run(model_path, dtype=args.dtype, mesh=mesh)
    if main:  # after the load, so a model that cannot be loaded gives one error line
      if note:
        print(f"jaxent eval: {note}", file=sys.stderr)
      where = ("one device" if mesh is None else
               " x ".join(f"{a}={s}" for a, s in mesh.shape.items()) + f" = {mesh.size} devices")
      print(f"jaxent eval: generating on {where} ({jax.process_count()} process"
            f"{'es' if jax.process_count() > 1 else ''})", file=sys.stderr)
    skip = not (cfg is not None and cfg.data.task == "arithmetic")
    for b in benches:
      out = eval_lib.evaluate_benchmark(
          model, tok, b, batch_size=args.batch_size, seed=args.seed, timeout_s=args.grade_timeout,
          skip_special_tokens=skip, return_samples=True, mesh=mesh)
      if out is not None:  # process 0 grades; the others only generate
        results.append({"model": model_path, **out[0]})
        samples += out[1]
  except (JaxentError, ValueError) as e:
    return _error(str(e))
  if not main:
    return EXIT_OK
  print(eval_lib.format_table(results))
  try:
    if args.out:
      os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
      with open(args.out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    if args.samples_out:
      os.makedirs(os.path.dirname(os.path.abspath(args.samples_out)), exist_ok=True)
      with open(args.samples_out, "w", encoding="utf-8") as f:
        for row in samples:
          f.write(json.dumps(row, ensure_ascii=False) + "\n")
  except OSError as e:
    return _error(f"eval: cannot write the report: {e}")
  return EXIT_OK


# ----------------------------------------------------------------- export ---

def _add_export(sub) -> None:
  p = sub.add_parser("export", help="write a run's policy in Hugging Face format")
  p.add_argument("run_dir", metavar="RUN_DIR")
  p.add_argument("out_dir", metavar="OUT_DIR")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")


def _run_export(args: argparse.Namespace) -> int:
  from jaxent import models, train
  try:
    cfg, model, tok, step = train.load_run(args.run_dir, args.step)
  except JaxentError as e:
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
  from jaxent import apps
  apps.run_demo(args.out, quick=args.quick)
  return EXIT_OK

# ------------------------------------------------------------------ study ---

def _add_study(sub) -> None:
  p = sub.add_parser(
      "study", help="every entropy-management method from one warm start, on one table",
      description=(
          "From one supervised warm start, the same seeds and the same budget, train every method "
          "of the study file (GRPO, Clip-higher, entropy bonus, adaptive entropy, the top-entropy "
          "mask, GSPO, CISPO, Clip-Cov, KL-Cov), evaluate each on the held-out problems (greedy, "
          "mean@k at the training temperature, pass@k), fit the entropy-performance law and its "
          "early-fit prediction, and write study.json, study.md and entropy.png, accuracy.png, "
          "law.png, passk.png. See docs/STUDY.md."))
  p.add_argument("--quick", action="store_true", help="the smoke version (the study file's quick section)")
  p.add_argument("--config", default=None, metavar="STUDY.yaml",
                 help="the study file (default: configs/study/study.yaml)")
  p.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                 help="run only these methods of the study file")
  p.add_argument("--seeds", nargs="+", type=int, default=None, metavar="SEED",
                 help="the seeds (default: the study file's)")
  p.add_argument("--out", default="runs/study", help="output directory (default runs/study)")
  p.add_argument("--resume", action="store_true",
                 help="reuse the warm start and every finished run in --out (a run is redone "
                      "only if it did not finish or its settings changed)")


def _run_study(args: argparse.Namespace) -> int:
  from jaxent import apps
  try:
    apps.run_study(args.out, study_file=args.config, quick=args.quick, methods=args.methods,
                   seeds=args.seeds, resume=args.resume)
  except (JaxentError, ValueError) as e:
    return _error(str(e))
  return EXIT_OK

# ------------------------------------------------------------------ main ---

_COMMANDS: dict[str, tuple[Callable, Callable[[argparse.Namespace], int]]] = {
    "demo": (_add_demo, _run_demo),
    "study": (_add_study, _run_study),
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
  args.argv = ["jaxent", *(sys.argv[1:] if argv is None else argv)]  # recorded in a run's history
  return _COMMANDS[args.command][1](args)


if __name__ == "__main__":
  sys.exit(main())
