"""Continuous batching vs the static sampler (and vLLM) on long-tailed response lengths.

Rows: ``--prompts`` prompts x ``--samples`` samples, each row with its own
budget drawn from a lognormal (median ``--median``, sigma ``--sigma``,
capped at ``--max-new``, seeded), no EOS, so every row generates exactly its
budget and both engines do the same work. The static engine decodes all rows
until the longest ends; the continuous engine decodes ``--slots`` rows at a
time and refills finished ones. Reported per engine: wall time (the second of
the best of ``--repeats`` runs after a compiling one), generated tokens/s, slot utilisation
(generated tokens / row draws computed, ``SampleStats``) and decode steps;
then the wall-time ratio and whether the tokens are identical row by row.
``--uniform`` gives every row ``--max-new`` tokens (continuous must not lose
there).

``--engines static,continuous,vllm`` adds vLLM (needs the vllm package: the
venv of docs/VLLM.md) on the same weights, prompts and budgets, in the same
process. The vLLM engine (``rollout.engine: vllm``) takes one
``max_new_tokens`` for every row, so the bench calls ``vllm.LLM`` itself,
started as ``VLLMEngine`` starts it (the model written by
``models.save_pretrained``, fp32 unless ``--vllm-dtype``), with one request
per row carrying that row's budget (``max_tokens``, ``ignore_eos=True``,
a per-row seed, ``logprobs=0`` as the engine asks). Its tokens are not
comparable row by row with the native engines' (another sampler, other
random numbers); the bench checks that every row generated its budget.
``--threads N`` pins the process to N cores before jax and torch start
(``_threads.py``; without it nothing is pinned).

The issue's setting is a 135M Llama (``--model 135m``), 8 x 8 rows, median
64, cap 512; on the shared 2-core CPU that takes minutes per engine, so the
default is a small Llama-shaped model and shorter responses:

  python bench/rollout_engine.py                     # small model, ~1 min
  python bench/rollout_engine.py --uniform
  python bench/rollout_engine.py --model 135m --median 64 --max-new 512 --slots 16
  python bench/rollout_engine.py --compute-dtype bfloat16   # bfloat16 weights and cache
  python bench/rollout_engine.py --model demo --prompts 32 --uniform --max-new 12 --slots 64
  /work/venvs/vllm/bin/python bench/rollout_engine.py --threads 1 --engines static,continuous,vllm
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _threads  # noqa: E402  (pins the process before jax and torch start)

if any(a == "--threads" or a.startswith("--threads=") for a in sys.argv):
  _threads.pin(sys.argv)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxent import models, sampler  # noqa: E402

NATIVE = ("static", "continuous")

SHAPES = {
    # SmolLM2-135M (Llama, tied embeddings)
    "135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                 num_heads=9, num_kv_heads=3, head_dim=64),
    # a small Llama-shaped model for the 2-core CPU
    "small": dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_layers=6,
                  num_heads=6, num_kv_heads=2, head_dim=64),
    # the demo's policy (configs/demo.yaml: Qwen2 shape, 0.12M parameters, llama-style here)
    "demo": dict(vocab_size=15, hidden_size=64, intermediate_size=256, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16),
}


def budgets_of(args) -> list[int]:
  rows = args.prompts * args.samples
  if args.uniform:
    return [args.max_new] * rows
  rng = np.random.default_rng(args.seed)
  draw = np.exp(np.log(args.median) + args.sigma * rng.standard_normal(rows))
  return np.clip(np.round(draw), 1, args.max_new).astype(int).tolist()


def run_once(model, prompts, budgets, args, **engine):
  """(wall s, process CPU s, tokens, stats) of one generation."""
  kw = dict(max_new_tokens=args.max_new, key=jax.random.key(args.seed), temperature=1.0,
            num_samples=args.samples, budgets=budgets, compute_dtype=args.compute_dtype, **engine)
  t0, c0 = time.perf_counter(), time.process_time()
  out = sampler.generate(model, prompts, **kw)
  tokens = np.asarray(out.tokens)
  return time.perf_counter() - t0, time.process_time() - c0, tokens, jax.device_get(out.stats)


class VLLMRunner:
  """``vllm.LLM`` on ``model``'s weights, started as ``rollout.VLLMEngine`` starts it, with a
  per-row ``max_tokens``: the long-tailed workload the engine's one ``max_new_tokens`` cannot
  express."""

  def __init__(self, model, max_len: int, dtype: str):
    import shutil
    import tempfile

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import vllm

    self._dir = tempfile.mkdtemp(prefix="bench-vllm-")
    self._rm = shutil.rmtree
    models.save_pretrained(model, self._dir)
    self.llm = vllm.LLM(model=self._dir, dtype=dtype, enforce_eager=True, max_model_len=max_len,
                        kv_cache_memory_bytes=1 << 30, skip_tokenizer_init=True,
                        logprobs_mode="processed_logprobs", seed=0)
    self.version = vllm.__version__

  def run(self, prompts, budgets, args, repeat: int):
    """(wall s, process CPU s, generated tokens) of one call over every row."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    n = args.samples
    seeds = np.random.default_rng([args.seed, repeat + 1]).integers(0, 2**31 - 1, size=len(budgets))
    params = [SamplingParams(n=1, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=int(b),
                             ignore_eos=True, logprobs=0, detokenize=False, seed=int(sd))
              for b, sd in zip(budgets, seeds)]
    reqs = [TokensPrompt(prompt_token_ids=prompts[row // n]) for row in range(len(budgets))]
    t0, c0 = time.perf_counter(), time.process_time()
    outs = self.llm.generate(reqs, params, use_tqdm=False)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    lens = [len(o.outputs[0].token_ids) for o in outs]
    if lens != list(budgets):
      raise RuntimeError("vLLM rows did not generate exactly their budgets")
    return dt, cpu, sum(lens)

  def close(self):
    self.llm = None
    self._rm(self._dir, ignore_errors=True)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", choices=sorted(SHAPES), default="small")
  ap.add_argument("--prompts", type=int, default=8)
  ap.add_argument("--samples", type=int, default=8)
  ap.add_argument("--median", type=float, default=24.0)
  ap.add_argument("--sigma", type=float, default=0.8)
  ap.add_argument("--max-new", type=int, default=192)
  ap.add_argument("--slots", type=int, default=16)
  ap.add_argument("--steps-per-call", type=int, default=None)
  ap.add_argument("--uniform", action="store_true")
  ap.add_argument("--compute-dtype", default=None,
                  help="generate from copies of the weights in this dtype (e.g. bfloat16)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--engines", default=",".join(NATIVE),
                  help="comma-separated, of static, continuous, vllm (vllm: the vLLM venv)")
  ap.add_argument("--vllm-dtype", choices=("float32", "bfloat16"), default="float32")
  ap.add_argument("--threads", type=int, default=None,
                  help="pin to this many cores before jax and torch start (default: no pinning)")
  args = ap.parse_args()
  names = [e.strip() for e in args.engines.split(",") if e.strip()]
  unknown = sorted(set(names) - {*NATIVE, "vllm"})
  if unknown or not names:
    ap.error(f"--engines: unknown {unknown}; choose from static, continuous, vllm")

  cfg = models.ModelConfig(model_type="llama", tie_word_embeddings=True, **SHAPES[args.model])
  model = models.init_model(cfg, seed=0)
  rng = np.random.default_rng(args.seed + 1)
  prompts = [rng.integers(1, cfg.vocab_size, size=int(n)).tolist()
             for n in rng.integers(8, 17, size=args.prompts)]
  per_row = args.samples > 1 and not args.uniform
  budgets = budgets_of(args)
  lens = np.asarray(budgets)
  print(f"model {args.model} ({sum(x.size for x in jax.tree.leaves(model.params)) / 1e6:.1f}M), "
        f"{args.prompts} prompts x {args.samples} samples, budgets mean {lens.mean():.1f} "
        f"median {np.median(lens):.0f} max {lens.max()} (per row: {per_row}), "
        f"{jax.devices()[0].platform}, threads {len(os.sched_getaffinity(0))}")
  native = {"static": dict(engine="static"),
            "continuous": dict(engine="continuous", slots=args.slots,
                               steps_per_call=args.steps_per_call)}
  vllm_runner = None
  if "vllm" in names:
    max_len = max(len(p) for p in prompts) + args.max_new
    t0 = time.perf_counter()
    vllm_runner = VLLMRunner(model, max_len, args.vllm_dtype)
    print(f"vllm {vllm_runner.version} ({args.vllm_dtype}) started in "
          f"{time.perf_counter() - t0:.1f} s")

  def once(name, repeat):
    if name == "vllm":
      dt, cpu, gen = vllm_runner.run(prompts, budgets, args, repeat)
      return dt, cpu, None, gen, None
    dt, cpu, tokens, st = run_once(model, prompts, budgets, args, **native[name])
    return dt, cpu, tokens, int(st.generated_tokens), st

  res = {}
  for name in names:  # compile; vLLM's first forward passes
    once(name, -1)
  for rep in range(args.repeats):  # alternating runs, the best of each: the machine is shared
    for name in names:
      dt, cpu, tokens, gen, st = once(name, rep)
      old = res.get(name, (np.inf, np.inf))
      res[name] = (min(dt, old[0]), min(cpu, old[1]), tokens, gen, st)
  for name, (dt, cpu, _, gen, st) in res.items():
    line = f"{name:>10}: {dt:7.2f} s wall {cpu:7.2f} s CPU  {gen / dt:8.1f} tok/s  "
    if st is None:
      line += f"utilisation    n/a  decode steps n/a  ({gen} tokens; vLLM's own scheduler)"
    else:
      line += (f"utilisation {gen / int(st.slot_steps):6.1%}  decode steps "
               f"{int(st.decode_steps)}  ({gen} tokens, {int(st.slot_steps)} row draws)")
    print(line)
  if "static" in res and "continuous" in res:
    same = np.array_equal(res["static"][2], res["continuous"][2])
    print(f"static / continuous: wall time {res['static'][0] / res['continuous'][0]:.2f}x, "
          f"CPU time {res['static'][1] / res['continuous'][1]:.2f}x; "
          f"tokens identical row by row: {same}")
  if vllm_runner is not None:
    for name in (n for n in NATIVE if n in res):
      print(f"{name} / vllm: wall time {res[name][0] / res['vllm'][0]:.2f}x, "
            f"CPU time {res[name][1] / res['vllm'][1]:.2f}x")
    print("vllm tokens: not comparable row by row with the native engines' (another sampler, "
          "other random numbers); every row generated exactly its budget")
    vllm_runner.close()


if __name__ == "__main__":
  main()
